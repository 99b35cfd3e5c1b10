"""Speculative decoding with the model's MTP block (docs/speculative.md): greedy decoding with it gives exactly
the tokens greedy decoding gives without it, on the trained demo model (whose MTP head agrees often: drafts are
kept) and on a random model whose drafts are mostly rejected, across compression-block boundaries of both ratios;
after such a run the engine's state equals the state after the same tokens decoded one by one; and the interface
refuses what cannot work with a clear error."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pytest

from llama_dsv4 import Llama
from llama_dsv4.demo import demo_model_path
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

QUESTIONS = (
    "What is 374 + 783?",
    "What is 682 - 419?",
    'Return JSON with the key "numbers" holding the numbers from 3 to 7.',
)


def greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("n_max", [1, 2, 3])
def test_greedy_tokens_are_the_same_on_the_trained_demo_model(n_max: int) -> None:
    plain = Llama(model_path=demo_model_path(), n_ctx=512, n_threads=2, verbose=False)
    spec = Llama(model_path=demo_model_path(), n_ctx=512, n_threads=2, verbose=False, spec_type="mtp",
                 spec_draft_n_max=n_max)  # fmt: skip
    for q in QUESTIONS:
        a = plain.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0, max_tokens=100)
        b = spec.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0, max_tokens=100)
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert a["usage"] == b["usage"]
    st = spec.spec_stats()
    assert st is not None and st["n_max"] == n_max and st["drafted"] > 0
    assert 0 < st["accepted"] <= st["drafted"] and st["accepted_at"][0] >= max(st["accepted_at"])
    assert plain.spec_stats() is None
    plain.close()
    spec.close()


@pytest.fixture(scope="module")
def random_mtp_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    # compressed layers of both ratios and an MTP block; a window of 8 so the rings wrap
    p = DSV4Params(n_layer=3, n_nextn=1, compress_ratios=(4, 128, 0, 0), n_embd=64, head_dim=32, rope_dim=16,
                   n_head=2, q_lora_rank=32, o_lora_rank=16, o_group_count=2, sliding_window=8, indexer_n_head=2,
                   indexer_head_dim=32, indexer_top_k=4, n_expert=4, n_expert_used=2, expert_ff=64,
                   hash_layer_count=0, swiglu_clamp_exp=10.0, swiglu_clamp_shexp=10.0)  # fmt: skip
    return write_model(os.path.join(tmp_path_factory.mktemp("spec"), "r.gguf"), p, seed=5)[0]


def test_rejected_drafts_leave_no_trace(random_mtp_model: str) -> None:
    """300 greedy tokens from a 3-token prompt cross two HCA blocks (128) and 75 CSA blocks (4); the random MTP
    head's drafts are rejected at positions of every residue modulo 4. Same tokens; the saved engine state after
    the run holds what a plain evaluation of the same tokens holds: the logits of 136 further tokens (through the
    rings, the compressor rows and both compressed caches) agree within the forward tolerance (the truncations
    evaluate some positions again in other ubatches)."""
    kw: dict[str, Any] = dict(model_path=random_mtp_model, n_ctx=512, n_threads=1, verbose=False, type_k=0,
                              logits_all=True)  # fmt: skip
    plain = Llama(**kw)
    prompt = [1, 2, 3]
    ref = greedy(plain, prompt, 300)
    for n_max in (1, 3):
        spec = Llama(**kw, spec_type="mtp", spec_draft_n_max=n_max)
        assert greedy(spec, prompt, 300) == ref
        st = spec.spec_stats()
        assert st is not None and st["drafted"] > 100
        assert st["accepted"] < st["drafted"]  # rejections happened
        # the state after the run (the last verification's tokens held) against a plain evaluation of those tokens
        held = [int(t) for t in spec.input_ids[: spec.n_tokens]]
        assert held[: len(prompt) + 299] == prompt + ref[:299]  # (then the last verification's drafts)
        plain.reset()
        plain.eval(held)
        # what the state holds shows in what comes next: 136 more tokens (another HCA block) evaluated by both
        more = [int(t) for t in np.random.default_rng(n_max).integers(3, plain.n_vocab(), 136)]
        spec.eval(more)
        plain.eval(more)
        assert spec.n_tokens == plain.n_tokens == len(held) + 136
        ours, theirs = np.asarray(spec.eval_logits)[-136:], np.asarray(plain.eval_logits)[-136:]
        rel = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)
        assert rel.max() <= 1e-4, (float(rel.max()), int(rel.argmax()))
        spec.close()
    plain.close()


def test_held_mtp_graph_gives_the_numbers_of_a_fresh_build(random_mtp_model: str) -> None:
    """The MTP block's one-row graph is built once per sequence and want_h, and run again for each further one-row
    step: its logits and streams equal, bit for bit, those of a graph built afresh for every step (a debug capture
    takes that path), through a ring that wraps (window 8), a truncation and a change of sequence."""
    from llama_dsv4.engine.context import Context

    from llama_dsv4 import _ggml
    from llama_dsv4.model.loader import load_model

    with load_model(random_mtp_model) as m:
        held, fresh = (Context(m, 256, n_ubatch=16, backends=_ggml.Backends("cpu", 1), n_seq=2, mtp=True)
                       for _ in range(2))  # fmt: skip
        rng = np.random.default_rng(3)
        toks, h = {}, {}
        for s in (0, 1):
            toks[s] = [int(t) for t in rng.integers(3, m.params.n_vocab, 40)]
            for ctx in (held, fresh):
                ctx.eval(toks[s], seq_id=s, want_h=True)
            h[s] = held.last_h  # (the main graph is the same in both)
        pos, steps = {0: 0, 1: 0}, 0
        # (sequence, want_h, rows read one at a time; None: sequence 0's block goes back 6 rows)
        for s, want_h, count in [(0, True, 20), (0, None, 0), (0, True, 25), (1, False, 10), (1, True, 29)]:
            if want_h is None:
                for ctx in (held, fresh):
                    ctx.mtp_truncate(pos[0] - 6, 0)
                pos[0] -= 6
                continue
            for _ in range(count):
                i = pos[s]
                got = []
                for ctx in (held, fresh):
                    if ctx is fresh:
                        ctx.capture([])
                    lg = ctx.mtp_eval([toks[s][i + 1]], h[s][i : i + 1], s, all_logits=False, want_h=want_h)
                    got.append((lg, ctx.last_h))
                assert np.array_equal(got[0][0], got[1][0]), (s, i)
                assert not want_h or np.array_equal(got[0][1], got[1][1]), (s, i)
                pos[s] += 1
                steps += 1
        assert (held.mtp_n_past(0), held.mtp_n_past(1)) == (fresh.mtp_n_past(0), fresh.mtp_n_past(1)) == (39, 39)
        assert held.mtp_graph_builds == 3 and fresh.mtp_graph_builds == 0 and steps == 84


def test_rejected_drafts_leave_no_trace_in_the_routing_statistics(random_mtp_model: str, tmp_path: Any) -> None:
    """With expert residency on, the routing counted after a run with speculation (drafts mostly rejected) is the
    routing of the tokens the engine holds, each counted once:
    equal to a plain evaluation of those tokens (lifetime counts and tokens exactly; the decayed counts within a
    rounding, their decay being applied per ubatch)."""
    kw: dict[str, Any] = dict(model_path=random_mtp_model, n_ctx=512, n_threads=1, verbose=False, type_k=0,
                              moe_hot_count=2)  # fmt: skip
    spec = Llama(**kw, spec_type="mtp", spec_draft_n_max=3, moe_stats_path=os.path.join(tmp_path, "a.stats"))
    plain = Llama(**kw, moe_stats_path=os.path.join(tmp_path, "b.stats"))
    try:
        greedy(spec, [1, 2, 3], 200)
        st = spec.spec_stats()
        assert st is not None and st["accepted"] < st["drafted"]  # rejections: truncations dropped their rows
        held = [int(t) for t in spec.input_ids[: spec.n_tokens]]
        assert spec.moe_stats() is not None  # (commits what the engine holds)
        plain.eval(held[:3])
        for t in held[3:]:  # decoded one by one
            plain.eval([t])
        assert plain.moe_stats() is not None
        a, b = spec._runner.moe.counts, plain._runner.moe.counts
        assert a.tokens == b.tokens == len(held)
        assert np.array_equal(a.lifetime, b.lifetime)
        np.testing.assert_allclose(a.decayed, b.decayed, rtol=1e-3)  # (a verification's rows decay together)
    finally:
        spec.close()
        plain.close()


def test_what_cannot_work_is_refused(tmp_path: Any) -> None:
    no_mtp = write_model(os.path.join(tmp_path, "n.gguf"), seed=1)[0]
    with pytest.raises(ValueError, match="MTP"):
        Llama(model_path=no_mtp, n_ctx=64, verbose=False, spec_type="mtp")
    with pytest.raises(ValueError, match="spec_type"):
        Llama(model_path=demo_model_path(), n_ctx=64, verbose=False, spec_type="eagle")
    for bad in (0, 17, 2.5, "x"):
        with pytest.raises(ValueError, match="spec_draft_n_max"):
            Llama(model_path=demo_model_path(), n_ctx=64, verbose=False, spec_type="mtp", spec_draft_n_max=bad)
    with pytest.raises(ValueError, match="n_seq_max"):
        Llama(model_path=demo_model_path(), n_ctx=64, verbose=False, spec_type="mtp", n_seq_max=2)
    with pytest.raises(ValueError, match="draft_model"):
        Llama(model_path=demo_model_path(), n_ctx=64, verbose=False, spec_type="mtp", draft_model=lambda ids: [])


def test_cli_and_server_flags(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's spelling, --spec-type draft-mtp --spec-draft-n-max N: the CLI's greedy text is unchanged by it;
    the server passes it to its slots and refuses it for several sequences of one context."""
    from llama_dsv4.cli import main as cli_main
    from llama_dsv4.server.settings import SettingsError, parse_args

    args = ["-cnv", "-n", "120", "--temp", "0", "-t", "1", "--no-preload"]
    outs = []
    for extra in ([], ["--spec-type", "draft-mtp", "--spec-draft-n-max", "3"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("What is 374 + 783?\n"))
        assert cli_main([*args, *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "= 1157" in outs[0], outs
    kw = parse_args(["-m", demo_model_path(), "--spec-type", "draft-mtp"]).llama_kwargs()
    assert kw["spec_type"] == "mtp" and kw["spec_draft_n_max"] == 2
    assert "spec_type" not in parse_args(["-m", demo_model_path()]).llama_kwargs()
    with pytest.raises(SettingsError, match="--parallel 1"):
        parse_args(["-m", demo_model_path(), "--spec-type", "draft-mtp", "-np", "2"])
    kw = parse_args(["-m", demo_model_path(), "--spec-type", "draft-mtp", "-np", "2", "-nocb"]).llama_kwargs()
    assert kw["spec_type"] == "mtp"
    with pytest.raises(SettingsError, match="spec-draft-n-max"):
        parse_args(["-m", demo_model_path(), "--spec-type", "draft-mtp", "--spec-draft-n-max", "0"])


@pytest.mark.parametrize("which", ["demo", "random"])
def test_sampling_keeps_the_models_distribution(which: str, random_mtp_model: str) -> None:
    """With temperature 1 each position is sampled once, from the main model's distribution, and a draft is kept
    only when the sample equals it: the standard acceptance rule for a deterministic (greedy) draft, whose
    rejected position yields the sample itself, so the output distribution is the main model's. Shown the strong
    way: for every seed, the text is the very one sampled without speculation (same draws, same logits), on the
    trained model (drafts mostly kept) and on a random one (mostly rejected)."""
    path = demo_model_path() if which == "demo" else random_mtp_model
    kw: dict[str, Any] = dict(model_path=path, n_ctx=256, n_threads=1, verbose=False)
    a, b = Llama(**kw), Llama(**kw, spec_type="mtp", spec_draft_n_max=2)
    prompt = a.tokenize(b"What is 12 + 35?") if which == "demo" else [1, 2, 3]
    for seed in range(12):
        outs = []
        for llm in (a, b):
            r = llm.create_completion(prompt, temperature=1.0, top_k=0, top_p=1.0, max_tokens=24, seed=seed)
            outs.append(r["choices"][0]["text"])
        assert outs[0] == outs[1], seed
    st = b.spec_stats()
    assert st is not None and st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]
    a.close()
    b.close()


def test_long_prompt_in_small_ubatches(random_mtp_model: str) -> None:
    """A prompt of 70 tokens evaluated 32 at a time in ubatches of 16: the MTP block reads the kept rows whenever
    more than a ubatch waits, and the drafts after the prompt see its whole window; greedy tokens unchanged."""
    kw: dict[str, Any] = dict(model_path=random_mtp_model, n_ctx=256, n_batch=32, n_ubatch=16, n_threads=1,
                              verbose=False)  # fmt: skip
    prompt = [int(t) for t in np.random.default_rng(7).integers(3, 200, 70)]
    ref = greedy(Llama(**kw), prompt, 90)
    spec = Llama(**kw, spec_type="mtp", spec_draft_n_max=3)
    assert greedy(spec, prompt, 90) == ref
    assert spec._runner.context.mtp_n_past() >= len(prompt)  # the block read the prompt
    spec.close()


def test_short_truncations_restore_the_state_without_evaluating(random_mtp_model: str) -> None:
    """The rollback of rejected drafts at the engine level: a context with keep_back=3 evaluates a verification of
    4 tokens, then keeps 1 to 3 of them (truncate), at every position modulo 4 and across the HCA block boundary at
    128; nothing is evaluated again, and what follows gives the logits of a context that evaluated only the kept
    tokens (through the compressor rows, both compressed caches and the rings)."""
    from llama_dsv4.engine.context import Context

    from llama_dsv4 import _ggml
    from llama_dsv4.model.loader import load_model

    rng = np.random.default_rng(3)
    toks = rng.integers(3, 200, 200).astype(np.int32)
    one = _ggml.Backends("cpu", 1)
    with load_model(random_mtp_model) as m:
        spec = Context(m, 256, n_ubatch=64, type_k="f32", backends=one, flash_attn=False, keep_back=3)
        plain = Context(m, 256, n_ubatch=64, type_k="f32", backends=one, flash_attn=False)
        for p0 in (*range(100, 108), *range(122, 134)):
            for keep in (1, 2, 3):
                spec.reset()
                plain.reset()
                spec.eval(toks[:p0])
                spec.eval(toks[p0 : p0 + 4])  # the verification
                assert spec.truncate(toks[: p0 + keep]) == 0  # nothing evaluated again
                plain.eval(toks[: p0 + keep])
                nxt = toks[150:170]
                a, b = spec.eval(nxt, all_logits=True), plain.eval(nxt, all_logits=True)
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max(), err_msg=f"{p0} {keep}")
        with pytest.raises(ValueError, match="keep_back"):
            Context(m, 256, n_ubatch=4, backends=one, keep_back=4)
        del spec, plain
