"""The models the forward-pass tests compare against the reference (docs/architecture.md §15.4, issue 3).

A random-weight MoE is chaotic where a top-k choice is a near-tie, so besides the random tiny model the
comparisons use models whose choices have margins: "continuous" (every expert used, the indexer keeps every
block) and "decisive" (router bias N(0, 2) over a router scaled by 0.3; with and without indexer pruning).
All have no tokenizer and 64 token ids, so reference logits stay small enough to commit.
"""

from __future__ import annotations

import numpy as np

from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import Init

N_VOCAB = 64
TINY = DSV4Params(n_vocab=N_VOCAB)  # architecture §15.1 (top_k 4, window 16, 8 experts top-2)
DECISIVE_INIT = Init(router_scale=0.3, bias_std=2.0)
# a second, differently shaped model: other head count, expert count, window, top-k, layer order, clamps
SECOND = DSV4Params(
    n_vocab=N_VOCAB,
    n_embd=128,
    n_layer=5,
    compress_ratios=(4, 128, 0, 4, 128),
    hash_layer_count=1,
    n_head=8,
    head_dim=128,  # != indexer head size: llama.cpp would Hadamard-rotate every cache otherwise (f16 rounding)
    rope_dim=16,
    q_lora_rank=48,
    o_group_count=4,
    o_lora_rank=24,
    sliding_window=32,
    indexer_n_head=4,
    indexer_head_dim=64,
    indexer_top_k=8,
    n_expert=16,
    n_expert_used=4,
    expert_ff=128,
    expert_weights_scale=2.0,
    swiglu_clamp_exp=2.0,
    swiglu_clamp_shexp=None,
)

# name -> (params, init, dtype)
MODELS: dict[str, tuple[DSV4Params, Init, str]] = {
    "continuous": (TINY.with_(n_expert_used=8, indexer_top_k=256), Init(), "f32"),
    "decisive": (TINY.with_(indexer_top_k=256), DECISIVE_INIT, "f32"),
    "decisive-prune": (TINY, DECISIVE_INIT, "f32"),
    "random": (TINY, Init(), "f32"),
    "decisive-f16": (TINY.with_(indexer_top_k=256), DECISIVE_INIT, "f16"),
    "decisive-q8xq5": (TINY.with_(indexer_top_k=256), DECISIVE_INIT, "q8xq5"),
    "second-continuous": (SECOND.with_(n_expert_used=16, indexer_top_k=256), Init(), "f32"),
    "second-decisive": (SECOND.with_(indexer_top_k=256), DECISIVE_INIT, "f32"),
    "second-decisive-prune": (SECOND, DECISIVE_INIT, "f32"),
}

N_PREFILL, N_DECODE, UBATCH = 320, 200, 64  # the schedule of the committed references
SEED = 1  # model weights


def decided(
    net_trace: list,
    logits: np.ndarray,
    p: DSV4Params,
    *,
    logit_gap: float = 1e-2,
    score_gap: float = 1e-2,
    dot_gap: float = 1e-3,
) -> bool:
    """Whether every discrete choice this position made has a margin that float rounding cannot flip: the argmax
    of the logits, the routers' top-k, and the indexer's top-k (exact ties of relu zeros are fine when every
    zero is robustly negative before the relu: both implementations then see the same tie)."""
    top2 = np.sort(logits)[-2:]
    if top2[1] - top2[0] < logit_gap * np.abs(logits).max():
        return False
    for entry in net_trace:
        kind, scores = entry[0], entry[3]
        k = p.n_expert_used if kind == "router" else min(p.indexer_top_k, len(scores))
        if len(scores) <= k:
            continue
        s = np.sort(scores)[::-1]
        if kind == "indexer":
            dots = entry[4]
            if (np.abs(dots) < dot_gap).any():
                return False
            if s[k - 1] == 0.0 and s[k] == 0.0:
                continue
        if s[k - 1] - s[k] < score_gap * max(np.abs(s).max(), 1e-30):
            return False
    return True


def margin_tokens(
    net, n_tokens: int, n_vocab: int, seed: int, max_tries: int = 200, logit_gap: float = 1e-2
) -> np.ndarray:
    """Token ids, chosen position by position with the numpy reference (`net`, a tests.numpy_dsv4.NumpyDSV4),
    such that every position's choices are decided (see `decided`). Random where the model allows."""
    rng = np.random.default_rng(seed)
    toks = []
    for pos in range(n_tokens):
        for _ in range(max_tries):
            t = int(rng.integers(n_vocab))
            trial = net.clone()
            trial.trace = []
            logits = trial.step(t)
            if decided(trial.trace, logits, net.p, logit_gap=logit_gap):
                break
        else:
            raise RuntimeError(f"no token with margins at position {pos}")
        net = trial
        toks.append(t)
    return np.array(toks, np.int32)


# greedy decoding through the Llama API: the decisive model with the small vocabulary (so there is text)
GREEDY = (TINY.with_(indexer_top_k=256), DECISIVE_INIT)
GREEDY_PROMPT, GREEDY_STEPS = 40, 32


def margin_greedy_prompt(
    net, n_prompt: int, n_steps: int, seed: int, tries: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """A prompt (chosen position by position with margins, see margin_tokens) whose greedy continuation of
    n_steps is decided by margins too. Returns (prompt ids, greedy ids)."""
    for k in range(tries):
        prompt = margin_tokens(net, n_prompt, net.p.n_vocab, seed=seed + k, logit_gap=0.0)
        trial = net.clone()
        for t in prompt:
            logits = trial.step(int(t))
        out: list[int] = []
        ok = True
        while ok and len(out) < n_steps:
            top2 = np.sort(logits)[-2:]
            if top2[1] - top2[0] < 5e-3 * np.abs(logits).max():
                ok = False
                break
            out.append(int(np.argmax(logits)))
            trial.trace = []
            logits = trial.step(out[-1])
            ok = decided(trial.trace, logits, trial.p, logit_gap=0.0)
        if ok:
            return prompt, np.array(out, np.int32)
    raise RuntimeError("no prompt with margins found")
