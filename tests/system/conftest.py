"""Shared fixtures of the system tests: root, real namespaces, no leftovers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from yun.testing.netns import Topology, cleanup_stale


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests need root")
    if shutil.which("ip") is None:
        pytest.skip("system tests need iproute2")


@pytest.fixture(scope="session", autouse=True)
def _stale_test_namespaces() -> None:
    """Remove leftovers of killed earlier runs (never those of a live run)."""
    if os.geteuid() == 0 and shutil.which("ip") is not None:
        cleanup_stale()


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh test data centre (LAN switch + root link), deleted after the test."""
    _need_root()
    with Topology() as topo:
        yield topo


@pytest.fixture
def datacenter_factory(topology: Topology, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Builds a :class:`DataCenter` in the test's topology; everything is removed after."""
    from yun.testing.datacenter import DataCenter

    made: list[DataCenter] = []

    def make(nodes: int = 1, discover: bool = False) -> DataCenter:
        workdir = Path(tempfile.mkdtemp(prefix="yun-dc-"))
        dc = DataCenter(topology, workdir, nodes=nodes, discover=discover)
        made.append(dc)
        try:
            dc.start()
        except BaseException:
            print(dc.logs())
            raise
        return dc

    yield make
    for dc in made:
        dc.close()
        shutil.rmtree(dc.workdir, ignore_errors=True)
