"""The training recipe's network (train/model.py, PyTorch) against our engine: a network exported with our writer
gives the engine's logits. Needs the training extra (`pip install ".[train]"`); run it with
`python -m pytest -q tests/test_train_export.py`."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training extra is not installed: pip install '.[train]'")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_dsv4.engine.context import Context  # noqa: E402

from llama_dsv4 import _ggml  # noqa: E402
from llama_dsv4.model.loader import load_model  # noqa: E402
from llama_dsv4.model.params import DSV4Params  # noqa: E402
from train.export import export  # noqa: E402
from train.model import DSV4  # noqa: E402

# every path: a hash-routed SWA layer, CSA (ratio 4, indexer top-k below the visible entries), HCA (ratio 128,
# crossed twice by 300 tokens), learned routing with the bias, and an MTP layer (exported, not run by the engine)
PARAMS = DSV4Params(
    n_vocab=300, n_embd=64, n_layer=4, n_nextn=1, compress_ratios=(0, 4, 128, 4, 0), hash_layer_count=1,
    head_dim=64, rope_dim=16, q_lora_rank=32, o_group_count=2, o_lora_rank=16, sliding_window=16,
    indexer_n_head=2, indexer_head_dim=32, indexer_top_k=4, n_expert=4, n_expert_used=2, expert_ff=64,
    swiglu_clamp_exp=(10.0,), swiglu_clamp_shexp=(10.0,),
)  # fmt: skip
N_TOKENS, UBATCH = 300, 64


def engine_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    with load_model(path) as m:
        ctx = Context(m, 1024, n_ubatch=UBATCH, type_k="f32", backends=_ggml.Backends("cpu", 1), flash_attn=False)
        out = [ctx.eval(tokens[i : i + UBATCH], all_logits=True) for i in range(0, len(tokens), UBATCH)]
        del ctx
    return np.concatenate(out)


def reference_run(seed: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 recipe network with the engine's tie-breaking top-k, N_TOKENS random tokens, and its main and MTP
    logits on them."""
    torch.manual_seed(0)
    net = DSV4(PARAMS, seed=seed).double().eval()
    net.exact_top_k = True
    tokens = torch.randint(0, PARAMS.n_vocab, (1, N_TOKENS))
    with torch.no_grad():
        ref, mtp, _ = net(tokens, mtp=True)
    return net, tokens, ref, mtp


def test_torch_forward_equals_the_engine_on_the_exported_file(tmp_path: os.PathLike[str]) -> None:
    """float64 torch with the engine's tie-breaking top-k vs the engine in f32 with exact attention: the bound of
    tests/test_forward.py's exact-attention test (1e-5 of the largest logit) at every one of 300 positions."""
    net, tokens, ref, mtp = reference_run(seed=1)
    assert mtp is not None and mtp.shape == (1, N_TOKENS - 1, PARAMS.n_vocab)
    ours = engine_logits(export(net, os.path.join(tmp_path, "t.gguf")), tokens[0].numpy().astype(np.int32))
    ref_np = ref[0].numpy()
    rel = np.abs(ours - ref_np).max(axis=1) / np.abs(ref_np).max(axis=1)
    assert rel.max() <= 1e-5, (float(rel.max()), int(rel.argmax()))
    assert (ours.argmax(1) == ref_np.argmax(1)).all()


