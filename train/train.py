"""Train the demo deepseek4 network on the CPU: `python -m train.train --data DIR --out RUN --minutes M`.

Windows of `--seq` tokens from DIR/train.bin (train/data.py), each starting at a document's start (or every `seq`
tokens inside a long text), the loss on the tokens DIR/train_mask.bin marks (text, and what the assistant writes in
a conversation: not the prompts, tool definitions or tool results), each weighted by its mask byte (1, or
`train.data --copy-weight` for what is copied from the request); AdamW with warmup and cosine decay; the loss is
the main next-token cross-entropy + `--mtp-weight` x the MTP layer's next-next-token cross-entropy + the lightning
indexer's distillation KL (its own parameters only); after each step the routed layers' selection bias moves by
`--bias-rate` (auxiliary-loss-free balancing). Every `--log-every` steps a row goes to RUN/loss.csv and the weights
to RUN/model.pt, so a run stopped at any time leaves a usable model; every `--probe-every` steps the row's `copy`,
`currency` and `sub` columns are the model's accuracy on DIR/copy_probe.json (copying unseen city names into tool
calls; the currency codes of held-out conversions; the digits of held-out subtractions' working). The cosine
schedule is fitted to `--minutes` by the measured speed, so two runs of one command differ from the first steps
on; `--steps N` fits it to N steps instead (and stops there, or at `--minutes`), so that the same command repeats
its run row for row on the same threads (minute deadlines of `--until` aside). `--compile` runs the training step
through torch.compile (`compiled`): the first step compiles (5-8 minutes on this 2-core machine, seconds when
inductor's cache in /tmp already holds the graph), counted in `--minutes`; the steps after it take 0.6-0.7 of
eager's time (`python -m train.step_time --compile`).

A curriculum in one run: `--until COND --then DIR2 [--until COND --then DIR3 ...]` trains on DIR until COND
holds, then on DIR2, and so on, with one optimizer and one learning-rate schedule over `--minutes` (the `phase`
column of loss.csv counts the data phases). COND is `KIND>=X` (a probe column, `copy`, `currency` or `sub`, reaching X),
several joined by `and` (all in one probed row), `M` (M minutes into the phase) or `KIND>=X [and ...] or M`,
whichever comes first; e.g. `--until "currency>=0.75 or 50" --then data_copy/ --until "copy>=0.85 and
currency>=0.75 or 24" --then data/`. A condition that already holds when its phase starts ends the phase at the
phase's first probe (so a phase meant to teach a skill names that skill's column). Every phase's data must share
DIR's vocabulary; the probe is DIR's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llama_dsv4.model.params import DSV4Params

from .data import PROBE_COLUMNS, probe_kind, probe_score
from .model import DSV4, count_params


def demo_params(n_vocab: int, n_head: int = 4, head_dim: int = 64, indexer_head_dim: int = 128) -> DSV4Params:
    """The demo model: every deepseek4 path (a hash-routed sliding-window layer, CSA with the indexer, HCA, learned
    routing with the bias, an MTP layer), sized for a 2-core CPU; n_embd and expert_ff are multiples of 256 so the
    Q8xQ5 variant (Q5_K experts) exists. n_head, head_dim (the one shared key/value latent per position) and
    indexer_head_dim are an experiment's knobs; llama.cpp 0.3.36 needs indexer_head_dim != head_dim for its MTP
    context and indexer_head_dim > 32."""
    return DSV4Params(
        n_vocab=n_vocab, n_ctx_train=4096, n_embd=256, n_layer=4, n_nextn=1, compress_ratios=(0, 4, 128, 4, 0),
        hash_layer_count=1, n_head=n_head, head_dim=head_dim, rope_dim=16, q_lora_rank=64, o_group_count=2,
        o_lora_rank=64, sliding_window=64, indexer_n_head=2, indexer_head_dim=indexer_head_dim, indexer_top_k=8,
        n_expert=8, n_expert_used=2, expert_ff=256, n_expert_shared=1, swiglu_clamp_exp=(10.0,),
        swiglu_clamp_shexp=(10.0,),
    )  # fmt: skip


def _masked_ce(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cross-entropy weighted by `mask`, the plain mean over the tokens it marks: what loss.csv reports)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return ce.mean(), ce.mean()
    m = mask.reshape(-1).to(ce.dtype)
    on = (m > 0).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1), (ce * on).sum() / on.sum().clamp(min=1)


def losses(
    net: DSV4, tokens: torch.Tensor, mtp_weight: float = 0.3, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float], Any]:
    """(total loss, its parts as floats, aux) for a batch [B, T]; `mask` [B, T] (a token's weight as a training
    target, 0 where it is none: text and what the assistant writes in a conversation are) weights both heads'
    cross-entropy; the parts are plain means over the targets."""
    logits, mtp, aux = net(tokens, mtp=True)
    main, main_plain = _masked_ce(logits[:, :-1], tokens[:, 1:], None if mask is None else mask[:, 1:])
    total = main
    parts = {"main": float(main_plain.detach())}
    if mtp is not None:
        m, m_plain = _masked_ce(mtp[:, :-1], tokens[:, 2:], None if mask is None else mask[:, 2:])
        total = total + mtp_weight * m
        parts["mtp"] = float(m_plain.detach())
    if "indexer" in aux:
        total = total + aux["indexer"]
        parts["indexer"] = float(aux["indexer"].detach())
    return total, parts, aux


def train_step(
    net: DSV4,
    opt: torch.optim.Optimizer,
    batch: torch.Tensor,
    mask: torch.Tensor | None = None,
    mtp_weight: float = 0.3,
    bias_rate: float = 1e-3,
) -> dict[str, float]:
    """One optimizer step on `batch` (losses, backward, gradient clipping at 1, the optimizer, the selection bias);
    returns the loss parts."""
    total, parts, aux = losses(net, batch, mtp_weight, mask)
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    net.update_bias(aux, bias_rate)
    return parts


def compiled(net: DSV4, backend: str = "inductor") -> torch.nn.Module:
    """`net` compiled by torch.compile for training steps, as one graph (fullgraph: the MoE's per-expert row counts
    are traced as data-dependent sizes, not graph breaks); the module shares `net`'s parameters, `net` itself stays
    eager (the probes, which see other lengths, use it). With inductor the first step compiles, 5-8 minutes here.
    Sets two of torch._dynamo's options for the whole process (capturing data-dependent output shapes and scalars;
    nothing else in the recipe uses torch.compile)."""
    import torch._dynamo.config as dynamo

    dynamo.capture_dynamic_output_shape_ops = True  # torch.nonzero in the MoE's dispatch
    dynamo.capture_scalar_outputs = True
    return torch.compile(net, backend=backend, fullgraph=True)


@torch.no_grad()
def copy_accuracy(net: DSV4, probe: list[dict[str, Any]], kind: str = "city") -> float:
    """Top-1 accuracy, teacher-forced, on the target tokens of the probe's items of `kind` (train/data.py
    copy_probe: "city", a city's tokens in a tool call after its first, found only by copying from the request;
    "currency", the codes of a held-out conversion's call; "sub", held-out subtractions with every digit right)."""
    hits = n = 0
    for item in probe:
        if probe_kind(item) != kind:
            continue
        ids = torch.tensor(item["ids"][: net.max_pos], dtype=torch.int64)[None]
        pred = net(ids)[0][0].argmax(-1)
        right = [bool(pred[t - 1] == ids[0, t]) for t in item["targets"] if t < ids.shape[1]]
        h, c = probe_score(kind, right)
        hits, n = hits + h, n + c
    return hits / max(1, n)


