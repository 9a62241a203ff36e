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
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=30 tests "$@"
