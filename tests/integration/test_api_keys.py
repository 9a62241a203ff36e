"""API key pairs through the real gateway and control server, with the SDK: a signed
request works; a wrong signature, an old date, a replay and a disabled or rotated key
are refused with a clear 401."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio

from yun.client import ApiError, AsyncClient, KeyPairAuth, TokenAuth
from yun.proto import signing
from yun.proto.identity import ApiKeyCreate, ApiKeyUpdate
from yun.testing.cluster import SimCluster

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimCluster]:
    # No token cache: a disabled key must be refused at once in these tests.
    c = SimCluster(tmp_path_factory.mktemp("keys"), nodes=1,
                   gateway_options={"auth_cache_ttl": 0})
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def _signed(key: str, secret: str, path: str, when: datetime | None = None,
            params: dict[str, str] | None = None) -> dict[str, str]:
    return signing.sign_headers(key, secret, "GET", path, sorted((params or {}).items()),
                                b"", when)


async def test_signed_requests(cluster: SimCluster) -> None:
    assert cluster.gateway is not None
    url = cluster.gateway.url
    async with AsyncClient(url, TokenAuth(cluster.token)) as admin:
        issued = await admin.keys.create(ApiKeyCreate(name="ci"))
        listed = await admin.keys.list()
    assert issued.secret and issued.access_key.startswith("YK")
    # Listed keys never carry their secret: it is shown once, when made or rotated.
    assert issued.secret not in listed.model_dump_json()

    # The SDK signs every request; the gateway knows whose key it is.
    async with AsyncClient(url, KeyPairAuth(issued.access_key, issued.secret)) as keyed:
        who = await keyed.auth.whoami()
        assert who.auth == "key" and who.user_name == "admin"
        page = await keyed.vms.list(q="state=running", limit=5)
        assert page.items == []

    async with httpx.AsyncClient(base_url=url) as http:
        path = "/api/v1/vms"
        # Wrong secret.
        resp = await http.get(path, headers=_signed(issued.access_key, "not-the-secret", path))
        assert resp.status_code == 401 and "signature" in resp.json()["detail"]
        # A date ten minutes old.
        old = datetime.now(UTC) - timedelta(minutes=10)
        resp = await http.get(path, headers=_signed(issued.access_key, issued.secret, path,
                                                     old))
        assert resp.status_code == 401 and "date" in resp.json()["detail"].lower()
        # The same signed request twice: the second is a replay.
        headers = _signed(issued.access_key, issued.secret, path, params={"limit": "7"})
        first = await http.get(path, params={"limit": "7"}, headers=headers)
        assert first.status_code == 200, first.text
        again = await http.get(path, params={"limit": "7"}, headers=headers)
        assert again.status_code == 401 and "replay" in again.json()["detail"].lower()
        # A signature over another query does not cover this one.
        headers = _signed(issued.access_key, issued.secret, path, params={"limit": "8"})
        resp = await http.get(path, params={"limit": "9"}, headers=headers)
        assert resp.status_code == 401
        # A body that is not the one signed.
        body = b'{"name": "x", "image": "y"}'
        headers = signing.sign_headers(issued.access_key, issued.secret, "POST", path, [],
                                       b'{"name": "z", "image": "y"}')
        resp = await http.post(path, content=body,
                               headers={**headers, "Content-Type": "application/json"})
        assert resp.status_code == 401, resp.text
        assert hashlib.sha256(body).hexdigest() not in resp.text

    # Disabled, then rotated: refused with what happened.
    async with AsyncClient(url, TokenAuth(cluster.token)) as admin:
        await admin.keys.update(issued.uuid, ApiKeyUpdate(enabled=False))
    async with AsyncClient(url, KeyPairAuth(issued.access_key, issued.secret)) as keyed:
        with pytest.raises(ApiError) as refused:
            await keyed.vms.list()
        assert refused.value.status == 401 and "disabled" in refused.value.detail
    async with AsyncClient(url, TokenAuth(cluster.token)) as admin:
        await admin.keys.update(issued.uuid, ApiKeyUpdate(enabled=True))
        rotated = await admin.keys.rotate(issued.uuid)
    assert rotated.secret != issued.secret
    async with AsyncClient(url, KeyPairAuth(issued.access_key, issued.secret)) as keyed:
        with pytest.raises(ApiError) as refused:
            await keyed.vms.list()
        assert refused.value.status == 401
    async with AsyncClient(url, KeyPairAuth(rotated.access_key, rotated.secret)) as keyed:
        assert (await keyed.vms.list()).items == []


async def test_unknown_key_and_malformed_authorization(cluster: SimCluster) -> None:
    assert cluster.gateway is not None
    async with httpx.AsyncClient(base_url=cluster.gateway.url) as http:
        headers = _signed("YKDOESNOTEXIST00", "whatever", "/api/v1/vms")
        resp = await http.get("/api/v1/vms", headers=headers)
        assert resp.status_code == 401 and "YKDOESNOTEXIST00" in resp.json()["detail"]
        for auth in ("YUN1-HMAC-SHA256 Credential=x", "Basic abc", "Bearer", ""):
            resp = await http.get("/api/v1/vms", headers={"Authorization": auth})
            assert resp.status_code == 401, (auth, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