@dataclass(frozen=True)
class Until:
    """When a data phase ends: every probe column of `needs` (loss.csv's `copy`, `currency` or `sub`, each with its
    threshold) at or above its threshold in one probed row, or `minutes` into the phase, whichever comes first
    (either may be absent, not both)."""

    needs: tuple[tuple[str, float], ...] = ()
    minutes: float | None = None

    def reached(self, probed: dict[str, float], phase_minutes: float) -> bool:
        """Whether the phase ends, given this row's probe values (empty when the row was not probed)."""
        if self.minutes is not None and phase_minutes >= self.minutes:
            return True
        return bool(self.needs) and all(c in probed and probed[c] >= x for c, x in self.needs)


def parse_until(spec: str) -> Until:
    """`"currency>=0.75 or 50"`, `"copy>=0.85 and currency>=0.75 or 24"`, `"copy>=0.6"` or `"20"` -> Until;
    ValueError naming what is wrong otherwise."""
    expected = "expected 'KIND>=X', 'MINUTES' or 'KIND>=X [and KIND>=Y ...] or MINUTES'"
    parts = re.split(r"\s+or\s+", spec.strip())
    minutes = None
    if re.fullmatch(r"\d+(?:\.\d*)?", parts[-1]) and len(parts) <= 2:
        minutes = float(parts.pop())
    if len(parts) > 1 or (minutes is None and not parts[0]):
        raise ValueError(f"--until {spec!r}: {expected}")
    needs: list[tuple[str, float]] = []
    for term in re.split(r"\s+and\s+", parts[0]) if parts else []:
        m = re.fullmatch(r"(\w+)\s*>=\s*(\d+(?:\.\d*)?)", term)
        if not m:
            raise ValueError(f"--until {spec!r}: {expected}")
        if m.group(1) not in PROBE_COLUMNS.values():
            names = ", ".join(PROBE_COLUMNS.values())
            raise ValueError(f"--until {spec!r}: {m.group(1)!r} is not a probe column ({names})")
        if any(c == m.group(1) for c, _ in needs):
            raise ValueError(f"--until {spec!r}: {m.group(1)!r} is named twice")
        needs.append((m.group(1), float(m.group(2))))
    return Until(tuple(needs), minutes)


