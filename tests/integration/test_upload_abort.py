"""An upload whose gateway is killed mid-stream is resumable: the storage server keeps
the bytes it received, the image stays `uploading`, and the rest sent through the
restarted gateway completes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from yun.testing.procs import ProcCloud


async def _stalled_body(head: bytes, sent: asyncio.Event) -> AsyncIterator[bytes]:
    """The first bytes of an image, then nothing more until the connection dies."""
    yield head
    sent.set()
    await asyncio.sleep(3600)


async def _image_named(api: httpx.AsyncClient, name: str) -> dict | None:
    resp = await api.get("/api/v1/images", params={"q": f"name={name}"})
    if resp.status_code != 200:
        return None
    items = resp.json()["items"]
    return items[0] if items else None


async def test_upload_of_a_killed_gateway_is_resumed(small_qcow2: Path) -> None:
    cloud = await ProcCloud(nodes=0).start()
    try:
        data = await asyncio.to_thread(small_qcow2.read_bytes)
        head, total = data[:65536], len(data)
        sent = asyncio.Event()
        async with cloud.api(timeout=60) as api:
            upload = asyncio.create_task(api.post(
                "/api/v1/images", params={"name": "cut", "size": total},
                content=_stalled_body(head, sent),
                headers={"Content-Type": "application/octet-stream"}))
            await asyncio.wait_for(sent.wait(), 30)
            async with cloud.api() as other:
                for _ in range(100):
                    image = await _image_named(other, "cut")
                    if image is not None:
                        break
                    await asyncio.sleep(0.2)
            assert image is not None and image["status"] == "uploading", image
            # Kill the gateway once its stream has reached the storage server (a partial file in
            # its uploads/).
            incoming = cloud.state_dir("storage") / "storage" / "uploads"
            for _ in range(150):
                if await asyncio.to_thread(
                        lambda: any(f.name.startswith(image["uuid"])
                                    for f in incoming.glob("*"))):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"the upload never reached the storage server: {incoming}")
            cloud.kill("gateway")
            # The client is parked in its own body generator; it would notice only at its
            # next write.
            upload.cancel()
            with contextlib.suppress(httpx.HTTPError, asyncio.CancelledError):
                await upload
        cloud.restart("gateway")
        async with cloud.api() as api:
            for _ in range(150):
                with contextlib.suppress(httpx.HTTPError):
                    resp = await api.get("/api/v1/images/cut/upload")
                    if resp.status_code == 200 and resp.json()["offset"] == len(head):
                        break
                await asyncio.sleep(0.2)
            held = resp.json()
            assert held["offset"] == len(head) and held["total"] == total, held
            assert (await _image_named(api, "cut"))["status"] == "uploading"
            resp = await api.put("/api/v1/images/cut/data", content=data[len(head):], headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {len(head)}-{total - 1}/{total}"})
            assert resp.status_code == 201, resp.text
            assert resp.json()["status"] == "active"
            assert list(incoming.iterdir()) == []
    finally:
        cloud.close()
