#!/usr/bin/env bash
# The test suite as CI runs it (after `scripts/setup.sh test`): lint, the in-process tests on every core
# (pytest-xdist), then the tests that start Ray clusters (marker `ray`) one at a time, as a 2-core machine
# needs both cores for one. Extra arguments go to both pytest runs (-x, -k NAME, a test file...).
set -euo pipefail
cd "$(dirname "$0")/.."
pytest() { # exit 5 (nothing selected, e.g. -k matching only one half) is not a failure
  .venv/bin/python -m pytest -q "$@" || { code=$?; [ "$code" = 5 ] || exit "$code"; }
}
.venv/bin/ruff check .
pytest -m "not ray" -n auto "$@"
pytest -m ray "$@"