def test_the_mtp_block_equals_the_recipes(tmp_path: os.PathLike[str]) -> None:
    """The MTP (nextn) block run by the engine (Context(mtp=True): eval(want_h=True) gives the main model's final
    streams, mtp_eval reads them with the next tokens, in ubatches through its own sliding window) against the
    recipe's MTP head, DeepSeek's formula, at every one of 299 positions; and a chained draft (the MTP's own streams
    fed back, as speculation uses them) is the same computation one row at a time."""
    net, tokens, _, mtp = reference_run(seed=3)
    ref = mtp[0].numpy()
    toks = tokens[0].numpy().astype(np.int32)
    with load_model(export(net, os.path.join(tmp_path, "m.gguf"))) as m:
        ctx = Context(m, 1024, n_ubatch=UBATCH, type_k="f32", backends=_ggml.Backends("cpu", 1), flash_attn=False,
                      mtp=True)  # fmt: skip
        hs = []
        for i in range(0, N_TOKENS, UBATCH):
            ctx.eval(toks[i : i + UBATCH], all_logits=True, want_h=True)
            hs.append(ctx.last_h)
        h = np.concatenate(hs)
        assert h.shape == (N_TOKENS, PARAMS.hc_mult * PARAMS.n_embd)
        ours = np.concatenate([
            ctx.mtp_eval(toks[i + 1 : i + 1 + UBATCH], h[i : min(i + UBATCH, N_TOKENS - 1)])
            for i in range(0, N_TOKENS - 1, UBATCH)
        ])  # fmt: skip
        assert ctx.mtp_n_past() == N_TOKENS - 1
        # one row at a time from position 250 on: the same logits, and the streams it returns feed the next row
        ctx.mtp_truncate(250)
        one = [ctx.mtp_eval(toks[i + 1 : i + 2], h[i : i + 1], want_h=True)[0] for i in range(250, N_TOKENS - 1)]
        assert ctx.last_h.shape == (1, h.shape[1])
        del ctx
    rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() <= 1e-5, (float(rel.max()), int(rel.argmax()))
    np.testing.assert_allclose(np.array(one), ours[250:], rtol=0, atol=1e-5 * np.abs(ours[250:]).max())
    with load_model(os.path.join(tmp_path, "m.gguf")) as m:
        params = m.params
    cut = {k: getattr(params, k)[:-1] for k in ("compress_ratios", "swiglu_clamp_exp", "swiglu_clamp_shexp")}
    no_mtp = dataclasses.replace(params, n_nextn=0, **cut)
    with pytest.raises(ValueError, match="no MTP"), load_model(os.path.join(tmp_path, "m.gguf")) as m:
        Context(m, 64, params=no_mtp, backends=_ggml.Backends("cpu", 1), mtp=True)


def test_training_step_reduces_the_loss_and_moves_the_bias() -> None:
    """One batch, a few Adam steps: every loss is finite and falls, the indexer gets its own gradient, the routed
    layers' selection bias moves (auxiliary-loss-free balancing)."""
    from train.train import losses

    torch.manual_seed(0)
    net = DSV4(PARAMS, seed=2).train()
    tokens = torch.randint(0, PARAMS.n_vocab, (1, 136))  # past the first HCA block (128)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    bias0 = net.t("blk.1.exp_probs_b.bias").clone()
    first = None
    for _ in range(4):
        total, parts, aux = losses(net, tokens)
        assert all(np.isfinite(v) for v in parts.values()), parts
        opt.zero_grad()
        total.backward()
        assert net.t("blk.1.indexer.proj.weight").grad.abs().sum() > 0
        opt.step()
        net.update_bias(aux, 1e-3)
        first = first or parts
    assert parts["main"] < first["main"] and parts["mtp"] < first["mtp"], (first, parts)
    assert not torch.equal(bias0, net.t("blk.1.exp_probs_b.bias"))


@pytest.mark.parametrize("n_tokens", [37, 300])
def test_the_window_in_blocks_equals_all_pairs(n_tokens: int) -> None:
    """Training computes the sliding window in blocks of W queries (window_scores: [T, 2W] scores, not [T, T]);
    the logits of both heads and every gradient equal those of the scores over all pairs, for lengths that are not a
    multiple of the window (the last block padded), with HCA entries beside the window at 300 tokens."""
    torch.manual_seed(0)
    tokens = torch.randint(0, PARAMS.n_vocab, (2, n_tokens))
    out = []
    for dense in (False, True):
        net = DSV4(PARAMS, seed=5).double().train()
        net.dense_window = dense
        logits, mtp, aux = net(tokens, mtp=True)
        (logits.square().mean() + mtp.square().mean() + aux.get("indexer", 0)).backward()
        out.append((logits.detach(), mtp.detach(), {n: w.grad for n, w in net.named_parameters()}))
    (lb, mb, gb), (ld, md, gd) = out
    assert torch.allclose(lb, ld, rtol=0, atol=1e-10) and torch.allclose(mb, md, rtol=0, atol=1e-10)
    assert gb.keys() == gd.keys() and sum(g is not None for g in gb.values()) > 20
    for name, g in gb.items():
        assert (g is None) == (gd[name] is None), name
        assert g is None or torch.allclose(g, gd[name], rtol=1e-8, atol=1e-12), name


