"""LocalDiskBackend against a real storage server (uvicorn on 127.0.0.1, own thread)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from yun.node.storage.base import DiskError, ImageAccess
from yun.node.storage.local import LocalDiskBackend
from yun.proto.auth import Signer, Verifier, issue_credential
from yun.proto.client import SigningAuth
from yun.proto.components import ComponentType
from yun.proto.messages import CloudInitSpec, DiskSpec, ImageLocation, legacy_volume_id
from yun.storage.api import create_storage_app
from yun.storage.store import ImageStore
from yun.util import qemu_img
from yun.util.run import run

CA_KEY = Ed25519PrivateKey.generate()


def signing(component_type: ComponentType) -> SigningAuth:
    key = Ed25519PrivateKey.generate()
    return SigningAuth(Signer(key, issue_credential(
        CA_KEY, f"{component_type}-1", component_type.value, key.public_key(), ttl=3600)))
MIB = 1024 * 1024
GIB = 1024**3
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class Recorder:
    """ASGI wrapper that records image downloads and can cut one off mid-body."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.ranges: list[str | None] = []
        self.cut_after: int | None = None

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].endswith(
            "/data"
        ):
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.ranges.append(headers.get("range"))
        cut, self.cut_after = self.cut_after, None
        if cut is None:
            await self.app(scope, receive, send)
            return
        sent = 0

        async def cutting_send(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) > cut:
                    await send({**message, "body": body[: cut - sent], "more_body": True})
                    # Dropping the connection mid-body, as a network failure would.
                    raise ConnectionAbortedError("connection cut by the test")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, cutting_send)


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 (random port) in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Env:
    def __init__(self, tmp_path: Path, server: ThreadServer, recorder: Recorder) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.recorder = recorder
        self.credential = ImageAccess(signing(ComponentType.NODE))
        self.backend = LocalDiskBackend(tmp_path / "node", http_timeout=10, owner=OWNER)

    async def upload(self, data: bytes, fmt: str = "") -> ImageLocation:
        image_id = str(uuid.uuid4())
        url = f"{self.server.url}/internal/v1/images/{image_id}/data"
        async with httpx.AsyncClient(auth=signing(ComponentType.GATEWAY)) as client:
            resp = await client.put(url, params={"format": fmt}, content=data)
        assert resp.status_code == 201, resp.text
        report = resp.json()
        return ImageLocation(
            image_id=image_id, url=url, sha256=report["sha256"], size=report["size"],
            format=report["format"],
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ThreadServer, Recorder]]:
    store = ImageStore(tmp_path / "storage")
    audience: list[str] = []
    verifier = Verifier(lambda: audience, CA_KEY.public_key())
    recorder = Recorder(create_storage_app(store, verifier, None, 256 * MIB))
    with ThreadServer(recorder) as srv:
        audience.append(f"127.0.0.1:{srv.port}")
        yield srv, recorder


@pytest.fixture
async def env(tmp_path: Path, server: tuple[ThreadServer, Recorder]) -> AsyncIterator[Env]:
    e = Env(tmp_path, *server)
    yield e
    await e.backend.aclose()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Stands for the user QEMU runs as (nobody): chown needs root, as a node agent has.
OWNER = (65534, 65534) if os.geteuid() == 0 else None


def owned_by_qemu(path: Path) -> bool:
    st = path.stat()
    return OWNER is None or (st.st_uid, st.st_gid) == OWNER


# --- image cache ----------------------------------------------------------------


async def test_image_is_downloaded_verified_and_cached(env: Env) -> None:
    data = os.urandom(3 * MIB)
    loc = await env.upload(data, "raw")
    await env.backend.ensure_image(loc, env.credential)
    cached = env.backend.image_path(loc.image_id, "raw")
    assert cached.read_bytes() == data
    assert env.recorder.ranges == [None]
    # Private to QEMU's user (the backing file of every overlay), whatever the umask.
    assert mode(cached) == 0o600 and owned_by_qemu(cached)
    assert mode(cached.parent) == 0o700 and mode(env.backend.root) == 0o700
    assert owned_by_qemu(cached.parent) and owned_by_qemu(env.backend.root)
    assert not cached.with_name(cached.name + ".part").exists()

    await env.backend.ensure_image(loc, env.credential)
    assert env.recorder.ranges == [None], "a verified cached image is not fetched again"


