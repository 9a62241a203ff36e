from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.testing.cluster import SimCluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    c = SimCluster(tmp_path, nodes=2)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture(scope="session")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


async def upload(cluster: SimCluster, path: Path, name: str = "img",
                 fmt: str | None = None) -> dict:
    assert cluster.api is not None
    params = {"name": name}
    if fmt:
        params["format"] = fmt
    data = await asyncio.to_thread(path.read_bytes)
    resp = await cluster.api.post("/api/v1/images", params=params, content=data,
                                  headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.text
    return resp.json()