def test_the_compiled_step_equals_the_eager_one() -> None:
    """`train.train --compile`: torch.compile traces the whole network as one graph (fullgraph, the MoE's per-expert
    row counts as data-dependent sizes) and its losses, expert loads and every gradient equal eager's. The AOT
    autograd backend checks the traced graph without inductor's code generation (minutes on this machine)."""
    from train.train import compiled, losses

    torch.manual_seed(0)
    tokens = torch.randint(0, PARAMS.n_vocab, (2, 136))  # past the first HCA block (128)
    mask = (torch.rand(2, 136) > 0.3).to(torch.uint8)
    out = []
    for compile_ in (False, True):
        net = DSV4(PARAMS, seed=3).double().train()
        total, parts, aux = losses(compiled(net, "aot_eager") if compile_ else net, tokens, 0.3, mask)
        total.backward()
        out.append((parts, aux, {n: w.grad for n, w in net.named_parameters()}))
    (pe, ae, ge), (pc, ac, gc) = out
    assert pe.keys() == pc.keys() == {"main", "mtp", "indexer"}
    assert all(abs(pe[k] - pc[k]) <= 1e-12 * abs(pe[k]) for k in pe), (pe, pc)
    assert ae.keys() == ac.keys() and all(torch.equal(ae[k], ac[k]) for k in ae if k.startswith("load"))
    assert sum(g is not None for g in ge.values()) > 20
    for name, g in ge.items():
        assert (g is None) == (gc[name] is None), name
        assert g is None or torch.allclose(g, gc[name], rtol=1e-9, atol=1e-14), name


