from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from yun.cli.main import app
from yun.testing.cluster import SimCluster
from yun.testing.host import fresh_postgres_database

#: ``await cli("vm", "list")`` -> (exit code, what it printed, stderr mixed in).
Cli = Callable[..., Awaitable[tuple[int, str]]]


@contextlib.asynccontextmanager
async def started(cluster: SimCluster) -> AsyncIterator[SimCluster]:
    """``cluster`` started, and stopped after the block whatever happens in it."""
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    async with started(SimCluster(tmp_path, nodes=2)) as c:
        yield c


@pytest.fixture
async def one(tmp_path: Path) -> AsyncIterator[SimCluster]:
    """One sim node on SQLite: every VM lands on it (a local volume can move between
    VMs, a disk's content is read back from it)."""
    async with started(SimCluster(tmp_path, nodes=1)) as c:
        yield c


PG_URL = os.environ.get("YUN_TEST_POSTGRES_URL", "")


EACH_DB = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_URL, reason="YUN_TEST_POSTGRES_URL is not set "
                                              "(scripts/test.sh sets it)")]),
]


@pytest.fixture(params=EACH_DB)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The control server's database URL, once per database: '' for SQLite in its state
    directory, then a fresh PostgreSQL database made for the test (named after its
    module) and dropped after it."""
    if request.param == "sqlite":
        yield ""
        return
    tag = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with fresh_postgres_database(PG_URL, tag) as url:
        yield url


@pytest.fixture(params=EACH_DB)
async def one_on_each_db(request: pytest.FixtureRequest,
                         tmp_path: Path) -> AsyncIterator[SimCluster]:
    """One sim node, once on SQLite and once on PostgreSQL (a fresh schema): for the
    scenarios whose claims and constraints each database enforces its own way."""
    if request.param == "sqlite":
        async with started(SimCluster(tmp_path, nodes=1)) as c:
            yield c
        return
    from tests.integration.test_postgres import cluster_on_postgres

    async with cluster_on_postgres(tmp_path, nodes=1) as c:
        yield c


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


@pytest.fixture
def cli(cluster: SimCluster, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The `yun` CLI logged in to the test module's cluster as its admin, with no
    profile or output default of the machine it runs on."""
    assert cluster.gateway is not None
    monkeypatch.setenv("YUN_API_URL", cluster.gateway.url)
    monkeypatch.setenv("YUN_API_TOKEN", cluster.token)
    monkeypatch.setenv("COLUMNS", "200")
    for var in ("YUN_PROFILE", "YUN_OUTPUT", "YUN_ACCESS_KEY", "YUN_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()

    async def invoke(*args: str) -> tuple[int, str]:
        # The CLI is synchronous; the services run on this loop, so call it from a thread.
        result = await asyncio.to_thread(runner.invoke, app, list(args))
        return result.exit_code, result.output

    return invoke


async def shown(cli: Cli, *args: str) -> Any:
    """The JSON document a command prints (it must succeed)."""
    code, out = await cli(*args, "-o", "json")
    assert code == 0, out
    # Notes go to stderr, which CliRunner mixes in: the document starts at the first
    # brace and may be followed by a note.
    return json.JSONDecoder().raw_decode(out, out.index("{"))[0]
