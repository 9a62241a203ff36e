"""Authentication at the gateway: bearer tokens (cached) and signed key-pair requests."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.unit.test_gateway_harness import (
    ACCESS_KEY,
    BEARER,
    KEY_SECRET,
    TOKEN,
    alice,
    make_gateway,
    received_context,
    vm_json,
)
from yun.gateway.auth import NO_CREDENTIAL
from yun.proto import signing
from yun.proto.context import AuthResult, RequestContext

VMS = "/internal/v1/vms"
PAGE = {"items": [], "limit": 100, "offset": 0}


def assert_401(resp: httpx.Response, *fragments: str) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for fragment in fragments:
        assert fragment in resp.json()["detail"], resp.json()


def signed(method: str, path: str, query: list[tuple[str, str]] | None = None,
           body: bytes | None = b"", when: datetime | None = None,
           secret: str = KEY_SECRET, access_key: str = ACCESS_KEY) -> dict[str, str]:
    return signing.sign_headers(access_key, secret, method, path, query or [], body, when)


@pytest.mark.parametrize("header", [None, "", "Basic YWxpY2U6cHc=", "Bearer", "Bearer ",
                                    "YUN1-HMAC-SHA256 Credential=short, Signature=zz"])
async def test_no_usable_credential(header: str | None) -> None:
    gw = make_gateway()
    headers = {"Authorization": header} if header is not None else {}
    assert_401(await gw.http.get("/api/v1/vms", headers=headers), NO_CREDENTIAL)
    assert gw.control.seen == []


async def test_invalid_token_gets_the_control_servers_reason() -> None:
    gw = make_gateway()
    resp = await gw.http.get("/api/v1/vms", headers={"Authorization": "Bearer nope"})
    assert_401(resp, "the token is not valid")
    assert gw.control.calls() == []
    assert_401(await gw.http.get("/api/v1/vms", headers={"Authorization": "Bearer " + "x" * 600}),
               "not valid")


async def test_token_checks_are_cached_for_the_ttl() -> None:
    # A TTL long enough for three requests on a loaded machine.
    gw = make_gateway(auth_cache_ttl=2.0)
    gw.control.on("GET", VMS, 200, PAGE)
    for _ in range(3):
        assert (await gw.http.get("/api/v1/vms", headers=BEARER)).status_code == 200
    assert len(gw.control.auth_calls()) == 1
    await asyncio.sleep(2.1)
    assert (await gw.http.get("/api/v1/vms", headers=BEARER)).status_code == 200
    assert len(gw.control.auth_calls()) == 2


async def test_concurrent_requests_share_one_check() -> None:
    gw = make_gateway()
    gw.control.on("GET", VMS, 200, PAGE)
    answers = await asyncio.gather(*(gw.http.get("/api/v1/vms", headers=BEARER)
                                     for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len(gw.control.auth_calls()) == 1


async def test_a_cached_token_is_never_trusted_past_its_expiry() -> None:
    gw = make_gateway(auth_cache_ttl=60)
    gw.control.on("GET", VMS, 200, PAGE)
    # Two seconds of life: enough for the first request even on a loaded machine.
    expires_at = time.time() + 2.0
    gw.control.tokens[TOKEN] = AuthResult(context=alice(), expires_at=expires_at)
    assert (await gw.http.get("/api/v1/vms", headers=BEARER)).status_code == 200
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.1)
    assert_401(await gw.http.get("/api/v1/vms", headers=BEARER), "expired")
    assert len(gw.control.auth_calls()) == 2  # asked again once the cache entry lapsed


async def test_revoking_a_token_here_takes_effect_at_once() -> None:
    gw = make_gateway(auth_cache_ttl=60)
    gw.control.on("GET", VMS, 200, PAGE)
    token_uuid = alice().credential_id
    gw.control.on("DELETE", f"/internal/v1/auth/tokens/{token_uuid}", 204)
    assert (await gw.http.get("/api/v1/vms", headers=BEARER)).status_code == 200
    resp = await gw.http.delete(f"/api/v1/auth/tokens/{token_uuid}", headers=BEARER)
    assert resp.status_code == 204, resp.text
    del gw.control.tokens[TOKEN]
    assert_401(await gw.http.get("/api/v1/vms", headers=BEARER), "not valid")


async def test_a_signed_request_is_accepted_with_the_keys_context() -> None:
    gw = make_gateway()
    gw.control.on("GET", VMS, 200, PAGE)
    query = [("q", "name like 'web%'"), ("limit", "5")]
    resp = await gw.http.get("/api/v1/vms", params=query, headers=signed("GET", "/api/v1/vms",
                                                                          query))
    assert resp.status_code == 200, resp.text
    [seen] = gw.control.calls()
    context = received_context(seen)
    assert isinstance(context, RequestContext) and context.auth == "key"
    assert context.user_uuid == alice().user_uuid


async def test_a_signed_json_body_is_checked() -> None:
    gw = make_gateway()
    gw.control.on("POST", VMS, 202, {"task": None, "resource": vm_json()})
    body = b'{"name": "web", "image": "debian"}'
    headers = {**signed("POST", "/api/v1/vms", body=body),
               "Content-Type": "application/json"}
    assert (await gw.http.post("/api/v1/vms", content=body, headers=headers)).status_code == 202
    tampered = b'{"name": "evil", "image": "debian"}'
    headers = {**signed("POST", "/api/v1/vms", body=body), "Content-Type": "application/json"}
    resp = await gw.http.post("/api/v1/vms", content=tampered, headers=headers)
    assert_401(resp, "body does not match X-Yun-Content-SHA256")
    unsigned = {**signed("POST", "/api/v1/vms", body=None), "Content-Type": "application/json"}
    resp = await gw.http.post("/api/v1/vms", content=body, headers=unsigned)
    assert_401(resp, "UNSIGNED-PAYLOAD is accepted only for image uploads")
    assert len(gw.control.calls()) == 1


async def test_the_path_is_signed_as_sent() -> None:
    gw = make_gateway()
    gw.control.on("GET", "/internal/v1/vms/web-1", 200, vm_json())
    # The client signed the percent-encoded spelling it sends: that is what is checked.
    path = "/api/v1/vms/web%2D1"
    assert (await gw.http.get(path, headers=signed("GET", path))).status_code == 200
    resp = await gw.http.get(path, headers=signed("GET", "/api/v1/vms/web-1"))
    assert_401(resp, "signature does not match")


async def test_a_wrong_signature_is_refused() -> None:
    gw = make_gateway()
    resp = await gw.http.get("/api/v1/vms", headers=signed("GET", "/api/v1/vms",
                                                           secret="not-the-secret"))
    assert_401(resp, "signature does not match")
    resp = await gw.http.get("/api/v1/vms?limit=5", headers=signed("GET", "/api/v1/vms"))
    assert_401(resp, "signature does not match")
    assert gw.control.calls() == []


@pytest.mark.parametrize(("offset", "word"), [(-400, "behind"), (400, "ahead of")])
async def test_a_date_outside_the_window_is_refused(offset: int, word: str) -> None:
    gw = make_gateway()
    when = datetime.now(UTC) + timedelta(seconds=offset)
    resp = await gw.http.get("/api/v1/vms", headers=signed("GET", "/api/v1/vms", when=when))
    assert_401(resp, word, "at most 300 s")
    # The date has whole seconds, and a loaded machine may take seconds to answer: the
    # offset named is 400 s, less (ahead) or more (behind) the time the request took.
    found = re.search(r"X-Yun-Date is (\d+) s", resp.json()["detail"])
    assert found is not None and 385 <= int(found.group(1)) <= 415, resp.json()["detail"]
    assert gw.control.seen == []  # refused before the key is even looked up


async def test_missing_or_malformed_signing_headers() -> None:
    gw = make_gateway()
    good = signed("GET", "/api/v1/vms")
    for header, value, fragment in [
        (signing.DATE_HEADER, None, "needs the X-Yun-Date header"),
        (signing.DATE_HEADER, "yesterday", "is not a date"),
        (signing.CONTENT_HEADER, None, "needs the X-Yun-Content-SHA256 header"),
        (signing.CONTENT_HEADER, "ABC", "must be the lower-case hex sha256"),
    ]:
        headers = {k: v for k, v in good.items() if k != header}
        if value is not None:
            headers[header] = value
        assert_401(await gw.http.get("/api/v1/vms", headers=headers), fragment)


async def test_a_signature_is_accepted_once() -> None:
    gw = make_gateway()
    gw.control.on("GET", VMS, 200, PAGE)
    headers = signed("GET", "/api/v1/vms")
    assert (await gw.http.get("/api/v1/vms", headers=headers)).status_code == 200
    assert_401(await gw.http.get("/api/v1/vms", headers=headers), "replayed request")
    assert len(gw.control.calls()) == 1


async def test_unknown_and_disabled_keys_get_the_control_servers_reason() -> None:
    gw = make_gateway()
    resp = await gw.http.get("/api/v1/vms", headers=signed("GET", "/api/v1/vms",
                                                           access_key="AKIDNOBODY01"))
    assert_401(resp, "unknown access key")
    gw.control.keys[ACCESS_KEY] = None
    assert_401(await gw.http.get("/api/v1/vms", headers=signed("GET", "/api/v1/vms")),
               "the API key is disabled")


@pytest.mark.parametrize(("offered", "kept"), [
    ("req-1.a_B", True), ("x" * 64, True), ("x" * 65, False), ("a b", False),
    ("a/b", False), ("\xfc".encode("latin-1"), False), ("", False)])
async def test_request_ids(offered: str | bytes, kept: bool) -> None:
    gw = make_gateway()
    gw.control.on("GET", VMS, 200, PAGE)
    resp = await gw.http.get("/api/v1/vms", headers={**BEARER, "X-Request-Id": offered})
    echoed = resp.headers["X-Request-Id"]
    if kept:
        assert echoed == offered
    else:
        assert len(echoed) == 32 and int(echoed, 16) >= 0
    [seen] = gw.control.calls()
    assert seen.headers["x-yun-request-id"] == echoed
    # Errors carry it too.
    refused = await gw.http.get("/api/v1/vms", headers={"X-Request-Id": "err-1"})
    assert refused.status_code == 401 and refused.headers["X-Request-Id"] == "err-1"


def test_body_hash_helper_matches_signing() -> None:
    assert signing.EMPTY_SHA256 == hashlib.sha256(b"").hexdigest()
