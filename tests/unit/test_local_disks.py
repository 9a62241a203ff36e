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
from yun.proto.messages import DiskSpec, ImageLocation
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


async def test_overlay_disks_on_a_cached_image(env: Env) -> None:
    loc = await env.upload(make_qcow2(env.tmp_path, "2G"))
    await env.backend.ensure_image(loc, env.credential)
    base = env.backend.image_path(loc.image_id, "qcow2")
    vm = str(uuid.uuid4())

    small = DiskSpec(disk_id="root", size_gb=1, image_id=loc.image_id,
                     image_sha256=loc.sha256, image_format="qcow2")
    disk = await env.backend.ensure_disk(vm, small)
    assert disk.path == env.backend.root / "vms" / vm / "root.qcow2"
    assert (disk.format, disk.bus) == ("qcow2", "virtio")
    info = await qemu_img.info(disk.path)
    assert info.backing_file == str(base)
    assert info.backing_format == "qcow2"
    assert info.virtual_size == 2 * GIB, "never smaller than the image"
    assert mode(disk.path) == 0o600 and mode(disk.path.parent) == 0o700
    assert owned_by_qemu(disk.path) and owned_by_qemu(disk.path.parent)

    big = DiskSpec(disk_id="data", size_gb=5, image_id=loc.image_id, image_format="qcow2",
                   bus="sata")
    disk2 = await env.backend.ensure_disk(vm, big)
    assert (await qemu_img.info(disk2.path)).virtual_size == 5 * GIB
    assert disk2.bus == "sata"

    # Idempotent: the existing volume is returned untouched.
    before = disk.path.stat().st_mtime_ns
    again = await env.backend.ensure_disk(vm, small)
    assert again == disk and disk.path.stat().st_mtime_ns == before

    assert await env.backend.vm_disk_ids() == {vm: ["data", "root"]}
    await env.backend.delete_disks(vm)
    assert not (env.backend.root / "vms" / vm).exists()
    await env.backend.delete_disks(vm)  # no error the second time
    assert await env.backend.vm_disk_ids() == {}
    assert base.exists(), "deleting volumes keeps the cached image"


async def test_raw_image_overlay_records_raw_backing(env: Env) -> None:
    loc = await env.upload(os.urandom(MIB), "raw")
    await env.backend.ensure_image(loc, env.credential)
    disk = await env.backend.ensure_disk(
        str(uuid.uuid4()),
        DiskSpec(disk_id="root", size_gb=1, image_id=loc.image_id, image_format="raw"),
    )
    info = await qemu_img.info(disk.path)
    assert (info.backing_format, info.virtual_size) == ("raw", GIB)


async def test_blank_and_iso_disks(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    vm = str(uuid.uuid4())
    blank = await backend.ensure_disk(vm, DiskSpec(disk_id="scratch", size_gb=3))
    info = await qemu_img.info(blank.path)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 3 * GIB, None)

    iso_id = str(uuid.uuid4())
    iso = backend.image_path(iso_id, "iso")
    iso.write_bytes(b"\0" * 65536)  # as if cached
    disk = await backend.ensure_disk(
        vm, DiskSpec(disk_id="install", size_gb=2, image_id=iso_id, image_format="iso")
    )
    info = await qemu_img.info(disk.path)
    assert (info.virtual_size, info.backing_file) == (2 * GIB, None)


async def test_disk_errors(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    vm = str(uuid.uuid4())
    with pytest.raises(DiskError, match="not cached on this node"):
        await backend.ensure_disk(
            vm, DiskSpec(disk_id="root", size_gb=1, image_id=str(uuid.uuid4()),
                         image_format="qcow2")
        )
    with pytest.raises(DiskError, match="invalid VM uuid"):
        await backend.ensure_disk("../../etc", DiskSpec(disk_id="root", size_gb=1))
    with pytest.raises(DiskError, match="invalid disk id"):
        await backend.ensure_disk(vm, DiskSpec(disk_id="../x", size_gb=1))
    with pytest.raises(DiskError, match="invalid VM uuid"):
        await backend.delete_disks("..")
    assert await backend.vm_disk_ids() == {}


async def test_capacity(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node")
    total, used = await backend.capacity_gb()
    st = os.statvfs(tmp_path)
    assert total == st.f_blocks * st.f_frsize // GIB
    assert 0 <= used <= total
