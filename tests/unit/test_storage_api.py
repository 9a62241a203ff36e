"""The Storage Server's HTTP API, through the real FastAPI app (httpx ASGITransport)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from yun.node.storage.local import LocalDiskBackend
from yun.proto import PROTOCOL_VERSION, VERSION_HEADER
from yun.proto.auth import Signer, Verifier, issue_credential
from yun.proto.client import SigningAuth
from yun.proto.errors import BadRequest, Unavailable
from yun.proto.messages import ImageLocation, StorageImageReport
from yun.storage.api import create_storage_app
from yun.storage.store import ImageStore
from yun.util.run import run

CA_KEY = Ed25519PrivateKey.generate()
MIB = 1024 * 1024


def signer(component_type: str, ca_key: Ed25519PrivateKey = CA_KEY) -> Signer:
    """A member of the test domain of ``component_type`` (its own key, a CA credential)."""
    key = Ed25519PrivateKey.generate()
    return Signer(key, issue_credential(ca_key, f"{component_type}-1", component_type,
                                        key.public_key(), ttl=3600))


class ByRoute(httpx.Auth):
    """Signs each request as the component type that may make it: uploads as the gateway,
    downloads as a node, the rest as a control server (the storage server's route table)."""

    def __init__(self) -> None:
        self.signers = {t: SigningAuth(signer(t)) for t in ("gateway", "node", "control")}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        data = request.url.path.endswith("/data")
        kind = ("gateway" if request.method == "PUT" else "node") if data else "control"
        yield from self.signers[kind].auth_flow(request)


class Harness:
    def __init__(self, root: Path, max_upload_bytes: int = 64 * MIB,
                 publish_dir: Path | None = None) -> None:
        self.root = root
        self.store = ImageStore(root, publish_dir=publish_dir)
        self.stored: list[StorageImageReport] = []
        self.fail_announce = False

        async def on_stored(report: StorageImageReport) -> None:
            if self.fail_announce:
                raise Unavailable("no control server recorded the image")
            self.stored.append(report)

        verifier = Verifier(lambda: ["storage"], CA_KEY.public_key())
        self.app = create_storage_app(self.store, verifier, on_stored, max_upload_bytes,
                                      mode="shared" if publish_dir else "local")
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://storage",
            headers={VERSION_HEADER: str(PROTOCOL_VERSION)}, auth=ByRoute(),
        )

    def leftovers(self) -> list[str]:
        return sorted(p.name for d in ("tmp", "images", "uploads")
                      for p in (self.root / d).iterdir())


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    await harness.client.aclose()


@pytest.fixture
def qcow2(tmp_path: Path) -> bytes:
    path = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"])
    return path.read_bytes()


def data_url(image_id: str) -> str:
    return f"/internal/v1/images/{image_id}/data"


async def chunks(data: bytes, size: int = 7000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- upload ---------------------------------------------------------------------


async def test_healthz_needs_no_credential(h: Harness) -> None:
    resp = await h.client.get("/healthz", headers={"Authorization": ""})
    assert resp.status_code == 200


async def test_routes_need_a_credential(h: Harness) -> None:
    unsigned = httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app),
                                 base_url="http://storage")
    async with unsigned:
        resp = await unsigned.get("/internal/v1/images")
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"
    other_domain = SigningAuth(signer("control", Ed25519PrivateKey.generate()))
    resp = await h.client.get("/internal/v1/images", auth=other_domain)
    assert resp.status_code == 401


@pytest.mark.parametrize(("component_type", "method", "path"), [
    ("node", "DELETE", "/internal/v1/images/{id}"),
    ("node", "GET", "/internal/v1/images/{id}/upload"),
    ("node", "GET", "/internal/v1/images"),
    ("gateway", "DELETE", "/internal/v1/images/{id}"),
    ("gateway", "GET", "/internal/v1/images/{id}/data"),
    ("control", "PUT", "/internal/v1/images/{id}/data"),
    ("storage", "GET", "/internal/v1/images/{id}/data"),
])
async def test_each_route_admits_only_its_component_types(
        h: Harness, component_type: str, method: str, path: str) -> None:
    """A node can read images and store an exported volume, but never delete one or
    list them; a gateway only uploads."""
    url = path.format(id=uuid.uuid4())
    resp = await h.client.request(method, url, content=b"x" if method == "PUT" else None,
                                  auth=SigningAuth(signer(component_type)))
    assert resp.status_code == 403, resp.text
    assert f"a {component_type} component may not call" in resp.json()["detail"]


