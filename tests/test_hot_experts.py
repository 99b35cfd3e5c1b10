"""Hot experts on a device (engine/hot_experts.py, docs/moe-residency.md "Hot experts on a device"): the split
graph computes exactly what the plain graph computes when both sides are the CPU (with ggml's products; with our
K-quant expert kernel, within float rounding), whatever the hot set and however it changes; the device copies are
what the graph reads; the slot bookkeeping; the Llama, CLI and server surface. The speed on a GPU is
bench/device_check.sh's."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import MICRO
from llama_dsv4.engine.context import Context

from llama_dsv4 import Llama, _ggml
from llama_dsv4.engine import runtime
from llama_dsv4.engine.hot_experts import lookup_rows, place
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model
from llama_dsv4.moe.device import DeviceHotSets

TOKENS = [int(x) for x in np.random.default_rng(3).integers(3, 250, 48)]


def run(path: str, hot: int, backends: Any, reassign: list[int] | None = None) -> list[np.ndarray]:
    """Logits of a 32-token prompt in two ubatches of 16 (ubatch products), then 8 single-token steps; with
    `reassign`, layer 1's hot set changes to it between the prompt and the steps."""
    m = load_model(path)
    try:
        ctx = Context(m, 256, n_ubatch=16, backends=backends, hot_experts=hot)
        out = [np.array(ctx.eval(TOKENS[a : a + 16], all_logits=True), copy=True) for a in (0, 16)]
        if reassign is not None:
            assert ctx.hot_experts.assign(1, reassign) > 0
            assert sorted(ctx.hot_experts.hot(1)) == sorted(reassign)
        out += [np.array(ctx.eval([t]), copy=True) for t in TOKENS[32:40]]
        del ctx
        return out
    finally:
        m.close()


