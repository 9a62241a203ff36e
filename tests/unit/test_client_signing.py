"""The SDK's credentials: key-pair signatures the gateway can verify from the wire alone,
and bearer tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yun.client import AsyncClient, Client, KeyPairAuth, TokenAuth
from yun.proto import signing

ACCESS, SECRET = "AKTEST0123456789", "s3cret-of-the-key"
NOW = "2026-01-01T00:00:00Z"
IMAGE = {"uuid": "i1", "name": "img", "created_at": NOW, "updated_at": NOW, "status": "active"}


def verify_as_gateway(request: httpx.Request, secret: str = SECRET) -> str:
    """Check a request the way the gateway does, from the bytes on the wire only: the
    request target (path and raw query) and the body. Returns the body hash header."""
    target = request.url.raw_path
    path, _, raw_query = target.partition(b"?")
    query = parse_qsl(raw_query.decode("ascii"), keep_blank_values=True)
    parsed = signing.parse_authorization(request.headers["Authorization"])
    assert parsed is not None, request.headers["Authorization"]
    access_key, sig = parsed
    assert access_key == ACCESS
    date = request.headers[signing.DATE_HEADER]
    when = signing.parse_date(date)
    assert when is not None and abs(when - datetime.now(UTC)) < timedelta(minutes=1)
    digest = request.headers[signing.CONTENT_HEADER]
    if digest != signing.UNSIGNED_PAYLOAD:
        assert digest == hashlib.sha256(request.read()).hexdigest()
    expected = signing.signature(secret, request.method, path.decode("ascii"), query, date,
                                 digest)
    assert sig == expected
    return digest


class Recorder:
    """A transport that keeps every request and answers a fixed JSON."""

    def __init__(self, answer: object, status: int = 200) -> None:
        self.requests: list[httpx.Request] = []
        self.answer, self.status = answer, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if request.method == "POST" and request.url.path.endswith("/images"):
            return httpx.Response(201, json=IMAGE)
        return httpx.Response(self.status, json=self.answer)


def page(items: list[object] | None = None) -> dict[str, object]:
    return {"items": items or [], "limit": 100}


def test_a_list_with_an_awkward_query_verifies_from_the_wire() -> None:
    rec = Recorder(page())
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))
    client.vms.list(q="name like 'web %' and tag:équipe=nuit+jour", sort="-created_at,name",
                    cursor="a/b=c&d")
    request = rec.requests[0]
    assert verify_as_gateway(request) == signing.EMPTY_SHA256
    # Spaces, '+', '/', '&' and non-ASCII are all escaped on the wire.
    assert b" " not in request.url.raw_path and b"&d" not in request.url.raw_path


def test_repeated_keys_and_a_quoted_path_verify() -> None:
    rec = Recorder(page())
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))
    client.request("GET", "/vms/we%20b%2F1/console-log",
                   params={"k": "z", "a": "2"})
    client.http.get("/audit", params=[("k", "2"), ("k", "1"), ("k", ""), ("é", "ü ü")])
    for request in rec.requests:
        verify_as_gateway(request)
    # The signed path is the percent-encoded one, not a decoded spelling of it.
    assert rec.requests[0].url.raw_path.startswith(b"/api/v1/vms/we%20b%2F1/")


def test_a_json_body_is_signed_by_its_hash() -> None:
    rec = Recorder({"uuid": "d", "name": "x", "created_at": NOW, "updated_at": NOW})
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))
    from yun.proto.identity import DepartmentCreate

    client.departments.create(DepartmentCreate(name="research", description="ünï"))
    digest = verify_as_gateway(rec.requests[0])
    assert digest == hashlib.sha256(rec.requests[0].content).hexdigest()
    assert digest != signing.EMPTY_SHA256


def test_a_tampered_request_does_not_verify() -> None:
    rec = Recorder(page())
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))
    client.vms.list(q="state=running")
    request = rec.requests[0]
    forged = httpx.Request("GET", str(request.url).replace("running", "stopped"),
                           headers=request.headers)
    with pytest.raises(AssertionError):
        verify_as_gateway(forged)
    with pytest.raises(AssertionError):
        verify_as_gateway(request, secret="another secret")


def test_a_streamed_upload_is_unsigned_payload_and_bytes_are_hashed() -> None:
    rec = Recorder(page())
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))

    def chunks() -> Iterator[bytes]:
        yield b"QFI\xfb"
        yield b"\x00" * 100

    client.images.upload(chunks(), "img")
    client.images.upload(b"raw bytes", "img", "raw")
    streamed, whole = rec.requests
    assert verify_as_gateway(streamed) == signing.UNSIGNED_PAYLOAD
    assert streamed.content == b"QFI\xfb" + b"\x00" * 100
    assert verify_as_gateway(whole) == hashlib.sha256(b"raw bytes").hexdigest()


def test_identical_requests_never_share_a_signature() -> None:
    # The gateway accepts each signature once: the second of two identical requests in
    # the same second must wait for a new date rather than be refused as a replay.
    rec = Recorder(page())
    client = Client("http://gw", KeyPairAuth(ACCESS, SECRET), transport=httpx.MockTransport(rec))
    client.vms.list()
    client.vms.list()
    first, second = (r.headers["Authorization"] for r in rec.requests)
    assert first != second
    for request in rec.requests:
        verify_as_gateway(request)


async def test_the_async_client_signs_the_same_way() -> None:
    rec = Recorder(page())
    async with AsyncClient("http://gw", KeyPairAuth(ACCESS, SECRET),
                           transport=httpx.MockTransport(rec)) as client:
        await client.vms.list(q="tag:env in (prod, 'a b')")
        await client.images.upload(iter([b"abc", b"def"]), "img")
    verify_as_gateway(rec.requests[0])
    assert verify_as_gateway(rec.requests[1]) == signing.UNSIGNED_PAYLOAD
    assert rec.requests[1].content == b"abcdef"


def test_a_token_is_a_bearer_header() -> None:
    rec = Recorder(page())
    client = Client("http://gw", TokenAuth("tok-1"), transport=httpx.MockTransport(rec))
    client.vms.list()
    assert rec.requests[0].headers["Authorization"] == "Bearer tok-1"
    assert signing.DATE_HEADER not in rec.requests[0].headers


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=12)),
                      max_size=6))
def test_any_query_verifies_from_the_wire(pairs: list[tuple[str, str]]) -> None:
    # Surrogates cannot be sent as UTF-8: everything else can.
    pairs = [(k, v) for k, v in pairs
             if not any(0xD800 <= ord(c) <= 0xDFFF for c in k + v)]
    rec = Recorder(page())
    auth = KeyPairAuth(ACCESS, SECRET)
    with Client("http://gw", auth, transport=httpx.MockTransport(rec)) as client:
        params: list[tuple[str, str | int | float | bool | None]] = [*pairs]
        client.http.get("/vms", params=params)
    verify_as_gateway(rec.requests[0])
