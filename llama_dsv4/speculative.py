"""Drafting with the model's own MTP (nextn) block (docs/speculative.md).

`MtpDrafter` follows the main model of one engine context: after each evaluation (`after_eval`) it keeps the main
model's final streams of the positions the MTP block has not read yet; `draft` then lets the block read them (each
row with the next token; the last held position with the sampled token) and proposes up to `n_max` tokens after
the sampled one, greedily (each further draft from the block's own streams). The sequence (sequence.py)
verifies the drafts in one evaluation and truncates what the main model rejects; the engine's truncation makes the
MTP block forget the rows that read rejected tokens.

The drafter is the engine's, under the runner's lock: no ggml here, only the context's methods `eval(want_h=True)`,
`last_h`, `mtp_eval`, `mtp_truncate`, `mtp_skip`, `mtp_n_past`, `n_past_of`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

MAX_DRAFT = 16  # spec_draft_n_max's bound (llama.cpp's draft-mtp takes small values: 1 to 3 pay)


def check_draft_n_max(n: Any) -> int:
    """spec_draft_n_max as given: an integer from 1 to MAX_DRAFT, else ValueError naming it."""
    try:
        v = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"spec_draft_n_max must be an integer, got {n!r}") from None
    if v != n or not 1 <= v <= MAX_DRAFT:
        raise ValueError(f"spec_draft_n_max must be an integer from 1 to {MAX_DRAFT}, got {n!r}")
    return v


class MtpDrafter:
    """The MTP drafts of the sequences of one engine context (made with mtp=True); `n_max` drafts per step."""

    def __init__(self, context: Any, n_max: int) -> None:
        self.context = context
        self.n_max = check_draft_n_max(n_max)
        # per sequence: the position of the first row kept, the main model's streams and the tokens from there on
        self._h: dict[int, tuple[int, npt.NDArray[np.float32], list[int]]] = {}
        self.drafted = 0  # tokens proposed (the server's metrics)
        self.accepted = 0  # ... of which the main model kept
        self.accepted_at = [0] * self.n_max  # kept drafts by position in the draft (acceptance per position)
        self.steps = 0  # drafts made
        self.reevaluated = 0  # positions evaluated again by the truncations after rejections (Runner.truncate)
        self._pending: dict[int, tuple[int, list[int]]] = {}  # per sequence: the last drafts and their position

    def after_eval(self, seq_id: int, tokens: list[int]) -> None:
        """The main model just evaluated `tokens` for the sequence (with want_h): keep their streams with those not
        yet read by the MTP block. The block reads them at the next draft, in one evaluation with the draft's row
        (rows of rejected drafts are never read); only when more than a ubatch of rows waits (a long prompt) does
        it read them now."""
        ctx = self.context
        p0 = int(ctx.n_past_of(seq_id)) - len(tokens)
        k = min(int(ctx.mtp_n_past(seq_id)), p0)  # the first row the block has not read
        old = self._h.get(seq_id)
        if old is not None and old[0] <= k and old[0] + len(old[1]) >= p0:
            first, h, toks = (
                k,
                np.concatenate((old[1][k - old[0] : p0 - old[0]], ctx.last_h)),
                [*old[2][k - old[0] : p0 - old[0]], *tokens],
            )
        else:  # nothing kept before p0 (a restored state): the block goes on from p0
            first, h, toks = p0, ctx.last_h, list(tokens)
        self._h[seq_id] = (first, h, toks)
        if len(h) > int(ctx.n_ubatch):
            end = first + len(h) - 1
            self._read(seq_id, first, toks, end)
            self._h[seq_id] = (end, h[-1:], toks[-1:])

    def _read(self, seq_id: int, t0: int, tokens: Any, end: int, want_h: bool = False) -> Any:
        """Let the MTP block read its rows from mtp_n_past to end - 1, row p reading the token at p + 1, which is
        tokens[p + 1 - t0], and the kept streams at p; returns the last row's logits (None if no row)."""
        ctx = self.context
        first, h, _ = self._h[seq_id]
        m = int(ctx.mtp_n_past(seq_id))
        if m < first:  # the streams before `first` are gone (a restored state): the block goes on without them
            ctx.mtp_skip(first, seq_id)
            m = first
        if m < t0 - 1:
            raise RuntimeError(f"internal: the MTP block is at {m}, its next token at {m + 1} is not at hand")
        logits = None
        step = int(ctx.n_ubatch)
        for s in range(m, end, step):
            e = min(s + step, end)
            nxt = [int(t) for t in tokens[s + 1 - t0 : e + 1 - t0]]
            logits = ctx.mtp_eval(nxt, h[s - first : e - first], seq_id, all_logits=False, want_h=want_h)
        return logits

    def draft(self, seq_id: int, held: Any, token: int) -> list[int]:
        """Up to n_max greedy drafts after `token`, the one sampled after `held` (the sequence's tokens, exactly what
        the engine holds). Empty when the main model's streams of the last held position are not at hand (nothing
        evaluated since a restored state) or the context has no room."""
        ctx = self.context
        n = int(ctx.n_past_of(seq_id))
        self._score(seq_id, held, n, token)
        got = self._h.get(seq_id)
        room = int(ctx.n_ctx) - n - 1  # the token and the drafts must fit the context
        if n == 0 or room <= 0 or got is None or not got[0] <= n - 1 < got[0] + len(got[1]):
            return []
        m = min(int(ctx.mtp_n_past(seq_id)), n - 1)
        t0 = max(m, got[0])
        logits = self._read(seq_id, t0, [*held[t0:n], token], n, want_h=True)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < min(self.n_max, room):
            logits = ctx.mtp_eval([out[-1]], ctx.last_h[-1:], seq_id, all_logits=False, want_h=True)
            out.append(int(np.argmax(logits[-1])))
        ctx.mtp_truncate(n, seq_id)  # the chain's rows read drafts: the rows up to n - 1 stay
        self.drafted += len(out)
        self.steps += 1
        self._pending[seq_id] = (n + 1, out)
        return out

    def _score(self, seq_id: int, held: Any, n: int, token: int) -> None:
        """Count the previous drafts of the sequence that the main model kept: those equal to the tokens now held
        (and the one just sampled) at their positions."""
        last = self._pending.pop(seq_id, None)
        if last is None:
            return
        at, drafts = last
        actual = [*(int(t) for t in held[at:n]), token]
        for i, d in enumerate(drafts):
            if i >= len(actual) or actual[i] != d:
                break
            self.accepted += 1
            self.accepted_at[i] += 1

    def stats(self) -> dict[str, Any]:
        """Drafting so far: steps, drafted and accepted tokens, acceptance per draft position, and the positions
        evaluated again after rejections (a rejected draft that completed a compression block costs its block)."""
        return {"n_max": self.n_max, "steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "accepted_at": list(self.accepted_at), "reevaluated": self.reevaluated}  # fmt: skip

    def forget(self, seq_id: int) -> None:
        """The sequence was reset or restored: its streams are gone."""
        self._h.pop(seq_id, None)
        self._pending.pop(seq_id, None)
