"""What the gateway refuses before any route runs: big bodies, bad UTF-8, floods, and
the ``Allow`` header of every 405."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid

import pytest

from tests.problems import assert_problem
from tests.unit.test_gateway_harness import BEARER, chunks, make_gateway, vm_json
from yun.gateway.limits import LOGIN_BURST, LOGIN_RATE, TokenBuckets

MIB = 1 << 20
PAGE = {"items": [], "limit": 100, "offset": 0}




async def test_an_announced_100_mib_body_is_refused_unread() -> None:
    gw = make_gateway()
    pulled = [0]
    resp = await gw.http.post(
        "/api/v1/vms", content=chunks(100 * MIB, counter=pulled),
        headers={**BEARER, "Content-Type": "application/json",
                 "Content-Length": str(100 * MIB)})
    assert_problem(resp, 413, f"request body larger than {MIB} bytes")
    assert pulled[0] == 0
    assert gw.control.seen == []  # refused before authentication costs anything


async def test_a_chunked_100_mib_body_is_refused_after_1_mib() -> None:
    gw = make_gateway()
    pulled = [0]
    resp = await gw.http.post("/api/v1/vms", content=chunks(100 * MIB, counter=pulled),
                              headers={**BEARER, "Content-Type": "application/json"})
    assert_problem(resp, 413, f"request body larger than {MIB} bytes")
    assert pulled[0] <= MIB + 64 * 1024
    assert gw.control.seen == []


async def test_the_limit_is_configurable_and_bodies_below_it_pass() -> None:
    gw = make_gateway(max_json_body=4096)
    gw.control.on("POST", "/internal/v1/vms", 202, {"task": None, "resource": vm_json()})
    body = {"name": "web", "image": "debian", "description": "d" * 1000}
    assert (await gw.http.post("/api/v1/vms", json=body, headers=BEARER)).status_code == 202
    body["description"] = "d" * 5000
    assert_problem(await gw.http.post("/api/v1/vms", json=body, headers=BEARER), 413,
                   "larger than 4096 bytes")


async def test_image_uploads_are_not_limited_to_1_mib() -> None:
    gw = make_gateway()
    # 2 MiB is not refused by size: the route itself answers (the name is missing).
    resp = await gw.http.post("/api/v1/images", content=b"x" * (2 * MIB), headers=BEARER)
    assert resp.status_code == 422, resp.text


@pytest.mark.parametrize(("path", "where"), [
    ("/api/v1/vms/%FF", "the path"),
    ("/api/v1/vms/%C3%28/console", "the path"),
    ("/api/v1/vms?q=%FF", "the query string"),
    ("/api/v1/vms?%E2%82=1", "the query string"),
])
async def test_invalid_utf8_in_the_request_line_is_400(path: str, where: str) -> None:
    gw = make_gateway()
    resp = await gw.http.get(path, headers=BEARER)
    assert_problem(resp, 400, f"{where} is not valid UTF-8")
    assert gw.control.seen == []


async def test_invalid_utf8_in_a_json_body_is_400() -> None:
    gw = make_gateway()
    resp = await gw.http.post("/api/v1/vms", content=b'{"name": "\xff\xfe", "image": "x"}',
                              headers={**BEARER, "Content-Type": "application/json"})
    assert_problem(resp, 400, "the request body is not valid UTF-8")
    assert gw.control.seen == []


async def test_a_user_over_the_rate_gets_429_with_retry_after() -> None:
    gw = make_gateway(rate_limit=0.5, rate_burst=3)
    gw.control.on("GET", "/internal/v1/vms", 200, PAGE)
    # The first request is counted against the address (the user is not known yet).
    codes = [(await gw.http.get("/api/v1/vms", headers=BEARER)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 200]
    resp = await gw.http.get("/api/v1/vms", headers=BEARER)
    assert_problem(resp, 429, "more than 0.5 requests per second")
    assert resp.headers["Retry-After"] == "2"
    # Another user behind the same address has a bucket of their own.
    other = "tok-bob"
    gw.control.tokens[other] = gw.control.tokens["tok-alice"].model_copy(update={
        "context": gw.control.tokens["tok-alice"].context.model_copy(
            update={"user_uuid": str(uuid.uuid4())})})
    bob = {"Authorization": f"Bearer {other}"}
    assert (await gw.http.get("/api/v1/vms", headers=bob)).status_code == 200


async def test_logins_have_a_tight_bucket_per_address() -> None:
    gw = make_gateway()
    login = {"username": "alice", "password": "guess"}
    # The bucket refills at LOGIN_RATE while the attempts are sent: on a loaded machine
    # the burst takes long enough to earn a few more (CI once saw the 21st pass).
    started = time.monotonic()
    codes: list[int] = []
    for _ in range(LOGIN_BURST + 100):  # bounded: 100 more take ≥ 20 s to earn
        codes.append((await gw.http.post("/api/v1/auth/tokens", json=login)).status_code)
        if codes[-1] == 429:
            break
    earned = math.ceil((time.monotonic() - started) * LOGIN_RATE)
    assert codes[-1] == 429, codes
    passed = len(codes) - 1
    assert set(codes[:passed]) == {404}  # the stub knows no login route
    assert LOGIN_BURST <= passed <= LOGIN_BURST + earned, (passed, earned)


async def test_rate_limit_zero_disables_it() -> None:
    gw = make_gateway(rate_limit=0)
    login = {"username": "alice", "password": "guess"}
    codes = {(await gw.http.post("/api/v1/auth/tokens", json=login)).status_code
             for _ in range(LOGIN_BURST + 5)}
    assert codes == {404}


def test_token_buckets_refill_at_the_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("k") == pytest.approx(0.5)
    now[0] = 0.5
    assert buckets.take("k") == 0.0
    small = TokenBuckets(rate=1.0, burst=1, maxsize=2, clock=lambda: now[0])
    for key in ("a", "b", "c"):
        small.take(key)
    assert small.take("a") == 0.0  # forgotten (bounded), so full again


async def test_every_405_carries_allow_with_all_methods_of_the_path() -> None:
    # One request per path and missing method: more than the default burst allows.
    gw = make_gateway(rate_burst=100_000)
    spec = (await gw.http.get("/openapi.json")).json()
    samples = {"{ref}": "web-1", "{token_uuid}": str(uuid.uuid4()),
               "{assignment_uuid}": str(uuid.uuid4()), "{task_uuid}": str(uuid.uuid4())}
    # A literal path beside a template (POST /images/from-vm beside /images/{ref}): the
    # template's methods reach the template (an image named "from-vm"), not a 405.
    templates = [(re.compile(re.sub(r"\{[^}]+\}", "[^/]+", t)), {m.upper() for m in item})
                 for t, item in spec["paths"].items()]
    checked = 0
    for template in spec["paths"]:
        path = template
        for placeholder, value in samples.items():
            path = path.replace(placeholder, value)
        served = set().union(*(methods for pattern, methods in templates
                               if pattern.fullmatch(path)))
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - served:
            resp = await gw.http.request(method, path, headers=BEARER)
            assert resp.status_code == 405, (method, path, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.headers["Allow"] == ", ".join(sorted(served)), (method, path)
            checked += 1
    assert checked > 100
    assert gw.control.seen == []


async def test_concurrent_uploads_and_limits_do_not_block_each_other() -> None:
    gw = make_gateway()
    gw.control.on("GET", "/internal/v1/vms", 200, PAGE)
    big = gw.http.post("/api/v1/vms", content=chunks(10 * MIB),
                       headers={**BEARER, "Content-Type": "application/json"})
    small = gw.http.get("/api/v1/vms", headers=BEARER)
    refused, listed = await asyncio.gather(big, small)
    assert (refused.status_code, listed.status_code) == (413, 200)