async def test_upload_qcow2_streams_and_reports(h: Harness, qcow2: bytes) -> None:
    image_id = str(uuid.uuid4())
    resp = await h.client.put(
        data_url(image_id), params={"name": "debian-12"}, content=chunks(qcow2)
    )
    assert resp.status_code == 201, resp.text
    report = StorageImageReport.model_validate(resp.json())
    assert report == StorageImageReport(
        image_id=image_id, size=len(qcow2), sha256=hashlib.sha256(qcow2).hexdigest(),
        format="qcow2", virtual_size=1024**3,
    )
    assert h.stored == [report]
    assert (h.root / "images" / image_id).read_bytes() == qcow2
    assert list((h.root / "tmp").iterdir()) == []

    meta = (await h.client.get(f"/internal/v1/images/{image_id}")).json()
    assert meta["name"] == "debian-12" and meta["sha256"] == report.sha256
    listed = (await h.client.get("/internal/v1/images")).json()
    assert [m["id"] for m in listed] == [image_id]


async def test_a_node_uploads_the_copy_of_a_volume(h: Harness, qcow2: bytes) -> None:
    """A node stores the copy of a volume it exports as a host image (F-IMAGE)."""
    image_id = str(uuid.uuid4())
    resp = await h.client.put(data_url(image_id), params={"format": "qcow2"},
                              content=qcow2, auth=SigningAuth(signer("node")))
    assert resp.status_code == 201, resp.text
    assert StorageImageReport.model_validate(resp.json()).format == "qcow2"
    assert [r.image_id for r in h.stored] == [image_id]


async def test_upload_is_idempotent_and_conflicts_on_other_content(
    h: Harness, qcow2: bytes
) -> None:
    image_id = str(uuid.uuid4())
    assert (await h.client.put(data_url(image_id), content=qcow2)).status_code == 201
    again = await h.client.put(data_url(image_id), content=qcow2)
    assert again.status_code == 200
    assert again.json()["sha256"] == hashlib.sha256(qcow2).hexdigest()
    other = os.urandom(MIB)
    resp = await h.client.put(data_url(image_id), params={"format": "raw"}, content=other)
    assert resp.status_code == 409
    assert "already exists with different content" in resp.json()["detail"]
    assert (h.root / "images" / image_id).read_bytes() == qcow2
    assert list((h.root / "tmp").iterdir()) == []


async def test_non_image_is_refused_and_nothing_left(h: Harness) -> None:
    image_id = str(uuid.uuid4())
    resp = await h.client.put(data_url(image_id), content=b"<html>not found</html>\n" * 100)
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["detail"] == (
        "not a disk image: qemu-img found no image format "
        "(declare format=raw to upload a raw disk)"
    )
    assert h.leftovers() == []
    assert h.stored == []
    assert (await h.client.get(f"/internal/v1/images/{image_id}")).status_code == 404


async def test_declared_mismatch_is_refused(h: Harness, qcow2: bytes) -> None:
    resp = await h.client.put(
        data_url(str(uuid.uuid4())), params={"format": "vmdk"}, content=qcow2
    )
    assert resp.status_code == 422
    assert resp.json()["detail"] == "declared vmdk but the file is qcow2"
    assert h.leftovers() == []


async def test_raw_upload_when_declared(h: Harness) -> None:
    data = os.urandom(2 * MIB)
    image_id = str(uuid.uuid4())
    resp = await h.client.put(data_url(image_id), params={"format": "raw"}, content=data)
    assert resp.status_code == 201
    assert resp.json()["format"] == "raw"
    assert resp.json()["virtual_size"] == 2 * MIB


