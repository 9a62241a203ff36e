"""Under YUN_TEST_STRICT=1 (scripts/test.sh) a skipped test fails with its reason, unless
it is marked skip_allowed with a reason; without it, skips stay skips."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SKIPPING = '''
import pytest

def test_runs():
    assert True

def test_skips_at_run_time():
    pytest.skip("needs root")

@pytest.mark.skipif(True, reason="YUN_TEST_POSTGRES_URL is not set")
def test_skipif():
    pass

@pytest.fixture
def needs_tool():
    pytest.skip("nft is not installed")

def test_skips_in_a_fixture(needs_tool):
    pass

@pytest.mark.skip_allowed("nothing to check on any machine here")
def test_allowed():
    pytest.skip("allowed")

@pytest.mark.skip_allowed("")
def test_allowed_without_a_reason():
    pytest.skip("an empty reason exempts nothing")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest("from tests.strict import pytest_configure, "
                          "pytest_make_collect_report, pytest_runtest_makereport  # noqa\n")
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_strict_run_fails_every_unexplained_skip(project: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YUN_TEST_STRICT", "1")
    result = project.runpytest("-rA")
    # Skips in setup (skipif, fixture) are reported as errors, at run time as failures.
    result.assert_outcomes(passed=1, failed=2, errors=2, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines([  # errors (setup) are listed before failures
        "*skipped under YUN_TEST_STRICT=1*YUN_TEST_POSTGRES_URL is not set*",
        "*skipped under YUN_TEST_STRICT=1*nft is not installed*",
        "*skipped under YUN_TEST_STRICT=1, where every test must run: needs root*",
        "*skipped under YUN_TEST_STRICT=1*an empty reason exempts nothing*",
    ])
    assert result.ret != 0


def test_without_strict_skips_stay_skips(project: pytest.Pytester,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YUN_TEST_STRICT", raising=False)
    result = project.runpytest()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == 0


def test_a_module_skipped_at_collection_fails(pytester: pytest.Pytester,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest("from tests.strict import pytest_configure, "
                          "pytest_make_collect_report, pytest_runtest_makereport  # noqa\n")
    pytester.makepyfile(test_gone="import pytest\n"
                                  "pytest.importorskip('no_such_module_here')\n"
                                  "def test_x():\n    pass\n")
    monkeypatch.setenv("YUN_TEST_STRICT", "1")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*skipped at collection under YUN_TEST_STRICT=1*"
                                 "no_such_module_here*"])
    assert result.ret != 0
    monkeypatch.delenv("YUN_TEST_STRICT")
    assert pytester.runpytest().ret == pytest.ExitCode.NO_TESTS_COLLECTED
