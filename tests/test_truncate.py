"""Truncating a sequence to a prefix of what it holds (Context.truncate, docs/architecture.md §11.4): only the
positions whose compressor rows were lost are evaluated again, and what follows equals a fresh evaluation of the
prefix, bit for bit on the f32 models where the ubatches are the same, within the forward-pass tolerances of
tests/test_multiseq.py where they are not."""

from __future__ import annotations

import os

import numpy as np
import pytest
from forward_models import MODELS, SEED
from llama_dsv4.engine.context import Context
from test_forward import ONE
from test_multiseq import check

from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model

N_CTX = 400
CONT = 40  # tokens evaluated after the truncation, all their logits compared


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = str(tmp_path_factory.mktemp("truncate"))
    out = {}
    for name in ("decisive", "second-decisive-prune", "decisive-q8xq5"):
        params, init, dtype = MODELS[name]
        path = os.path.join(tmp, f"{name}.gguf")
        out[name] = write_model(path, params, dtype=dtype, vocab="none", init=init, seed=SEED)[0]
    params, init, dtype = MODELS["decisive"]
    wide = params.with_(sliding_window=512)  # a ring of n_ctx rows: never overwritten
    out["decisive-wide"] = write_model(os.path.join(tmp, "wide.gguf"), wide, dtype=dtype, vocab="none", init=init)[0]
    return out


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, n).astype(np.int32)


def evaluate(ctx: Context, toks: np.ndarray, cuts: tuple[int, ...]) -> None:
    """Evaluate toks in calls that end at each cut (each call in ubatches of n_ubatch from its start)."""
    start = 0
    for end in (*cuts, len(toks)):
        if end > start:
            ctx.eval(toks[start:end])
            start = end


# (k, N, where the evaluation starts again) in the tiny model (ratio 4 and 128 layers, window 16) with n_ubatch 160
# (a ring of 175 rows): -1 is a full evaluation
UBATCH = 160
CASES = [
    (3, 9, -1),  # the ratio-4 rows before position 4 are the virtual block's: starts over (3 positions)
    (128, 131, 128),  # k and N share their blocks: nothing evaluated
    (129, 131, 129),
    (130, 135, 124),  # the ratio-4 block of k differs: from the block before it (the overlap), 6 positions
    (132, 140, 128),
    (127, 131, -1),  # the 128-block of k differs and starts at 0: starts over
    (200, 260, 128),  # the 128-block of k differs: from its start, 72 positions
    (256, 300, 252),  # at a 128 boundary, the 128-block is the same: the ratio-4 rule (252 .. 255)
    (255, 288, 128),  # the window before 128 is the oldest the ring still holds (N - start = n_ubatch)
    (255, 289, -1),  # ... one position later it is overwritten: starts over
    (300, 383, 296),
    (300, 390, 256),
    (150, 390, -1),  # N - k larger than the ring
]


def same_split(path: str, type_k: str, k: int, n: int, start: int) -> None:
    held, cont = tokens(n, k), tokens(CONT, n)
    with load_model(path) as m:
        ctx = Context(m, N_CTX, n_ubatch=UBATCH, type_k=type_k, backends=ONE)
        fresh = Context(m, N_CTX, n_ubatch=UBATCH, type_k=type_k, backends=ONE)
        cuts = (max(start, 0), k)
        evaluate(ctx, held, cuts)
        evaluate(fresh, held[:k], cuts)
        assert ctx.rebuild_start(0, k) == start
        assert ctx.truncate(held[:k]) == (k if start < 0 else k - start)
        assert ctx.n_past == k
        np.testing.assert_array_equal(ctx.eval(cont, all_logits=True), fresh.eval(cont, all_logits=True))


@pytest.mark.parametrize(("k", "n", "start"), CASES)
def test_truncate_equals_a_fresh_evaluation_bit_for_bit(models: dict[str, str], k: int, n: int, start: int) -> None:
    """The same ubatches on both sides (the held sequence was evaluated in calls ending at the start and at k, as
    the fresh one is): the logits after the truncation are identical to the fresh sequence's, and only the
    positions the rule names were evaluated again."""
    same_split(models["decisive"], "f32", k, n, start)


@pytest.mark.parametrize(("name", "type_k"), [("decisive-q8xq5", "f16"), ("second-decisive-prune", "f32")])
@pytest.mark.parametrize(("k", "n", "start"), [(130, 135, 124), (200, 260, 128), (300, 390, 256)])
def test_truncate_bit_for_bit_other_models(
    models: dict[str, str], name: str, type_k: str, k: int, n: int, start: int
) -> None:
    """The same on the quantized model with an f16 cache, and on the second model (window 32, indexer pruning)."""
    same_split(models[name], type_k, k, n, start)


