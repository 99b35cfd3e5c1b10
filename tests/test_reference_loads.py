"""The reference implementation (llama.cpp via llama-cpp-python 0.3.36, tools/oracle/) loads and runs every
variant our writer makes. Runs only where DSV4_ORACLE_PYTHON points at the oracle's python (it is a separate
process: both ship libggml of different versions); the variants checked are recorded in tests/data/README.md."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MICRO

from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

ORACLE = os.environ.get("DSV4_ORACLE_PYTHON")
LOGITS_PY = os.environ.get(
    "DSV4_ORACLE_SCRIPT", os.path.join(os.path.dirname(__file__), "..", "tools", "oracle", "reference.py")
)

VARIANTS: dict[str, dict] = {
    "f32": dict(dtype="f32"),
    "f16": dict(dtype="f16"),
    "q8xq5": dict(dtype="q8xq5"),
    "q8xq5-split3": dict(dtype="q8xq5", n_shards=3),
    "real-vocab-q8xq5": dict(dtype="q8xq5", vocab="real"),
    "no-vocab": dict(vocab="none"),
    "mtp": dict(params=DSV4Params(n_nextn=1, compress_ratios=(0, 4, 128, 4, 128, 0, 0))),
    "declared-nextn": dict(params=DSV4Params(declared_nextn=1)),
    "no-shexp-clamp": dict(params=DSV4Params(swiglu_clamp_shexp=None)),
    "attn-output-a-3d": dict(attn_output_a_3d=True),
    "micro": dict(params=MICRO),
}


@pytest.mark.skipif(not ORACLE, reason="DSV4_ORACLE_PYTHON is not set (the reference implementation is optional)")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_runs_variant(variant: str, tmp_path: os.PathLike[str]) -> None:
    assert os.path.exists(LOGITS_PY), f"oracle script not found at {LOGITS_PY} (set DSV4_ORACLE_SCRIPT)"
    paths = write_model(os.path.join(tmp_path, f"{variant}.gguf"), **VARIANTS[variant])
    out = os.path.join(tmp_path, "ref.npz")
    r = subprocess.run(
        [ORACLE, LOGITS_PY, "logits", paths[0], "--tokens", "5,6,7,8,9,10,11,12", "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    logits = np.load(out)["logits"]
    assert logits.shape[0] == 8 and np.isfinite(logits).all()
    print(f"{variant}: reference ran, argmax {logits.argmax(-1).tolist()}", file=sys.stderr)
