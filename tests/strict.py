"""Strict runs: under ``YUN_TEST_STRICT=1`` (set by scripts/test.sh, the README's test
command and CI's) a skipped test is a failure.

System tests skip when not root or when a tool is missing, PostgreSQL tests when no
server is configured: convenient on a developer's laptop, but in the real run a green
result must mean that they ran. So a skip there fails with its reason, unless the test
is marked ``@pytest.mark.skip_allowed("why skipping is right on any machine")`` (a
reason that does not depend on what is installed or who runs the tests). A module that
skips itself at collection (``importorskip``, a module-level ``pytest.skip``) fails too.

tests/conftest.py imports these hooks; a test run elsewhere may load this module with
``-p tests.strict``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

STRICT_ENV = "YUN_TEST_STRICT"
MARKER = "skip_allowed"
_HOW = (f"install what is missing (scripts/setup.sh --test) and run as root, or, when "
        f"skipping is right on every machine, mark the test @pytest.mark.{MARKER}(reason)")


def strict() -> bool:
    """Whether this run turns skips into failures."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed(item: pytest.Item) -> bool:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return False
    reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
    return bool(str(reason).strip())  # an unexplained exemption is no exemption


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (so --strict-markers accepts it)."""
    config.addinivalue_line(
        "markers", f"{MARKER}(reason): this test may skip even under {STRICT_ENV}=1, "
                   "because the reason holds on every machine")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A skipped test (not an expected failure) fails under a strict run."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (strict() and report.skipped) or hasattr(report, "wasxfail") or _allowed(item):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under {STRICT_ENV}=1, where every test must run: "
                       f"{_reason(report.longrepr)}\n({_HOW})")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module that skipped itself while being collected fails under a strict run."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if strict() and report.skipped:
        report.outcome = "failed"
        report.longrepr = (f"{collector.nodeid} skipped at collection under {STRICT_ENV}=1: "
                           f"{_reason(report.longrepr)}\n({_HOW})")