@pytest.mark.parametrize(
    ("name", "type_k", "n_ubatch", "cases"),
    [
        ("decisive", "f16", 64, [(130, 135), (140, 200), (256, 300), (3, 50)]),
        ("second-decisive-prune", "f32", 64, [(130, 135), (257, 310), (140, 200)]),
        # a ring that is never overwritten, the lost rows evaluated again in several ubatches of 8
        ("decisive-wide", "f32", 8, [(200, 260), (131, 399), (255, 257), (300, 301)]),
    ],
)
def test_truncate_within_the_forward_tolerances(
    models: dict[str, str], name: str, type_k: str, n_ubatch: int, cases: list[tuple[int, int]]
) -> None:
    """Plain evaluations in ubatches of n_ubatch (the positions evaluated again are another split than the fresh
    sequence's, or the held sequence's): the logits after the truncation agree with a fresh evaluation of the
    prefix within the bounds test_multiseq.py's check sets for a change of split, and a truncation evaluated
    fewer positions than k. (Not the quantized model: there a change of split alone, without any truncation,
    moves its logits by up to 0.12 relative and flips 1 of 40 greedy choices; it is bit for bit above.)"""
    ours, ref, partial = [], [], 0
    with load_model(models[name]) as m:
        ctx = Context(m, N_CTX, n_ubatch=n_ubatch, type_k=type_k, backends=ONE)
        for k, n in cases:
            held, cont = tokens(n, k), tokens(CONT, n)
            ctx.reset()
            ctx.eval(held)
            partial += ctx.truncate(held[:k]) < k
            fresh = Context(m, N_CTX, n_ubatch=n_ubatch, type_k=type_k, backends=ONE)
            fresh.eval(held[:k])
            ours.append(ctx.eval(cont, all_logits=True))
            ref.append(fresh.eval(cont, all_logits=True))
    assert partial >= len(cases) - 1
    check(name, np.concatenate(ours), np.concatenate(ref))


def test_truncate_then_decode_and_truncate_again(models: dict[str, str]) -> None:
    """Truncations one after another (a chat whose answers are discarded turn after turn), with single-token
    decoding between them, on one sequence of a context of two: greedy continuations equal a fresh sequence's,
    and the other sequence is untouched."""
    prefix = tokens(150, 1)
    with load_model(models["decisive"]) as m:
        ctx = Context(m, N_CTX, n_ubatch=64, backends=ONE, n_seq=2)
        other = ctx.eval(tokens(20, 2), seq_id=1)
        for turn in range(3):
            question = tokens(5 + turn, 10 + turn)
            ctx.truncate(prefix)
            logits = ctx.eval(question)[-1]
            fresh = Context(m, N_CTX, n_ubatch=64, backends=ONE)
            expect = fresh.eval(np.concatenate([prefix, question]))[-1]
            answer, fresh_answer = [], []
            for _ in range(6):
                answer.append(int(np.argmax(logits)))
                fresh_answer.append(int(np.argmax(expect)))
                logits, expect = ctx.eval(answer[-1:])[-1], fresh.eval(fresh_answer[-1:])[-1]
            assert answer == fresh_answer, turn
            assert ctx.n_past == len(prefix) + len(question) + 6
        assert ctx.n_past_of(1) == 20
        alone = Context(m, N_CTX, n_ubatch=64, backends=ONE)
        np.testing.assert_array_equal(alone.eval(tokens(20, 2)), other)
        np.testing.assert_array_equal(ctx.eval([3], seq_id=1), alone.eval([3]))


def test_truncate_refuses_bad_tokens_before_changing_anything(models: dict[str, str]) -> None:
    with load_model(models["decisive"]) as m:
        ctx = Context(m, 64, n_ubatch=16, backends=ONE)
        held = tokens(40, 3)
        ctx.eval(held)
        with pytest.raises(ValueError, match="token id 64 is outside the vocabulary"):
            ctx.truncate(np.concatenate([held[:10], [64]]))
        with pytest.raises(ValueError, match="0 \\+ 65 tokens exceed the context of 64 tokens"):
            ctx.truncate(np.zeros(65, np.int32))
        assert ctx.n_past == 40
        assert ctx.truncate([]) == 0 and ctx.n_past == 0
        assert ctx.truncate(held[:5]) == 5  # more than it holds: evaluated from the start
