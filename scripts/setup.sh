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
if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}" >.venv/pip.log 2>&1; then
  cat .venv/pip.log >&2
  exit 1
fi
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