def test_step_time_prints_both_variants() -> None:
    """`python -m train.step_time` (the training step's benchmark) runs and prints its table; bad sizes are an
    argparse error."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "train.step_time", "--batch", "1", "--seq", "70", "--threads", "1"]
    done = subprocess.run([*cmd, "--steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [r for r in done.stdout.splitlines() if r.startswith("| window")]
    assert len(rows) == 2 and rows[1].endswith("| 1.00x |"), done.stdout
    assert float(rows[0].split("|")[2]) > 0, rows
    bad = subprocess.run([*cmd, "--steps", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--steps" in bad.stderr, bad.stderr


def test_until_parses_a_probe_column_a_deadline_or_both() -> None:
    """`--until` conditions: probe columns' thresholds (all of them, joined by `and`), minutes into the phase, or
    whichever comes first; a misspelt condition is an error naming what is expected."""
    from train.train import Until, parse_until

    assert parse_until("currency>=0.75 or 50") == Until((("currency", 0.75),), 50.0)
    assert parse_until("copy >= 0.6") == Until((("copy", 0.6),), None)
    assert parse_until("20") == Until((), 20.0)
    both = parse_until("copy>=0.6 or 20")
    assert not both.reached({}, 19.9) and both.reached({}, 20.0)
    assert not both.reached({"copy": 0.59, "currency": 1.0}, 5) and both.reached({"copy": 0.6}, 5)
    every = parse_until("copy>=0.85 and currency>=0.75 or 24")
    assert every == Until((("copy", 0.85), ("currency", 0.75)), 24.0)
    assert not every.reached({"copy": 0.9, "currency": 0.7}, 5) and not every.reached({"copy": 0.8, "currency": 1}, 5)
    assert every.reached({"copy": 0.85, "currency": 0.75}, 5) and every.reached({}, 24.0)
    assert not parse_until("20").reached({"copy": 1.0}, 19.9)
    for bad in (
        "cities>=0.5",
        "copy>0.5",
        "copy>=0.5 and 3",
        "",
        "3 or 4",
        "copy>=0.5.1",
        "1.2.3",
        "copy>=0.5 or currency>=0.5",
        "copy>=0.5 or 3 or 4",
        "copy>=0.5 and copy>=0.6",
        "copy>=0.5 and",
    ):
        with pytest.raises(ValueError, match="--until"):
            parse_until(bad)


def _tiny_data(path: str, n_vocab: int, seed: int) -> None:
    """A data folder as train.data writes one, with random tokens (no probe)."""
    import json

    os.makedirs(path)
    rng = np.random.default_rng(seed)
    rng.integers(0, n_vocab, 4096).astype(np.uint16).tofile(os.path.join(path, "train.bin"))
    np.ones(4096, np.uint8).tofile(os.path.join(path, "train_mask.bin"))
    np.arange(0, 4096, 64, dtype=np.int64).tofile(os.path.join(path, "train_starts.bin"))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({"tokens": [f"t{i}" for i in range(n_vocab)]}, f)


def test_a_run_of_fixed_steps_repeats_itself(tmp_path: os.PathLike[str]) -> None:
    """`train.train --steps N`: the schedule is fitted to N steps instead of the measured speed, so the same command
    gives the same learning rates and losses, row for row (only the seconds differ), and stops at N steps."""
    import csv
    import json
    import subprocess

    data = os.path.join(tmp_path, "d")
    _tiny_data(data, 300, 1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "train.train", "--data", data, "--seq", "64", "--batch", "1", "--threads", "1",
           "--log-every", "2", "--warmup", "2", "--minutes", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": root}
    rows = []
    for run in ("r1", "r2"):
        out = os.path.join(tmp_path, run)
        done = subprocess.run([*cmd, "--steps", "6", "--out", out], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        with open(os.path.join(out, "done.json")) as f:
            assert json.load(f)["steps"] == 6
        with open(os.path.join(out, "loss.csv"), newline="") as f:
            rows.append([{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)])
    assert len(rows[0]) == 3 and rows[0] == rows[1], rows
    assert float(rows[0][-1]["lr"]) < float(rows[0][0]["lr"])  # the cosine ends with the steps, not the minutes
    bad = subprocess.run([*cmd, "--steps", "0", "--out", os.path.join(tmp_path, "bad")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--steps" in bad.stderr, bad.stderr
    short = subprocess.run([*cmd, "--seq", "5000", "--out", os.path.join(tmp_path, "bad")], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert short.returncode == 2 and "no window of 5000 tokens" in short.stderr, short.stderr


def test_a_curriculum_switches_data_within_one_run(tmp_path: os.PathLike[str]) -> None:
    """`train.train --until M --then DIR2`: one run, whose loss.csv rows go from phase 1 to phase 2 when the
    deadline passes; a second folder with another vocabulary, or a condition on a column the data never probes, is
    refused before training starts; train.plot numbers a second file's phases on."""
    import csv
    import subprocess

    first, second, other = (os.path.join(tmp_path, d) for d in ("a", "b", "c"))
    _tiny_data(first, 300, 1)
    _tiny_data(second, 300, 2)
    _tiny_data(other, 301, 3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "train.train", "--data", first, "--seq", "64", "--batch", "1", "--threads", "1",
           "--log-every", "1", "--minutes", "0.25", "--until", "0.05"]  # fmt: skip
    run = os.path.join(tmp_path, "run")
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([*cmd, "--then", second, "--out", run], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(run, "loss.csv"), newline="") as f:
        phases = [int(r["phase"]) for r in csv.DictReader(f)]
    assert phases[0] == 1 and phases[-1] == 2 and phases == sorted(phases), phases
    from train.plot import merged

    twice = merged([os.path.join(run, "loss.csv")] * 2)  # a later file's phases are numbered on from the first's
    assert [r["phase"] for r in twice] == phases + [p + 2 for p in phases]
    assert twice[len(phases)]["step"] == twice[len(phases) - 1]["step"] + 1
    bad_out = os.path.join(tmp_path, "bad")
    bad = subprocess.run([*cmd, "--then", other, "--out", bad_out], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "vocabulary" in bad.stderr, bad.stderr
    unprobed = subprocess.run([*cmd[:-2], "--until", "copy>=0.5", "--then", second, "--out", bad_out], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert unprobed.returncode != 0 and "no copy items" in unprobed.stderr, unprobed.stderr