@pytest.mark.parametrize("dtype", ["f32", "q8xq5"])
@pytest.mark.parametrize("portable", [False, True], ids=["ours", "portable"])
def test_logits_equal_with_hot_experts_on_the_cpu(tiny_paths: dict[str, str], dtype: str, portable: bool) -> None:
    path = tiny_paths[dtype]
    be = _ggml.Backends("cpu", 1, portable=portable)
    base = run(path, 0, be)
    n_expert = load_model(path).params.n_expert
    # Our expert kernel (Q8xQ5's Q5_K experts, ubatches of 8 tokens or more) picks its inner kernel by an expert's
    # token count, and the split adds the other side's picks to one expert (slot) per side: another summation order.
    exact = portable or dtype == "f32"
    for hot, reassign in ((3, [7, 0, 5]), (1, None), (n_expert, None)):
        got = run(path, hot, be, reassign)
        for a, b in zip(base, got, strict=True):
            if exact:
                assert np.array_equal(a, b), (hot, float(np.abs(a - b).max()))
            else:
                rel = float(np.abs(a - b).max() / np.abs(a).max())
                assert rel <= 2e-2 and (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9, (hot, rel)


def test_the_device_copies_are_what_the_graph_reads(tiny_paths: dict[str, str]) -> None:
    m = load_model(tiny_paths["f32"])
    try:
        ctx = Context(m, 256, n_ubatch=16, backends=_ggml.Backends("cpu", 1), hot_experts=4)
        hot = ctx.hot_experts
        base = np.array(ctx.eval(TOKENS[:16], all_logits=True), copy=True)
        for il in hot.layers:  # the hot copies of every layer's down projection zeroed
            name = hot.name(il, "down")
            hot.tensors.write(name, 0, np.zeros(len(hot.tensors.read(name)), np.uint8))
        ctx.reset()
        assert not np.allclose(base, np.array(ctx.eval(TOKENS[:16], all_logits=True), copy=True))
        for il in hot.layers:  # another set, then the first again: every slot copied from the model again
            assert hot.assign(il, [3, 2, 1, 0]) == 0  # the same experts keep their slots: nothing copied
            assert hot.assign(il, [4, 5, 6, 7]) == 4 and hot.assign(il, [0, 1, 2, 3]) == 4
        ctx.reset()
        assert np.array_equal(base, np.array(ctx.eval(TOKENS[:16], all_logits=True), copy=True))
        del ctx
    finally:
        m.close()


def test_slots_keep_their_experts_and_only_changes_are_copied() -> None:
    assert place([0, 1, 2, 3], [3, 9, 1, 8]) == ([9, 1, 8, 3], [0, 2])  # newcomers in the order given
    assert place([4, 5], [5, 4]) == ([4, 5], [])
    assert place([1, 2, 3], [7, 8, 9]) == ([7, 8, 9], [0, 1, 2])
    slot, cold, is_hot = lookup_rows([5, 2], 6)
    assert slot.tolist() == [0, 0, 1, 0, 0, 0] and is_hot.tolist() == [0, 0, 1, 0, 0, 1]
    assert cold.tolist() == [0, 1, 0, 3, 4, 0]  # a hot expert's cold pick: the first cold expert, weighted 0
    slot, cold, is_hot = lookup_rows([1, 0], 2)  # all hot: no cold expert exists (the graph skips that side)
    assert slot.tolist() == [1, 0] and is_hot.tolist() == [1, 1] and cold.tolist() == [0, 0]


def test_bad_hot_sets_are_refused(tiny_paths: dict[str, str]) -> None:
    m = load_model(tiny_paths["f32"])
    try:
        with pytest.raises(ValueError, match=r"hot_experts must be between 0 .* 8 experts, got 9"):
            Context(m, 64, backends=_ggml.Backends("cpu", 1), hot_experts=9)
        ctx = Context(m, 64, backends=_ggml.Backends("cpu", 1), hot_experts=2)
        hot = ctx.hot_experts
        assert hot.hot(0) == [0, 1] and hot.device == "CPU" and hot.nbytes > 0
        for bad, msg in (([1], "give 2 distinct"), ([1, 1], "give 2 distinct"), ([1, 8], r"in \[0, 8\)")):
            with pytest.raises(ValueError, match=msg):
                hot.assign(0, bad)
        with pytest.raises(ValueError, match="layer 99 has no hot experts"):
            hot.assign(99, [0, 1])
        assert hot.hot(0) == [0, 1]  # nothing changed by a refused assignment
        size = len(hot.tensors.read(hot.name(0, "slot")))  # 8 experts x 4 bytes
        assert size == 32 and len(hot.tensors.read(hot.name(0, "slot"), 8, 24)) == 24
        for bad_read in (
            lambda: hot.tensors.read(hot.name(0, "slot"), 8, 25),
            lambda: m.weights().read("blk.0.ffn_gate_exps.weight", 1 << 40, 1),
        ):
            with pytest.raises(ValueError, match="lie outside its"):
                bad_read()
        with pytest.raises(ValueError, match=r"bytes \[30, 34\) lie outside its 32"):
            hot.tensors.write(hot.name(0, "slot"), 30, np.zeros(4, np.uint8))
        with pytest.raises(KeyError, match=r"no tensor 'hot\.99\.slot'"):
            hot.tensors.read("hot.99.slot")
        del ctx
    finally:
        m.close()
    with pytest.raises(ValueError, match="moe_device_experts must be >= 0"):
        Llama(model_path=tiny_paths["f32"], moe_device_experts=-1, verbose=False)
    for bad in ("4", True, 2.0):
        with pytest.raises(TypeError, match="moe_device_experts must be an integer"):
            Llama(model_path=tiny_paths["f32"], moe_device_experts=bad, verbose=False)
    with pytest.raises(ValueError, match="ne0=33 is not a multiple of 32"):  # a Q8_0 row is whole blocks
        _ggml.DeviceTensors(_ggml.Backends("cpu", 1), 0, [("x", 8, (33, 2))])
    with pytest.raises(ValueError, match="duplicate tensor 'x'"):
        _ggml.DeviceTensors(_ggml.Backends("cpu", 1), 0, [("x", 0, (4,)), ("x", 0, (4,))])
    with pytest.raises(ValueError, match="do not combine with a split across RPC"):
        runtime.create_context(load_model(tiny_paths["f32"]), rpc_servers=["127.0.0.1:1"], hot_experts=2)


def test_device_sets_follow_the_ranking() -> None:
    assigned: dict[int, list[int]] = {}

    def assign(il: int, experts: Any) -> int:
        old = assigned.get(il, [])
        assigned[il] = [int(e) for e in experts]
        return len(set(assigned[il]) - set(old))

    hot = SimpleNamespace(layers=[0, 1], count=2, assign=assign, device="CPU", nbytes=10)
    residency = SimpleNamespace(order=np.array([[3, 1, 0, 2], [0, 1, 2, 3]]), listeners=[])
    d = DeviceHotSets(hot, residency)  # type: ignore[arg-type]
    assert assigned == {0: [3, 1], 1: [0, 1]} and d.copies == 4 and residency.listeners == [d.follow]
    residency.listeners[0](np.array([[1, 2, 3, 0], [0, 1, 2, 3]]))  # the residency's next update
    assert assigned == {0: [1, 2], 1: [0, 1]} and d.copies == 5
    assert d.stats() == {
        "device": "CPU",
        "device_hot_experts": 2,
        "device_hot_bytes": 10,
        "device_slot_copies": 5,
        "device_updates": 2,
    }


def test_llama_with_device_experts_writes_the_same_text(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", os.path.join(model_dir, "home-hot"))
    path = write_model(
        os.path.join(model_dir, "moe16-hot.gguf"), dataclasses.replace(MICRO, n_expert=16, n_expert_used=4), dtype="f32"
    )[0]
    texts, stats = [], []
    for n in (0, 6):
        llm = Llama(
            model_path=path, n_ctx=512, n_batch=64, n_ubatch=64, n_threads=1, verbose=False, moe_device_experts=n
        )
        texts.append(llm.create_completion("hello there " * 40, max_tokens=24, temperature=0)["choices"][0]["text"])
        stats.append(llm.moe_stats())
        llm.close()
    assert texts[0] == texts[1] and len(texts[0]) > 0
    assert stats[0] is None
    s = stats[1]
    assert (s["device"], s["device_hot_experts"], s["device_updates"]) == ("CPU", 6, 1)
    assert s["hot_per_layer"] == [6] * MICRO.n_layer and s["locked_bytes"] == 0  # counted, ranked, nothing locked
    assert s["routed"] == s["tokens_counted"] * 4 * MICRO.n_layer > 0


def test_flags_reach_llama(
    real_vocab_path: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--moe-device-experts is Llama's moe_device_experts, in the CLI (the same completion; a count above the
    model's experts refused as Llama refuses it) and the server's settings."""
    from llama_dsv4.cli import main as cli_main
    from llama_dsv4.server.settings import parse_args

    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["-m", real_vocab_path, "-p", "Once upon a time,", "-n", "6", "-t", "1", "--temp", "0", "--no-preload"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main([*args, "--moe-device-experts", "2"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("Once upon a time,")
    assert cli_main([*args, "--moe-device-experts", str(MICRO.n_expert + 1)]) == 1
    assert f"hot_experts must be between 0 (off) and the model's {MICRO.n_expert}" in capsys.readouterr().err
    m = ["-m", real_vocab_path]
    assert parse_args([*m, "--moe-device-experts", "32"], env={}).llama_kwargs()["moe_device_experts"] == 32
    assert "moe_device_experts" not in parse_args(m, env={}).llama_kwargs()
    with pytest.raises((SystemExit, ValueError), match="--moe-device-experts must be >= 0"):
        parse_args([*m, "--moe-device-experts", "-1"], env={})
