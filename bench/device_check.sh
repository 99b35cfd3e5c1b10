#!/usr/bin/env bash
# The device check on a machine with an NVIDIA GPU (docs/install.md, "CUDA"): in a venv (DEVICE_VENV, default
# ./.venv-cuda), the CUDA build of ggml from PyPI's toolkit and this package on top (tools/cuda_build.sh, skipped
# when the venv already has a libggml with CUDA), then bench/device_check.py: the forward agreement with every layer
# on the GPU against llama.cpp's committed logits and our CPU run, where the scheduler put each node, and the speed
# of the medium model on the GPU and on the CPU, in one table. Arguments go to bench/device_check.py (--device,
# --model, --threads, --tokens).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DEVICE_VENV:-$repo/.venv-cuda}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
has_cuda='import sys, llama_dsv4._ggml as g; sys.exit(0 if "CUDA" in g.registered_backends() else 1)'
if ! (cd / && python -c "$has_cuda") 2>/dev/null; then
  "$repo/tools/cuda_build.sh"
fi
python -m pip install -q pytest  # bench/device_check.py reads tests/test_forward.py's helpers
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
cd "$repo" && python bench/device_check.py "$@"
