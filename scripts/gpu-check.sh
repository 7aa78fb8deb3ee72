#!/usr/bin/env bash
# The one GPU check: on a machine with one CUDA GPU, torch, nvcc and NCCL (no package
# registry needed), build the extension with its CUDA/NCCL parts in place, run the GPU tests
# (kernels against float64 and the CPU kernels, the NCCL path at world size 1) and print the
# kernels' bandwidth next to a device-to-device copy. Takes a few minutes, mostly the build.
#
#   scripts/gpu-check.sh          # PYTHON=... to pick the interpreter (default: .venv, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="$PWD/worker${PYTHONPATH:+:$PYTHONPATH}"
export DDL_TEST_GPU=1 DDL_NATIVE_CUDA=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}

"$py" - <<'PY'
import torch

assert torch.cuda.is_available(), "gpu-check: torch sees no CUDA device"
print("gpu-check:", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
PY
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

start=$(date +%s)
mkdir -p build
if ! "$py" setup.py -q build_ext --inplace >build/gpu-check.log 2>&1; then
  grep -E "error|Error" build/gpu-check.log | head -40 >&2 || true
  echo "gpu-check: build failed (full log: build/gpu-check.log)" >&2
  exit 1
fi
echo "gpu-check: built the extension (sm_$TORCH_CUDA_ARCH_LIST) in $(( $(date +%s) - start ))s"

start=$(date +%s)
if "$py" -c "import pytest" 2>/dev/null; then
  "$py" -m pytest -q -s -p no:cacheprovider tests/gpu/test_native_gpu.py
else
  "$py" -m unittest -v tests/gpu/test_native_gpu.py
fi
echo "gpu-check: tests passed in $(( $(date +%s) - start ))s"