def _load_stream(path: str, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A data folder's tokens, loss mask and the window starts that fit `seq` tokens."""
    data = np.fromfile(os.path.join(path, "train.bin"), np.uint16).astype(np.int64)
    mask = np.fromfile(os.path.join(path, "train_mask.bin"), np.uint8)
    starts = np.fromfile(os.path.join(path, "train_starts.bin"), np.int64)
    starts = starts[(starts >= 0) & (starts <= len(data) - seq)]
    if not len(starts) or len(mask) != len(data):
        raise ValueError(f"{path}: no window of {seq} tokens fits its data, or its mask is not the tokens' length")
    return data, mask, starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--seq", type=int, default=576)
    ap.add_argument("--batch", type=int, default=7)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4, help="query heads (the shipped model: 4)")
    ap.add_argument("--head-dim", type=int, default=64, help="width of the shared key/value latent (shipped: 64)")
    ap.add_argument("--indexer-head-dim", type=int, default=128, help="the lightning indexer's head width")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-every", type=int, default=50, help="steps between copy probes (DIR/copy_probe.json)")
    ap.add_argument("--est-step-s", type=float, default=3.0, help="a first guess of a step's time, for the schedule")
    ap.add_argument(
        "--steps", type=int, help="fit the schedule to this many steps, not to the measured speed, and stop there "
        "(or at --minutes, whichever comes first): the same command then repeats its run"
    )  # fmt: skip
    ap.add_argument("--init", help="start from these weights (an earlier phase's model.pt) instead of random ones")
    ap.add_argument("--stop-minutes", type=float, help="stop after this many minutes (the schedule stays --minutes')")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the training step (its compile counts in --minutes)"
    )
    ap.add_argument("--until", action="append", default=[], help="when the current data phase ends (see above)")
    ap.add_argument("--then", action="append", default=[], help="the next data phase's folder (see above)")
    a = ap.parse_args()
    if len(a.until) != len(a.then):
        ap.error("each --until needs its --then (the data that follows)")
    try:
        untils = [parse_until(u) for u in a.until]
    except ValueError as e:
        ap.error(str(e))
    if a.steps is not None and a.steps < 1:
        ap.error("--steps must be at least 1")
    if any(u.needs for u in untils) and a.probe_every % a.log_every:
        ap.error("--probe-every must be a multiple of --log-every for a probe condition")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    with open(os.path.join(a.data, "vocab.json"), encoding="utf-8") as f:
        vocab_tokens = json.load(f)["tokens"]
    n_vocab = len(vocab_tokens)
    for d in a.then:
        if not os.path.isfile(os.path.join(d, "vocab.json")):
            ap.error(f"--then {d}: not a data folder written by train.data (no vocab.json)")
        with open(os.path.join(d, "vocab.json"), encoding="utf-8") as f:
            if json.load(f)["tokens"] != vocab_tokens:
                ap.error(f"--then {d}: its vocabulary is not {a.data}'s (write it with train.data --vocab-json)")
    phase = 0
    try:
        for d in a.then:  # every phase's data is usable before the run starts
            _load_stream(d, a.seq)
        data, mask, starts = _load_stream(a.data, a.seq)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    probe = []
    if os.path.exists(os.path.join(a.data, "copy_probe.json")):
        with open(os.path.join(a.data, "copy_probe.json"), encoding="utf-8") as f:
            probe = json.load(f)
    kinds = {probe_kind(item) for item in probe}
    for u in untils:  # a condition on a column this data never probes would hold a phase to its deadline or forever
        for column, _ in u.needs:
            if not any(PROBE_COLUMNS[k] == column for k in kinds):
                ap.error(f"--until {column}>=...: {a.data}/copy_probe.json has no {column} items")
    p = demo_params(n_vocab, a.n_head, a.head_dim, a.indexer_head_dim)
    net = DSV4(p, seed=a.seed, max_pos=a.seq).train()
    if a.init:  # a later phase: the earlier phase's weights and selection bias
        net.load_state_dict(torch.load(a.init), strict=False)
    else:
        with torch.no_grad():  # training starts with a neutral selection bias
            for il in range(p.hash_layer_count, p.block_count):
                net.t(f"blk.{il}.exp_probs_b.bias").zero_()
    decay = [w for w in net.parameters() if w.dim() >= 2]
    other = [w for w in net.parameters() if w.dim() < 2]
    step_net = compiled(net) if a.compile else net
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95)
    )
    os.makedirs(a.out, exist_ok=True)
    total_p, active_p = count_params(p)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump({**vars(a), "params_total": total_p, "params_active": active_p}, f, indent=1)
    budget = a.minutes * 60
    t0 = time.time()
    est_steps = a.steps or max(1, int(budget / a.est_step_s))
    step, tokens_seen = 0, 0
    log = open(os.path.join(a.out, "loss.csv"), "w", newline="")  # noqa: SIM115 (written throughout the run)
    w = csv.writer(log)
    w.writerow(["phase", "step", "tokens", "seconds", "lr", "main", "mtp", "indexer", *PROBE_COLUMNS.values()])
    acc: dict[str, list[float]] = {}
    stop = a.stop_minutes * 60 if a.stop_minutes is not None else budget
    phase_t0 = t0
    t1 = t0  # when the first step ended (a compiled run's first step is its compile)
    while time.time() - t0 < min(budget, stop) and (a.steps is None or step < a.steps):
        now = time.time()
        elapsed = now - t0
        if step >= 20 and a.steps is None:  # the cosine schedule follows the measured speed: it ends when the time does
            per_step = (now - t1) / (step - 1)
            est_steps = max(step + 1, step + int((budget - elapsed) / per_step))
        cosine = 0.5 * (1 + math.cos(math.pi * min(1, step / est_steps)))
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        at = starts[rng.integers(0, len(starts), a.batch)]
        batch = torch.from_numpy(np.stack([data[s : s + a.seq] for s in at]))
        bmask = torch.from_numpy(np.stack([mask[s : s + a.seq] for s in at]))
        parts = train_step(step_net, opt, batch, bmask, a.mtp_weight, a.bias_rate)
        step += 1
        if step == 1:
            t1 = time.time()
        tokens_seen += batch.numel()
        for k, v in parts.items():
            acc.setdefault(k, []).append(v)
        if step % a.log_every == 0:
            row = [phase + 1, step, tokens_seen, round(time.time() - t0, 1), f"{lr:.2e}"]
            row += [f"{np.mean(acc[k]):.4f}" if k in acc else "" for k in ("main", "mtp", "indexer")]
            probing = step % a.probe_every == 0
            probed = {c: copy_accuracy(net, probe, k) for k, c in PROBE_COLUMNS.items() if probing and k in kinds}
            row += [f"{probed[c]:.3f}" if c in probed else "" for c in PROBE_COLUMNS.values()]
            w.writerow(row)
            log.flush()
            print(*row, flush=True)
            acc = {}
            torch.save(net.state_dict(), os.path.join(a.out, "model.pt.tmp"))
            os.replace(os.path.join(a.out, "model.pt.tmp"), os.path.join(a.out, "model.pt"))
            if phase < len(untils) and untils[phase].reached(probed, (time.time() - phase_t0) / 60):
                data, mask, starts = _load_stream(a.then[phase], a.seq)
                phase, phase_t0 = phase + 1, time.time()
                print(f"phase {phase + 1}: {a.then[phase - 1]} from step {step}", flush=True)
    torch.save(net.state_dict(), os.path.join(a.out, "model.pt"))
    with open(os.path.join(a.out, "done.json"), "w") as f:
        json.dump({"steps": step, "tokens": tokens_seen, "seconds": round(time.time() - t0, 1)}, f)
    log.close()
    print(f"done: {step} steps, {tokens_seen} tokens, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
