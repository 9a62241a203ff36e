"""The OpenAPI document is honest: every route of docs/API.md, every status it can
answer with its media type, bounded parameters, descriptions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_gateway_harness import make_gateway

PROBLEM = {"$ref": "#/components/schemas/Problem"}
API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
KINDS = ("vms", "images", "nodes", "projects", "users", "departments")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    import asyncio

    async def fetch() -> dict[str, Any]:
        gw = make_gateway()
        return dict((await gw.http.get("/openapi.json")).json())

    return asyncio.run(fetch())


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in spec["paths"].items()
            for method, op in item.items()]


def documented_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route in the table of docs/API.md."""
    routes = set()
    for line in API_MD.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not cells[2].startswith("`/"):
            continue
        paths = re.findall(r"`(/[^`]+)`", cells[2])
        first = paths[0]
        for i, path in enumerate(paths):
            if i and path.count("/") == 1 and first.count("/") > 2:
                # "`/vms/{ref}/start`, `/stop`": a sibling of the first path.
                path = first.rsplit("/", 1)[0] + path
            kinds = KINDS if "{kind}" in path else ("",)
            for kind in kinds:
                for method in cells[1].split(","):
                    routes.add((method.strip(), "/api/v1" + path.replace("{kind}", kind)))
    return routes


def test_every_route_of_the_api_document_is_served(spec: dict[str, Any]) -> None:
    served = {(m.upper(), p) for m, p, _ in operations(spec)}
    assert served == documented_routes()
    assert len(served) == 132


def test_every_operation_lists_its_problem_statuses(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        statuses = set(op["responses"])
        must = {"400", "401", "403", "413", "422", "429", "502", "503"}
        if "{" in path or method != "get":
            must.add("404")
        if method != "get" and path != "/api/v1/auth/tokens":
            must.add("409")
        assert must <= statuses, (method, path, sorted(statuses))
        for status in must:
            content = op["responses"][status]["content"]
            assert content == {"application/problem+json": {"schema": PROBLEM}}, (path, status)
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
        assert any(s.startswith("2") for s in statuses), (method, path)


def test_problem_schema_and_no_fastapi_validation_format(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert set(schemas["Problem"]["required"]) == {"title", "status"}
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas


def test_security_is_declared_except_for_logins(spec: dict[str, Any]) -> None:
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "keyPair"}
    for method, path, op in operations(spec):
        if (method, path) == ("post", "/api/v1/auth/tokens"):
            assert "security" not in op
        else:
            assert op["security"] == [{"bearer": []}, {"keyPair": []}], (method, path)


def test_power_actions_document_200_and_deletes_document_202(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    for action in ("start", "stop", "reboot"):
        responses = paths[f"/api/v1/vms/{{ref}}/{action}"]["post"]["responses"]
        assert {"200", "202"} <= set(responses)
        assert responses["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Accepted"}
    for path in ("/api/v1/projects/{ref}", "/api/v1/images/{ref}"):
        assert {"202", "204"} <= set(paths[path]["delete"]["responses"])


def test_the_upload_body_is_binary(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/api/v1/images"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}
    console = spec["paths"]["/api/v1/vms/{ref}/console-log"]["get"]["responses"]["200"]
    assert "text/plain" in console["content"]


def test_every_integer_is_bounded_and_every_string_is_limited(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        for param in op.get("parameters", []):
            schema = param["schema"]
            variants = schema.get("anyOf", [schema])
            for variant in variants:
                where = (method, path, param["name"])
                if variant.get("type") in ("integer", "number"):
                    assert "maximum" in variant and "minimum" in variant, where
                if variant.get("type") == "string" and "enum" not in variant \
                        and "$ref" not in variant:
                    assert "maxLength" in variant, where


def test_every_operation_is_described_and_grouped(spec: dict[str, Any]) -> None:
    ids = set()
    for method, path, op in operations(spec):
        assert op.get("description") or op.get("summary"), (method, path)
        assert len(op.get("description", "")) > 10, (method, path)
        assert op.get("tags"), (method, path)
        ids.add(op["operationId"])
    assert len(ids) == len(operations(spec))
