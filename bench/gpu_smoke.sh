#!/usr/bin/env bash
# GPU smoke benchmark: stagetrain's worker loop beside a minimal hand-written loop on one GPU.
#
#   bash bench/gpu_smoke.sh            # from anywhere; needs one NVIDIA GPU; under 9 min (incl. set-up)
#   bash bench/gpu_smoke.sh 2>&1 | tee gpu_smoke.log
#
# What it runs: bench/overhead.py with one worker (a 1-process torch.distributed group, NCCL for CUDA
# tensors), bf16 autocast, channels_last, ResNet-50, synthetic data at 128/160/224 px, per-worker batch
# 128, both sides fed by DataLoader workers. It prints img/s per resolution for StageRunner and for the
# plain loop, their ratio, and ends with one JSON line ({"overhead_ratio": ..., "per_resolution": ...}).
# Then bench/gpu_pipeline.py: per resolution the model-only ceiling, the loop on in-memory data and on a
# JPEG folder (decoded on the GPU, in the loader workers, and from its `stagetrain prepare` tiers), with
# ratios to the ceiling (PIPELINE=0: skip).
# No Ray cluster is started: StageRunner runs in-process with a no-op report. The "st records" column
# is the img/s StageRunner reports itself; expect it above the timed figure on a GPU (its report
# windows end before the loss copy that waits for the GPU).
#
# Set-up: it uses .venv if there is one; else a python3 that already has torch (with CUDA), torchvision,
# pydantic, pyyaml and fsspec (a GPU image; the repo itself is put on sys.path, nothing installed);
# else it does what scripts/setup.sh does (a venv, pip install -e .; about 2 min) without its
# Fashion-MNIST apt step, which this benchmark does not need. With no GPU it exits 1 with a message.
#
# Overrides (environment): PYTHON, ARCH, RESOLUTIONS, BATCH, LOADER_WORKERS, WARMUP, STEPS, ROUNDS,
# BACKEND (default nccl: what Ray's TorchConfig creates on GPU; stagetrain's CPU collectives use a gloo
# side group of their own).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_smoke: error: $*" >&2; exit 1; }

# 1. A GPU, before spending minutes on set-up.
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || die "nvidia-smi lists no GPU; run this on a machine with an NVIDIA GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
elif ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  die "no NVIDIA GPU found (no nvidia-smi, no /dev/nvidia*); run this on a machine with an NVIDIA GPU"
fi

# 2. The environment: .venv, else a python3 that has what the benchmark imports, else a new .venv.
py=${PYTHON:-}
if [ -z "$py" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
if [ -z "$py" ] && python3 -c "import torch, torchvision, pydantic, yaml, fsspec" 2>/dev/null; then py=python3; fi
if [ -z "$py" ]; then
  echo "gpu_smoke: no .venv; installing the repo into it (pip install -e ., log in .venv/pip.log)" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e . >.venv/pip.log 2>&1 \
    || { tail -20 .venv/pip.log >&2; die "pip install -e . failed (full log: .venv/pip.log)"; }
  py=.venv/bin/python
fi
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$py" -c "import service.spec, workers.train, checkpoints.checkpointer" \
  || die "$py cannot import stagetrain's worker code (missing packages?); rerun scripts/setup.sh"
"$py" - <<'EOF' || die "torch cannot use the GPU (a CPU-only wheel, or a driver older than its CUDA)"
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

# 3. The benchmark. No Ray cluster is started; these keep any Ray report in the process fast and
# match what Ray's TorchConfig sets for NCCL.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cores=$(nproc)
workers=${LOADER_WORKERS:-$(( cores > 14 ? 12 : (cores > 3 ? cores - 2 : 1) ))}

rc=0
timeout --signal=INT 270 "$py" bench/overhead.py \
  --device cuda --world 1 --backend "${BACKEND:-nccl}" \
  --arch "${ARCH:-resnet50}" --resolutions "${RESOLUTIONS:-128,160,224}" --batch "${BATCH:-128}" \
  --loader-workers "$workers" --threads 4 \
  --warmup "${WARMUP:-8}" --steps "${STEPS:-30}" --rounds "${ROUNDS:-2}" || rc=$?
[ "$rc" = 124 ] && die "the benchmark ran past its 270 s budget (fewer STEPS/ROUNDS/RESOLUTIONS?)"
[ "$rc" = 0 ] || die "bench/overhead.py failed (exit $rc); its traceback is above"

# 4. The input pipeline per resolution (issue 19): the model-only ceiling, the loop on in-memory data,
# the loop on a folder of ImageNet-sized JPEGs decoded on the GPU (nvjpeg) and in the loader workers.
# Never run on a GPU yet (written 2026-12-02 without one; its --device cpu smoke run passes). PIPELINE=0
# skips it.
if [ "${PIPELINE:-1}" != 0 ]; then
  rc=0
  timeout --signal=INT 240 "$py" bench/gpu_pipeline.py \
    --arch "${ARCH:-resnet50}" --resolutions "${RESOLUTIONS:-128,160,224}" --batch "${BATCH:-128}" \
    --loader-workers "$workers" --warmup "${WARMUP:-5}" --steps "${STEPS:-20}" --rounds "${ROUNDS:-2}" || rc=$?
  [ "$rc" = 124 ] && die "bench/gpu_pipeline.py ran past its 240 s budget (fewer STEPS/ROUNDS/RESOLUTIONS?)"
  [ "$rc" = 0 ] || die "bench/gpu_pipeline.py failed (exit $rc); its traceback is above"
fi