async def test_upload_over_the_limit_is_refused(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "small", max_upload_bytes=MIB)
    try:
        data = os.urandom(2 * MIB)
        # Announced length: refused before reading.
        resp = await harness.client.put(
            data_url(str(uuid.uuid4())), params={"format": "raw"}, content=data
        )
        assert resp.status_code == 413
        # Streamed without a length: refused once the limit is crossed.
        resp = await harness.client.put(
            data_url(str(uuid.uuid4())), params={"format": "raw"}, content=chunks(data, 65536)
        )
        assert resp.status_code == 413
        assert "exceeds the limit" in resp.json()["detail"]
        assert harness.leftovers() == []
    finally:
        await harness.client.aclose()


async def test_failed_announcement_fails_the_upload_and_a_retry_announces(
    h: Harness, qcow2: bytes
) -> None:
    image_id = str(uuid.uuid4())
    h.fail_announce = True
    resp = await h.client.put(data_url(image_id), content=qcow2)
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/problem+json"
    assert h.stored == []
    h.fail_announce = False
    resp = await h.client.put(data_url(image_id), content=qcow2)
    assert resp.status_code == 200
    assert [r.image_id for r in h.stored] == [image_id]


@pytest.mark.parametrize(
    "bad_id",
    ["not-a-uuid", "..", "...", "%2E%2E", uuid.uuid4().hex, str(uuid.uuid4()).upper(),
     "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"],
)
async def test_path_traversal_ids_are_refused(h: Harness, bad_id: str) -> None:
    for method, url in (
        ("PUT", data_url(bad_id)),
        ("GET", data_url(bad_id)),
        ("GET", f"/internal/v1/images/{bad_id}"),
        ("DELETE", f"/internal/v1/images/{bad_id}"),
    ):
        resp = await h.client.request(
            method, url, params={"format": "raw"}, content=b"\0" * 512 if method == "PUT" else None
        )
        assert 400 <= resp.status_code < 500 and resp.status_code != 409, (method, url)
    assert h.leftovers() == []
    assert sorted(p.name for p in h.root.iterdir()) == ["images", "tmp", "uploads"]


# --- download -------------------------------------------------------------------


async def test_download_whole_and_ranges(h: Harness) -> None:
    data = os.urandom(3 * MIB + 512)
    image_id = str(uuid.uuid4())
    await h.client.put(data_url(image_id), params={"format": "raw"}, content=data)
    sha = hashlib.sha256(data).hexdigest()

    whole = await h.client.get(data_url(image_id))
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["etag"] == f'"{sha}"'
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["accept-ranges"] == "bytes"

    tail = await h.client.get(data_url(image_id), headers={"Range": "bytes=1000000-"})
    assert tail.status_code == 206
    assert tail.content == data[1000000:]
    assert tail.headers["content-range"] == f"bytes 1000000-{len(data) - 1}/{len(data)}"
    assert tail.headers["content-length"] == str(len(data) - 1000000)

    middle = await h.client.get(data_url(image_id), headers={"Range": "bytes=10-19"})
    assert (middle.status_code, middle.content) == (206, data[10:20])
    suffix = await h.client.get(data_url(image_id), headers={"Range": "bytes=-100"})
    assert (suffix.status_code, suffix.content) == (206, data[-100:])
    past = await h.client.get(data_url(image_id), headers={"Range": "bytes=5-999999999"})
    assert past.content == data[5:]


@pytest.mark.parametrize("bad", ["bytes=999999999-", "bytes=20-10", "bytes=0-1,5-6", "lines=1-2",
                                 "bytes=-0", "bytes=-"])
async def test_bad_ranges_answer_416(h: Harness, bad: str) -> None:
    data = os.urandom(MIB)
    image_id = str(uuid.uuid4())
    await h.client.put(data_url(image_id), params={"format": "raw"}, content=data)
    resp = await h.client.get(data_url(image_id), headers={"Range": bad})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{MIB}"
    assert resp.headers["content-type"] == "application/problem+json"