async def test_interrupted_download_resumes_with_range(env: Env) -> None:
    data = os.urandom(3 * MIB)
    loc = await env.upload(data, "raw")
    env.recorder.cut_after = 1536 * 1024
    with pytest.raises(DiskError, match=rf"download of image {loc.image_id} interrupted"):
        await env.backend.ensure_image(loc, env.credential)
    cached = env.backend.image_path(loc.image_id, "raw")
    part = cached.with_name(cached.name + ".part")
    have = part.stat().st_size
    assert 0 < have <= 1536 * 1024
    assert part.read_bytes() == data[:have]
    assert not cached.exists()

    await env.backend.ensure_image(loc, env.credential)
    assert env.recorder.ranges == [None, f"bytes={have}-"]
    assert cached.read_bytes() == data
    assert not part.exists()


async def test_leftover_part_file_is_resumed(env: Env) -> None:
    data = os.urandom(2 * MIB + 4096)
    loc = await env.upload(data, "raw")
    cached = env.backend.image_path(loc.image_id, "raw")
    cached.with_name(cached.name + ".part").write_bytes(data[:MIB])
    await env.backend.ensure_image(loc, env.credential)
    assert env.recorder.ranges == [f"bytes={MIB}-"]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == loc.sha256


async def test_checksum_mismatch_discards_the_download(env: Env) -> None:
    data = os.urandom(MIB)
    loc = await env.upload(data, "raw")
    wrong = loc.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(DiskError, match=rf"image {loc.image_id}: sha256 .* does not match"):
        await env.backend.ensure_image(wrong, env.credential)
    assert list(env.backend.images_dir.iterdir()) == []


async def test_corrupt_part_file_is_caught_and_redownloaded(env: Env) -> None:
    data = os.urandom(2 * MIB)
    loc = await env.upload(data, "raw")
    cached = env.backend.image_path(loc.image_id, "raw")
    cached.with_name(cached.name + ".part").write_bytes(b"\xff" * MIB)  # not the image's bytes
    with pytest.raises(DiskError, match="does not match"):
        await env.backend.ensure_image(loc, env.credential)
    await env.backend.ensure_image(loc, env.credential)
    assert env.recorder.ranges == [f"bytes={MIB}-", None]
    assert cached.read_bytes() == data


async def test_concurrent_requests_download_once(env: Env) -> None:
    loc = await env.upload(os.urandom(4 * MIB), "raw")
    await asyncio.gather(*(env.backend.ensure_image(loc, env.credential) for _ in range(5)))
    assert env.recorder.ranges == [None]


async def test_download_without_credential_is_refused(env: Env) -> None:
    loc = await env.upload(os.urandom(MIB), "raw")
    with pytest.raises(DiskError, match="HTTP 401"):
        await env.backend.ensure_image(loc, None)


async def test_unreachable_storage_is_a_disk_error(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node", http_timeout=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    loc = ImageLocation(
        image_id=str(uuid.uuid4()), url=f"http://127.0.0.1:{port}/internal/v1/images/x/data",
        sha256="a" * 64, size=512, format="raw",
    )
    try:
        with pytest.raises(DiskError, match="interrupted after 0 bytes"):
            await backend.ensure_image(loc, None)
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    "update",
    [{"image_id": "../../etc"}, {"format": "dmg"}, {"sha256": "xyz"}, {"size": 0},
     {"url": "file:///etc/passwd"}],
)
async def test_invalid_locations_are_refused(tmp_path: Path, update: dict[str, Any]) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    loc = ImageLocation(
        image_id=str(uuid.uuid4()), url="http://127.0.0.1:1/x", sha256="a" * 64, size=512,
        format="raw",
    ).model_copy(update=update)
    with pytest.raises(DiskError):
        await backend.ensure_image(loc, None)


