#!/usr/bin/env bash
# The whole test suite: unit, integration (sim hypervisor, many nodes) and system (real QEMU
# guests under TCG, network namespaces, nftables, dnsmasq, PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export YUN_TEST_POSTGRES_URL="postgresql+psycopg://yun:yun@127.0.0.1:5432/yun_test"
# Every test must run here: a skip (not root, a tool or PostgreSQL missing) is a failure,
# so a green run cannot hide system tests that never ran (tests/strict.py).
export YUN_TEST_STRICT=1
# The scale tests (tests/integration/test_scale_sim.py) at a tenth of the issue's sizes
# (500 VMs on 50 nodes; kill -9 during 200 creates on 20 nodes) to fit the suite's time;
# YUN_SCALE_FRACTION=1 runs them at full size (docs/BENCHMARKS.md has those runs).
export YUN_SCALE_FRACTION="${YUN_SCALE_FRACTION:-0.1}"
.venv/bin/ruff check yun tests
.venv/bin/lint-imports
# --durations: the slowest tests in every run's log, to keep the suite within its time.
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider --durations=20)
if [ "$#" -gt 0 ]; then  # a part of the suite, as pytest arguments: run just that
    exec "${PYTEST[@]}" "$@"
fi

# The whole suite runs as two streams at once: each alone keeps about one of the two
# cores busy (guests under TCG wait on their one vCPU thread; the services of a test
# wait on each other), so together they take little more than the longer one. Each
# stream hands out its own part of the test ports (yun/testing/ports.py); namespaces,
# subnets, node hosts and databases are named per run already. The QoS measurements
# (CPU shares of guests pinned to one core, IOPS and bandwidth limits) run alone first:
# the other stream's load would move their figures.
ALONE=(tests/system/test_qos.py tests/system/test_all_in_one_capacity.py)
stream() {  # NAME PORTS PYTEST-ARGS...: one pytest run, its lines prefixed with NAME
    local name=$1 ports=$2
    shift 2
    YUN_TEST_PORT_RANGE=$ports "${PYTEST[@]}" "$@" 2>&1 | sed -u "s/^/[$name] /"
}
# The API fuzzer (about a minute and a half) runs with the system tests: it evens out
# the two streams.
FUZZ=tests/integration/test_fuzz_api.py
status=0
stream alone 20000-31999 "${ALONE[@]}" || status=1
stream system 20000-25999 tests/system "${ALONE[@]/#/--ignore=}" "$FUZZ" & system=$!
stream unit+integration 26000-31999 tests/unit tests/integration --ignore="$FUZZ" & rest=$!
wait "$system" || status=1
wait "$rest" || status=1
if [ "$status" -ne 0 ]; then
    echo "test suite FAILED: see the summaries of [alone], [system] and [unit+integration]" >&2
fi
exit "$status"
