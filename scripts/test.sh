#!/usr/bin/env bash
# The test suite as CI runs it (after `scripts/setup.sh test`): lint, then the tests that start Ray
# clusters (marker `ray`) one at a time, as a 2-core machine needs both cores for one; beside them, on
# idle CPU only (SCHED_IDLE, else nice 19), the in-process tests on every core (pytest-xdist). A Ray test
# spends much of its time waiting on Ray's process start-ups, one after another: the in-process tests
# fill those idle cycles without taking a core from it. Not nice 15: Ray runs its workers at nice 15, and
# the Ray tests then ran 25-30 % slower beside them (ci-local 1,643 s; at SCHED_IDLE 1,345 s; one after
# the other 1,611-1,657 s, on the 2-core developer machine). Their report is printed after the Ray tests'.
# One torch thread per xdist worker (OMP_NUM_THREADS=1): two workers of two threads each on two idle-priority
# cores spin at OpenMP barriers while a thread waits for its core (test_runner.py's stage-1 fixture took
# 110 s beside the Ray tests, 2 s alone).
# Extra arguments go to both pytest runs (-x, -k NAME, a test file...).
set -euo pipefail
cd "$(dirname "$0")/.."
ok() { [ "$1" = 0 ] || [ "$1" = 5 ]; } # 5: nothing selected (-k matching only one half) is no failure
.venv/bin/ruff check .
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
idle="nice -n 19" # the xdist workers inherit it
command -v chrt >/dev/null && chrt --idle 0 true 2>/dev/null && idle="chrt --idle 0"
(
  code=0
  OMP_NUM_THREADS=1 $idle .venv/bin/python -m pytest -q -m "not ray" -n auto --basetemp="$tmp/in-process" "$@" \
    >"$tmp/in-process.log" 2>&1 || code=$?
  echo "$code" >"$tmp/in-process.rc"
) &
echo "in-process tests: running beside the Ray tests on idle CPU; their report follows the Ray tests'"
ray_rc=0
.venv/bin/python -m pytest -q -m ray --basetemp="$tmp/ray" "$@" || ray_rc=$?
wait
cat "$tmp/in-process.log"
in_rc=$(cat "$tmp/in-process.rc")
echo "exit codes: in-process tests $in_rc, Ray tests $ray_rc"
ok "$in_rc" && ok "$ray_rc"
