#!/usr/bin/env bash
# Create (or reuse) .venv in the repo root and install stagetrain into it. Idempotent.
#   scripts/setup.sh         runtime: the package, its CLI, Fashion-MNIST
#   scripts/setup.sh test    the above plus the test extras (pytest, hypothesis, moto[server], ruff)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch/torchvision come from the wheels on this machine's disk (pip's configured find-links).
# --no-compile, then compileall on every core: pip byte-compiles its ~22k files on one core (370 s for
# the whole install on the 2-core developer machine, 291 s this way); without .pyc files every process
# (each Ray worker) would compile torch and ray again where PYTHONDONTWRITEBYTECODE is set.
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".${extras}" \
  >.venv/pip.log 2>&1; then
  cat .venv/pip.log >&2
  exit 1
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# (exit 1 for the few files written for newer Pythons, e.g. torch's py312_intrinsics: pip skips them too)
.venv/bin/python -m compileall -q -j 0 -x '/tests/' "$site" >/dev/null 2>&1 || true
.venv/bin/python -c "import service, workers, checkpoints" # fail here, not later, if the install broke

# Real data for the example job and the tests: Debian's dataset-fashion-mnist (60k + 10k, MIT).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "warning: install Debian's dataset-fashion-mnist (or set data.root) to run the Fashion-MNIST jobs" >&2
  fi
fi
