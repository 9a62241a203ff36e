#!/usr/bin/env bash
# The all-in-one: set everything up, start every component on this host, boot a demo VM.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/yun aio up