# --- volumes --------------------------------------------------------------------


def make_qcow2(tmp_path: Path, size: str) -> bytes:
    path = tmp_path / f"src-{size}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    return path.read_bytes()


def spec(size_gb: int = 1, **kw: Any) -> DiskSpec:
    return DiskSpec(disk_id=kw.pop("disk_id", "root"), size_gb=size_gb,
                    volume_id=str(uuid.uuid4()), **kw)


async def test_overlay_volumes_on_a_cached_image(env: Env) -> None:
    loc = await env.upload(make_qcow2(env.tmp_path, "2G"))
    await env.backend.ensure_image(loc, env.credential)
    base = env.backend.image_path(loc.image_id, "qcow2")

    small = spec(1, image_id=loc.image_id, image_sha256=loc.sha256, image_format="qcow2")
    disk = await env.backend.ensure_volume(small)
    assert disk.path == env.backend.root / "volumes" / f"{small.volume_id}.qcow2"
    assert (disk.format, disk.bus, disk.shared) == ("qcow2", "virtio", False)
    info = await qemu_img.info(disk.path)
    assert info.backing_file == str(base)
    assert info.backing_format == "qcow2"
    assert info.virtual_size == 2 * GIB, "never smaller than the image"
    assert mode(disk.path) == 0o600 and mode(disk.path.parent) == 0o700
    assert owned_by_qemu(disk.path) and owned_by_qemu(disk.path.parent)

    big = spec(5, disk_id="data", image_id=loc.image_id, image_format="qcow2", bus="sata")
    disk2 = await env.backend.ensure_volume(big)
    assert disk2.path is not None
    assert (await qemu_img.info(disk2.path)).virtual_size == 5 * GIB
    assert disk2.bus == "sata"
    # The second volume of the image did not fetch it again.
    await env.backend.ensure_image(loc, env.credential)
    assert len(env.recorder.ranges) == 1

    # Idempotent: the existing volume is returned untouched.
    before = disk.path.stat().st_mtime_ns
    again = await env.backend.ensure_volume(small)
    assert again == disk and disk.path.stat().st_mtime_ns == before

    await env.backend.delete_volume(str(small.volume_id))
    assert not disk.path.exists()
    await env.backend.delete_volume(str(small.volume_id))  # no error the second time
    assert await env.backend.volume_ids() == [big.volume_id]
    assert base.exists(), "deleting volumes keeps the cached image"


async def test_raw_image_overlay_records_raw_backing(env: Env) -> None:
    loc = await env.upload(os.urandom(MIB), "raw")
    await env.backend.ensure_image(loc, env.credential)
    disk = await env.backend.ensure_volume(
        spec(1, image_id=loc.image_id, image_format="raw"))
    assert disk.path is not None
    info = await qemu_img.info(disk.path)
    assert (info.backing_format, info.virtual_size) == ("raw", GIB)


async def test_a_full_copy_carries_the_image_and_stands_alone(env: Env) -> None:
    """F-BACKING off: the volume is the image copied whole, with no backing file, so
    the cached image may go (or break) and the volume still holds its data."""
    data = os.urandom(MIB)
    loc = await env.upload(data, "raw")
    await env.backend.ensure_image(loc, env.credential)
    copy = spec(2, image_id=loc.image_id, image_format="raw", backing=False)
    disk = await env.backend.ensure_volume(copy)
    assert disk.path is not None
    info = await qemu_img.info(disk.path)
    assert (info.backing_file, info.virtual_size) == (None, 2 * GIB)
    assert info.actual_size >= MIB  # the image's data is in the volume itself
    assert (await env.backend.volume_info(str(copy.volume_id))).backing_image_id is None
    env.backend.image_path(loc.image_id, "raw").unlink()
    raw = env.tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk.path), str(raw)])
    assert raw.read_bytes()[:MIB] == data


