"""An upload whose gateway is killed mid-stream does not stay `uploading`: the storage
server sees the stream break and the control server marks the image failed at once."""

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


async def test_upload_of_a_killed_gateway_is_marked_failed_at_once(small_qcow2: Path) -> None:
    cloud = await ProcCloud(nodes=1).start()
    try:
        head = (await asyncio.to_thread(small_qcow2.read_bytes))[:65536]
        sent = asyncio.Event()
        async with cloud.api(timeout=60) as api:
            upload = asyncio.create_task(api.post(
                "/api/v1/images", params={"name": "cut"},
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
            # its tmp/). A gateway killed before that leaves the storage server nothing to
            # notice: such an upload ends by the control server's upload_timeout.
            incoming = cloud.state_dir("storage") / "storage" / "tmp"
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
        # Well before the control server's upload_timeout (hours): the break is reported.
        async with cloud.api() as api:
            for _ in range(150):
                with contextlib.suppress(httpx.HTTPError):
                    image = await _image_named(api, "cut")
                    if image is not None and image["status"] != "uploading":
                        break
                await asyncio.sleep(0.2)
            assert image is not None and image["status"] == "error", image
            assert "upload aborted" in (image.get("error") or ""), image
            # The failed image can be deleted and nothing is left of it.
            resp = await api.delete(f"/api/v1/images/{image['uuid']}")
            assert resp.status_code in (202, 204), resp.text
    finally:
        cloud.close()
