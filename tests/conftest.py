"""Shared test setup."""

# Under YUN_TEST_STRICT=1 (scripts/test.sh) a skipped test fails: see tests/strict.py.
from tests.strict import (  # noqa: F401
    pytest_configure,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)