async def test_a_thick_overlay_is_preallocated(env: Env) -> None:
    loc = await env.upload(make_qcow2(env.tmp_path, "1G"))
    await env.backend.ensure_image(loc, env.credential)
    thick = spec(1, image_id=loc.image_id, image_format="qcow2", thin=False)
    await env.backend.ensure_volume(thick)
    info = await env.backend.volume_info(str(thick.volume_id))
    assert not info.thin and info.allocated_bytes >= GIB
    assert info.backing_image_id == loc.image_id


async def test_the_image_cache_evicts_the_least_recently_used_unpinned_image(
        tmp_path: Path, server: tuple[ThreadServer, Recorder]) -> None:
    env = Env(tmp_path, *server)
    # Room for two 1 MiB images, not three.
    env.backend = LocalDiskBackend(tmp_path / "node", http_timeout=10, owner=None,
                                   image_cache_gb=2.5 / 1024)
    try:
        a, b, c = [await env.upload(os.urandom(MIB), "raw") for _ in range(3)]
        await env.backend.ensure_image(a, env.credential)
        # A volume on image a pins it, however old its last use.
        await env.backend.ensure_volume(spec(1, image_id=a.image_id, image_format="raw"))
        await env.backend.ensure_image(b, env.credential)
        old = time.time() - 3600
        for loc in (a, b):
            sidecar = env.backend.image_path(loc.image_id, "raw")
            os.utime(sidecar.with_name(sidecar.name + ".sha256"), (old, old))
        await env.backend.ensure_image(c, env.credential)
        cached = {loc.image_id: env.backend.image_path(loc.image_id, "raw").exists()
                  for loc in (a, b, c)}
        assert cached == {a.image_id: True, b.image_id: False, c.image_id: True}
        # Asked for again, b is fetched again (and now a is still pinned, c is older).
        await env.backend.ensure_image(b, env.credential)
        assert env.backend.image_path(b.image_id, "raw").exists()
        assert env.backend.image_path(a.image_id, "raw").exists()
    finally:
        await env.backend.aclose()


async def test_a_shared_image_is_fetched_once_for_all_nodes(
        tmp_path: Path, server: tuple[ThreadServer, Recorder]) -> None:
    env = Env(tmp_path, *server)
    shared = tmp_path / "shared"
    shared.mkdir()
    nodes = [LocalDiskBackend(tmp_path / f"node{i}", http_timeout=10, owner=None,
                              shared_storage=shared, node=f"node{i}") for i in range(2)]
    try:
        loc = await env.upload(make_qcow2(tmp_path, "1G"))
        # Both nodes ask at once: the lock file lets one fetch, the other finds it there.
        paths = await asyncio.gather(*(n.ensure_image(loc, env.credential, shared=True)
                                       for n in nodes))
        assert paths[0] == paths[1] == shared / "images" / f"{loc.image_id}.qcow2"
        assert len(env.recorder.ranges) == 1
        disk = await nodes[1].ensure_volume(spec(2, image_id=loc.image_id,
                                                 image_format="qcow2", storage="shared"))
        assert disk.shared and disk.path is not None and disk.path.parent == shared / "volumes"
        assert (await qemu_img.info(disk.path)).backing_file == str(paths[0])
    finally:
        for n in nodes:
            await n.aclose()
        await env.backend.aclose()


