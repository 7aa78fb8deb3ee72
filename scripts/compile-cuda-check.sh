#!/usr/bin/env bash
# Compile-only check of the CUDA/NCCL sources for CI machines without a GPU or CUDA toolkit.
#
# nvcc, the CUDA runtime headers and CCCL come from PyPI wheels matching torch's CUDA version
# (installed with --target into a cache outside the repo, never into the venv); NCCL's header
# and library come from torch's own nvidia-nccl wheel. The extension is built out of tree
# (the in-place CPU build is untouched), then loaded in a fresh process to check that the
# NCCL entry points resolve. Needs torch built for CUDA 13 (the cu13 wheel layout).
#
#   scripts/compile-cuda-check.sh            # PYTHON=.venv/bin/python by default
#   TORCH_CUDA_ARCH_LIST="9.0;10.0" scripts/compile-cuda-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-.venv/bin/python}
cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
if [ -z "$cuda" ]; then
  echo "compile-cuda-check: this torch has no CUDA build (torch.version.cuda is None)" >&2
  exit 1
fi
major=${cuda%%.*}
minor=${cuda#*.}
minor=${minor%%.*}
cache=${DDL_CUDA_CACHE:-$HOME/.cache/ddl-operator/cuda-$major.$minor}
home=$cache/nvidia/cu$major

if [ ! -x "$home/bin/nvcc" ]; then
  echo "compile-cuda-check: installing nvcc $major.$minor from PyPI into $cache"
  "$py" -m pip install -q --target "$cache" \
    "nvidia-cuda-nvcc==$major.$minor.*" "nvidia-cuda-crt==$major.$minor.*" \
    "nvidia-nvvm==$major.$minor.*" "nvidia-cuda-runtime==$major.$minor.*" \
    "nvidia-cuda-cccl==$major.$minor.*"
fi
# torch links -lcudart from $CUDA_HOME/lib64; the wheel ships only the versioned library.
mkdir -p "$home/lib64"
ln -sf "../lib/libcudart.so.$major" "$home/lib64/libcudart.so"
"$home/bin/nvcc" --version | tail -1

out=$cache/ddl-build
start=$(date +%s)
if ! CUDA_HOME=$home DDL_NATIVE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  MAX_JOBS=${MAX_JOBS:-2} "$py" setup.py -q build_ext --build-lib "$out/lib" \
  --build-temp "$out/tmp" >"$out.log" 2>&1; then
  grep -E "error|Error" "$out.log" | head -40 >&2 || true
  echo "compile-cuda-check: build failed, full log in $out.log" >&2
  exit 1
fi
so=$(ls "$out"/lib/ddl_worker/_native*.so)
echo "compile-cuda-check: built $so in $(( $(date +%s) - start ))s"

"$py" - "$so" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
assert torch.ops.ddl.has_nccl(), "the CUDA build does not report NCCL"
print(
    "compile-cuda-check: ok (NCCL", torch.ops.ddl.nccl_version(),
    "ncclCommSplit:", bool(torch.ops.ddl.has_nccl_split()), ")",
)
PY
