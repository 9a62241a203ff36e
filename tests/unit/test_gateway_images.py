"""Image uploads: streamed to the storage server, keyed retries, signed payloads, failures."""

from __future__ import annotations

import hashlib

import httpx

from tests.unit.test_gateway_harness import (
    BEARER,
    Gateway,
    chunks,
    image_json,
    make_gateway,
    problem,
)
from yun.proto import signing

MIB = 1 << 20
STORAGE = "http://storage.test"


def prepare(gw: Gateway, status: str = "uploading", existing: bool = False) -> str:
    """The control server hands out a ticket; the stored image becomes active."""
    image = image_json(status)
    ticket = {"image": image, "storage_url": STORAGE, "existing": existing}
    gw.control.on("POST", "/internal/v1/images", 201, ticket)
    gw.control.on("GET", f"/internal/v1/images/{image['uuid']}", 200,
                  {**image, "status": "active", "sha256": "ab"})
    gw.control.on("DELETE", f"/internal/v1/images/{image['uuid']}", 204)
    gw.storage.on("PUT", f"/internal/v1/images/{image['uuid']}/data", 200, {"ok": True})
    return str(image["uuid"])


def upload_calls(gw: Gateway) -> list[tuple[str, str]]:
    return [(s.method, s.raw_path) for s in gw.control.calls()]


async def test_an_upload_streams_to_the_storage_server() -> None:
    gw = make_gateway()
    image_uuid = prepare(gw)
    resp = await gw.http.post(
        "/api/v1/images", params={"name": "disk", "format": "raw", "visibility": "project"},
        content=chunks(3 * MIB), headers={**BEARER, "Idempotency-Key": "up-1",
                                          "Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "active"
    create, show = gw.control.calls()
    assert create.headers["idempotency-key"] == "up-1"
    assert create.json() == {"name": "disk", "description": "", "format": "raw",
                             "visibility": "project", "sha256": None}
    assert (show.method, show.raw_path) == ("GET", f"/internal/v1/images/{image_uuid}")
    [put] = gw.storage.seen
    assert put.raw_path == f"/internal/v1/images/{image_uuid}/data"
    assert httpx.QueryParams(put.query) == httpx.QueryParams({"name": "disk", "format": "raw"})
    assert put.complete and len(put.body) == 3 * MIB  # more than the JSON limit


async def test_a_retried_keyed_upload_of_an_active_image_answers_it_unstreamed() -> None:
    gw = make_gateway()
    prepare(gw, status="active", existing=True)
    pulled = [0]
    resp = await gw.http.post("/api/v1/images", params={"name": "disk"},
                              content=chunks(8 * MIB, counter=pulled),
                              headers={**BEARER, "Idempotency-Key": "up-1"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "active"
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert gw.storage.seen == []
    assert [m for m, _ in upload_calls(gw)] == ["POST"]
    assert pulled[0] < 8 * MIB


async def test_an_existing_image_still_uploading_is_a_conflict() -> None:
    gw = make_gateway()
    prepare(gw, status="uploading", existing=True)
    resp = await gw.http.post("/api/v1/images", params={"name": "disk"}, content=b"x",
                              headers={**BEARER, "Idempotency-Key": "up-1"})
    assert resp.status_code == 409, resp.text
    assert gw.storage.seen == []


async def test_a_refused_upload_removes_the_record() -> None:
    gw = make_gateway()
    image_uuid = prepare(gw)
    gw.storage.on("PUT", f"/internal/v1/images/{image_uuid}/data",
                  *problem(422, "not a disk image"))
    resp = await gw.http.post("/api/v1/images", params={"name": "disk"}, content=b"junk",
                              headers=BEARER)
    assert resp.status_code == 422 and "not a disk image" in resp.json()["detail"]
    assert upload_calls(gw) == [("POST", "/internal/v1/images"),
                                ("DELETE", f"/internal/v1/images/{image_uuid}")]


async def test_a_signed_upload_is_hashed_while_it_streams() -> None:
    gw = make_gateway()
    prepare(gw)
    data = b"qcow" * (MIB // 2)
    path, query = "/api/v1/images", [("name", "disk")]
    headers = signing.sign_headers("AKIDALICE0001", "s3cr3t-of-alice-key", "POST", path,
                                   query, data)
    assert headers[signing.CONTENT_HEADER] == hashlib.sha256(data).hexdigest()
    resp = await gw.http.post(path, params=query, content=data, headers=headers)
    assert resp.status_code == 201, resp.text
    assert gw.storage.seen[0].body == data


async def test_a_signed_upload_with_another_body_fails_and_leaves_nothing() -> None:
    gw = make_gateway()
    image_uuid = prepare(gw)
    path, query = "/api/v1/images", [("name", "disk")]
    headers = signing.sign_headers("AKIDALICE0001", "s3cr3t-of-alice-key", "POST", path,
                                   query, b"the signed bytes")
    resp = await gw.http.post(path, params=query, content=b"other bytes", headers=headers)
    assert resp.status_code == 401, resp.text
    assert "body does not match X-Yun-Content-SHA256" in resp.json()["detail"]
    # The storage server never saw the end of the body, so it stored nothing.
    assert all(not s.complete for s in gw.storage.seen)
    assert ("DELETE", f"/internal/v1/images/{image_uuid}") in upload_calls(gw)


async def test_unsigned_payload_is_accepted_for_uploads() -> None:
    gw = make_gateway()
    prepare(gw)
    path, query = "/api/v1/images", [("name", "disk")]
    headers = signing.sign_headers("AKIDALICE0001", "s3cr3t-of-alice-key", "POST", path,
                                   query, None)
    assert headers[signing.CONTENT_HEADER] == signing.UNSIGNED_PAYLOAD
    resp = await gw.http.post(path, params=query, content=chunks(MIB), headers=headers)
    assert resp.status_code == 201, resp.text


async def test_a_ticket_with_a_bad_image_uuid_is_never_used_in_a_path() -> None:
    gw = make_gateway()
    image = image_json()
    image["uuid"] = "../../etc"
    gw.control.on("POST", "/internal/v1/images", 201,
                  {"image": image, "storage_url": STORAGE})
    resp = await gw.http.post("/api/v1/images", params={"name": "disk"}, content=b"x",
                              headers=BEARER)
    assert resp.status_code == 502, resp.text
    assert gw.storage.seen == []
    assert all(".." not in s.raw_path for s in gw.control.seen)
