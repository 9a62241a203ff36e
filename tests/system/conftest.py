"""Shared fixtures of the system tests: root, real namespaces, no leftovers."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Generator, Iterator

import pytest

from yun.testing.netns import Topology, cleanup_stale


def need_root(*tools: str) -> None:
    """Skip (a failure under YUN_TEST_STRICT) unless root with ``ip`` and ``tools``."""
    if os.geteuid() != 0:
        pytest.skip("system tests need root")
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"system tests need {tool}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, None]:
    """A failed test's report carries the logs of every data centre still up: one kept
    by a module fixture outlives the test, and its logs are gone by the time the module
    ends, yet they hold the reason a task failed."""
    from yun.testing.datacenter import LIVE

    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, dc in enumerate(LIVE):
            report.sections.append((f"yun logs of data centre {index}", dc.logs(40)))


@pytest.fixture(scope="session", autouse=True)
def _stale_test_namespaces() -> None:
    """Remove leftovers of killed earlier runs (never those of a live run)."""
    if os.geteuid() == 0 and shutil.which("ip") is not None:
        cleanup_stale()


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh test data centre (LAN switch + root link), deleted after the test."""
    need_root()
    with Topology() as topo:
        yield topo


@pytest.fixture
def datacenter_factory(topology: Topology, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Builds a :class:`DataCenter` in the test's topology; everything is removed after."""
    from yun.testing.datacenter import DataCenter, deployed

    with contextlib.ExitStack() as stack:

        def make(nodes: int = 1, discover: bool = False) -> DataCenter:
            return stack.enter_context(deployed(topology, nodes=nodes, discover=discover,
                                                image=None))

        yield make