async def test_download_of_missing_image_is_404(h: Harness) -> None:
    resp = await h.client.get(data_url(str(uuid.uuid4())))
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/problem+json"


# --- delete ---------------------------------------------------------------------


async def test_delete_is_idempotent(h: Harness, qcow2: bytes) -> None:
    image_id = str(uuid.uuid4())
    await h.client.put(data_url(image_id), content=qcow2)
    assert (await h.client.delete(f"/internal/v1/images/{image_id}")).status_code == 204
    assert (await h.client.delete(f"/internal/v1/images/{image_id}")).status_code == 204
    assert (await h.client.get(f"/internal/v1/images/{image_id}")).status_code == 404
    assert (await h.client.get("/internal/v1/images")).json() == []
    assert h.leftovers() == []


async def test_store_sweeps_unfinished_uploads(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / f"{uuid.uuid4()}.deadbeef").write_bytes(b"half an image")
    ImageStore(root)
    assert list((root / "tmp").iterdir()) == []


@pytest.mark.parametrize("bad_id", ["../images/x", "/etc/passwd", "", "a/b", "..", "\0"])
def test_store_refuses_ids_that_are_not_uuids(tmp_path: Path, bad_id: str) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(BadRequest, match="invalid image id"):
        store.data_path(bad_id)
    with pytest.raises(BadRequest):
        store.get(bad_id)
    with pytest.raises(BadRequest):
        store.open_range(bad_id)


# --- shared mode (F-STO-MODEL) -----------------------------------------------------


async def test_shared_mode_keeps_images_where_shared_pools_nodes_use_them(
        tmp_path: Path, qcow2: bytes) -> None:
    """A storage server in shared mode keeps its store on the shared mount and links
    each image into the mount's images/ with its checksum: a node of a shared pool finds
    it there, verified, and fetches nothing (its storage server URL is unreachable)."""
    mount = tmp_path / "shared"
    h = Harness(mount / "storage-server", publish_dir=mount / "images")
    try:
        assert (await h.client.get("/internal/v1/info")).json() == {"mode": "shared"}
        image_id = str(uuid.uuid4())
        resp = await h.client.put(data_url(image_id), content=qcow2)
        assert resp.status_code == 201, resp.text
        report = StorageImageReport.model_validate(resp.json())
        published = mount / "images" / f"{image_id}.qcow2"
        assert published.stat().st_ino == h.store.data_path(image_id).stat().st_ino
        node = LocalDiskBackend(tmp_path / "node", shared_storage=mount, owner=None)
        try:
            where = ImageLocation(image_id=image_id, url="https://127.0.0.1:9/nowhere",
                                  sha256=report.sha256, size=report.size, format="qcow2")
            assert await node.ensure_image(where, None, shared=True) == published
        finally:
            await node.aclose()
        # Deleted from the store, it is gone from the mount too.
        assert (await h.client.delete(f"/internal/v1/images/{image_id}")).status_code == 204
        assert [p.name for p in (mount / "images").iterdir()
                if not p.name.endswith(".lock")] == []
    finally:
        await h.client.aclose()


async def test_an_image_stored_before_the_mode_was_shared_is_published_at_start(
        tmp_path: Path, qcow2: bytes) -> None:
    mount = tmp_path / "shared"
    h = Harness(mount / "storage-server")
    image_id = str(uuid.uuid4())
    try:
        assert (await h.client.get("/internal/v1/info")).json() == {"mode": "local"}
        assert (await h.client.put(data_url(image_id), content=qcow2)).status_code == 201
    finally:
        await h.client.aclose()
    ImageStore(mount / "storage-server", publish_dir=mount / "images")
    assert (mount / "images" / f"{image_id}.qcow2").read_bytes() == qcow2
    assert (mount / "images" / f"{image_id}.qcow2.sha256").read_text().strip() == \
        hashlib.sha256(qcow2).hexdigest()
