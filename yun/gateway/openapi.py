"""An honest OpenAPI document: every status an operation can answer, with its media type.

FastAPI documents the success and a 422 in its own format; the gateway answers every
error as ``application/problem+json`` (``yun.proto.errors.Problem``) and can refuse a
request before any route runs (400 bad UTF-8, 413 too large, 429 too fast), or fail
to reach a control server (502, 503). A schema fuzzer checks each answer against this
document, so it lists them all.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from yun.proto.errors import PROBLEM_MEDIA_TYPE, Problem

PROBLEM_REF = "#/components/schemas/Problem"
# Operations anyone may call: they need no credential.
PUBLIC_OPERATIONS = frozenset({("post", "/api/v1/auth/tokens")})
# GET operations without path parameters that can still name something missing.
GETS_THAT_MAY_MISS = frozenset({"/api/v1/quota"})
MUTATIONS = frozenset({"post", "put", "patch", "delete"})
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

DESCRIPTIONS = {
    400: "malformed request: not valid UTF-8, or a `q`, `sort` or `cursor` that cannot "
         "be parsed",
    401: "no valid credential: missing, expired, revoked, or a bad signature",
    403: "the caller's roles do not allow this",
    404: "no such resource (or it belongs to another project)",
    409: "conflicts with the current state (a name taken, still in use, over quota…)",
    413: "request body larger than the limit (1 MiB for JSON)",
    422: "invalid parameters or body; `errors` names each field",
    429: "too many requests; retry after `Retry-After` seconds",
    502: "a control or storage server failed or answered something unexpected",
    503: "no control server is available; try again shortly",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"},
                               "description": "the credential scheme to use"}},
    429: {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                          "description": "seconds to wait"}},
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "a token from `POST /api/v1/auth/tokens`"},
    "keyPair": {"type": "apiKey", "in": "header", "name": "Authorization",
                "description": "`YUN1-HMAC-SHA256 Credential=<access key>, "
                               "Signature=<hex>` with `X-Yun-Date` and "
                               "`X-Yun-Content-SHA256` (see docs/API.md)"},
}


def problem_statuses(method: str, path: str, operation: dict[str, Any]) -> list[int]:
    """The error statuses the operation ``method path`` can answer."""
    statuses = {400, 401, 403, 413, 422, 429, 502, 503}
    has_path_params = any(p.get("in") == "path" for p in operation.get("parameters", []))
    if has_path_params or method in MUTATIONS or path in GETS_THAT_MAY_MISS:
        statuses.add(404)
    if method in MUTATIONS and (method, path) not in PUBLIC_OPERATIONS:
        statuses.add(409)
    if has_path_params and "{ref}" in path:
        statuses.add(409)  # a name more than one resource carries: use the uuid
    return sorted(statuses)


def _problem_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_REF}}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the problem answers, the ``Problem`` schema and the security schemes."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components["securitySchemes"] = SECURITY_SCHEMES
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "delete", "patch"}:
                continue
            responses = operation.setdefault("responses", {})
            for status in problem_statuses(method, path, operation):
                responses[str(status)] = _problem_response(status)
            if (method, path) not in PUBLIC_OPERATIONS:
                operation["security"] = [{"bearer": []}, {"keyPair": []}]
    text = repr(schema["paths"])
    for name in FASTAPI_VALIDATION_SCHEMAS:
        # FastAPI's own 422 format is never answered; drop it once nothing refers to it.
        if f"#/components/schemas/{name}" not in text:
            schemas.pop(name, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
