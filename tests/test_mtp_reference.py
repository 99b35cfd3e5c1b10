"""The MTP (nextn) block against llama.cpp's MTP graph (llama-cpp-python 0.3.36: a context of type
LLAMA_CONTEXT_TYPE_MTP over the model loaded with load_mtp, fed through its batch API, tools/oracle/reference.py
`mtp`), on a random model with every layer kind and an MTP layer (forward_models.SECOND + one nextn layer, no
tokenizer, 64 token ids): for 300 positions, each row's token and the main model's final streams go to both
engines, whose MTP logits must agree as the forward pass's do. The reference logits are committed
(tests/data/forward/mtp.npz, with the streams they were given and the model's SHA-256), so this runs without the
reference; with DSV4_ORACLE_PYTHON set, it is also run live.

    python tests/test_mtp_reference.py ORACLE_PYTHON     # writes tests/data/forward/mtp.npz again
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_models import DECISIVE_INIT, N_VOCAB, SECOND
from llama_dsv4.engine.context import Context

from llama_dsv4 import _ggml
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model

PARAMS = SECOND.with_(indexer_top_k=256, n_nextn=1, compress_ratios=(*SECOND.compress_ratios, 0), swiglu_clamp_exp=2.0)
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "forward", "mtp.npz")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "oracle", "reference.py")
N, UB = 300, 64


def model(tmp: str) -> str:
    return write_model(os.path.join(tmp, "mtp.gguf"), PARAMS, vocab="none", init=DECISIVE_INIT, seed=1)[0]


def ours(path: str, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, the main model's streams at positions 0 .. N-2, our MTP logits for them) in ubatches of UB."""
    toks = np.random.default_rng(0).integers(0, N_VOCAB, N).astype(np.int32)
    with load_model(path) as m:
        ctx = Context(m, 1024, n_ubatch=UB, backends=_ggml.Backends("cpu", 1), mtp=True)
        if h is None:
            hs = []
            for i in range(0, N, UB):
                ctx.eval(toks[i : i + UB], want_h=True)
                hs.append(ctx.last_h)
            h = np.concatenate(hs)[:-1]
        logits = np.concatenate([ctx.mtp_eval(toks[i + 1 : i + 1 + UB], h[i : i + UB]) for i in range(0, N - 1, UB)])
        del ctx
    return toks, h, logits


def reference(oracle: str, path: str, toks: np.ndarray, h: np.ndarray, tmp: str) -> np.ndarray:
    t, hf, out = (os.path.join(tmp, f) for f in ("t.npy", "h.npy", "r.npz"))
    np.save(t, toks[1:])
    np.save(hf, h)
    env = {**os.environ, "DSV4_ORACLE_NO_REPACK": "1"}
    subprocess.run([oracle, SCRIPT, "mtp", path, "--tokens-file", t, "--h-file", hf, "--ubatch", str(UB), "--out", out],
                   check=True, capture_output=True, env=env)  # fmt: skip
    return np.load(out)["logits"]


def agree(a: np.ndarray, ref: np.ndarray) -> None:
    rel = np.abs(a - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() <= 3e-3 and (a.argmax(1) == ref.argmax(1)).all(), (float(rel.max()), int(rel.argmax()))


def test_mtp_logits_agree_with_the_committed_reference(tmp_path: os.PathLike[str]) -> None:
    fx = np.load(FIXTURE)
    path = model(str(tmp_path))
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == str(fx["sha256"]), "the model changed: write the fixture again"
    toks, h, _ = ours(path)
    np.testing.assert_array_equal(toks, fx["tokens"])
    np.testing.assert_allclose(h, fx["h"], rtol=0, atol=1e-4 * np.abs(fx["h"]).max())  # our main streams: stable
    agree(ours(path, fx["h"])[2], fx["logits"])  # the same streams in, llama.cpp's MTP graph's logits out


ORACLE = os.environ.get("DSV4_ORACLE_PYTHON")


@pytest.mark.skipif(not ORACLE, reason="DSV4_ORACLE_PYTHON is not set (the reference implementation is optional)")
def test_mtp_logits_agree_with_the_live_reference(tmp_path: os.PathLike[str]) -> None:
    path = model(str(tmp_path))
    toks, h, logits = ours(path)
    agree(logits, reference(str(ORACLE), path, toks, h, str(tmp_path)))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        p = model(d)
        tk, hh, _ = ours(p)
        ref = reference(sys.argv[1], p, tk, hh, d)
        with open(p, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        np.savez_compressed(FIXTURE, tokens=tk, h=hh, logits=ref, sha256=np.array(sha))
        print(f"wrote {FIXTURE}")