async def test_disks_of_the_per_vm_layout_are_adopted_as_volumes(tmp_path: Path) -> None:
    root = tmp_path / "node"
    vm = str(uuid.uuid4())
    old = root / "vms" / vm
    old.mkdir(parents=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(old / "root.qcow2"), "1G"])
    inode = (old / "root.qcow2").stat().st_ino

    backend = LocalDiskBackend(root, owner=None)
    volume_id = legacy_volume_id(vm, "root")
    adopted = root / "volumes" / f"{volume_id}.qcow2"
    assert adopted.stat().st_ino == inode, "moved by a rename, not copied"
    assert not (old / "root.qcow2").exists()
    assert await backend.volume_ids() == [volume_id]
    assert await backend.attachments() == {vm: {"root": volume_id}}
    assert await backend.vm_disk_ids() == {vm: ["root"]}
    # The control server's spec without a volume id names the same volume.
    disk = await backend.ensure_volume(DiskSpec(disk_id="root", size_gb=1,
                                                volume_id=volume_id, create=False))
    assert disk.path == adopted
    # A restart finds nothing more to adopt.
    again = LocalDiskBackend(root, owner=None)
    assert await again.volume_ids() == [volume_id]


async def test_the_seed_is_a_cidata_iso(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node", owner=None)
    vm = str(uuid.uuid4())
    seed = await backend.ensure_seed(vm, CloudInitSpec(
        instance_id=vm, hostname="web1", ssh_keys=["ssh-ed25519 AAAAC3Nza test@x"]))
    assert seed.path == backend.root / "vms" / vm / "cidata.iso"
    label = run(["isoinfo", "-d", "-i", str(seed.path)]).stdout
    assert "Volume id: cidata" in label
    listing = run(["isoinfo", "-J", "-f", "-i", str(seed.path)]).stdout.split()
    assert sorted(listing) == ["/meta-data", "/user-data"]
    meta = run(["isoinfo", "-J", "-x", "/meta-data", "-i", str(seed.path)]).stdout
    assert vm in meta and "web1" in meta
    # A changed spec rewrites it.
    before = seed.path.read_bytes()
    await backend.ensure_seed(vm, CloudInitSpec(instance_id=vm, hostname="web2"))
    assert seed.path.read_bytes() != before


async def test_disk_errors(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    with pytest.raises(DiskError, match="not cached on this node"):
        await backend.ensure_volume(spec(1, image_id=str(uuid.uuid4()), image_format="qcow2"))
    with pytest.raises(DiskError, match="is an ISO"):
        await backend.ensure_volume(spec(1, image_id=str(uuid.uuid4()), image_format="iso"))
    with pytest.raises(DiskError, match="invalid volume id"):
        await backend.ensure_volume(DiskSpec(disk_id="root", size_gb=1, volume_id="../../etc"))
    with pytest.raises(DiskError, match="invalid disk id"):
        await backend.ensure_volume(spec(1, disk_id="../x"))
    with pytest.raises(DiskError, match="shared storage"):
        await backend.ensure_volume(spec(1, storage="shared"))
    assert await backend.volume_ids() == []


async def test_capacity(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    total, used = await backend.capacity_gb()
    st = os.statvfs(tmp_path)
    assert total == st.f_blocks * st.f_frsize // GIB
    assert 0 <= used <= total


async def test_a_restarted_node_removes_what_an_interrupted_operation_left(
        tmp_path: Path) -> None:
    """An agent killed while building a volume or exporting one for a host image leaves
    dot files in its volumes/ directory; the next start removes them (and nothing else),
    but never on the shared mount, where another node may be at work."""
    root, shared = tmp_path / "node", tmp_path / "shared"
    shared.mkdir()
    backend = LocalDiskBackend(root, shared_storage=shared, owner=None)
    volume = await backend.ensure_volume(spec(1))
    assert volume.path is not None
    image = str(uuid.uuid4())
    leftovers = [root / "volumes" / f".export-{image}.qcow2",
                 root / "volumes" / f".{uuid.uuid4()}.qcow2.tmp"]
    elsewhere = shared / "volumes" / f".export-{image}.qcow2"
    for path in (*leftovers, elsewhere):
        path.write_bytes(b"half a copy")
    await backend.aclose()
    again = LocalDiskBackend(root, shared_storage=shared, owner=None)
    try:
        assert not any(p.exists() for p in leftovers)
        assert elsewhere.exists() and volume.path.exists()
        assert await again.volume_ids() == [volume.path.stem]
    finally:
        await again.aclose()
