"""Log probabilities of tokens, as the OpenAI API and llama-cpp-python report them.

A generated token's log probability is taken from the logits the sampler was given for that step (the model's raw
logits, before logits processors, logit_bias, penalties, grammar or temperature), as log-softmax: what
llama-cpp-python reports. They are at hand at every step, so generated tokens need no `logits_all`; only the
prompt's tokens (echo=True) need the logits of every prompt position, which only `logits_all=True` keeps.

Two shapes: the completion one (`tokens`, `text_offset`, `token_logprobs`, `top_logprobs` as {text: logprob}, the
top `n` plus the chosen token, as OpenAI's legacy completions and llama-cpp-python give them) and the chat one
(OpenAI's `content` list of {token, logprob, bytes, top_logprobs}, exactly the `top_logprobs` most likely tokens).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .llama import Llama


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its log probability, and the most likely tokens there as (id, logprob), best first
    (ties: the lower id first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """log-softmax in float32, as llama-cpp-python's Llama.logits_to_logprobs."""
    x = np.asarray(logits, dtype=np.single)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        s = x - m
        return s - np.log(np.sum(np.exp(s), axis=axis, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The record of `token` chosen from `logits` (one row), with the `n` most likely tokens."""
    lp = log_softmax(logits)
    n = max(0, min(int(n), lp.shape[0]))
    top: tuple[tuple[int, float], ...] = ()
    if n:
        key = np.where(np.isnan(lp), -np.inf, lp)
        cand = np.argpartition(-key, n - 1)[:n] if n < key.shape[0] else np.arange(key.shape[0])
        order = cand[np.lexsort((cand, -key[cand]))]
        top = tuple((int(i), float(lp[i])) for i in order)
    return TokenLogprob(int(token), float(lp[token]), top)


class RecordedLogprobs(dict):  # type: ignore[type-arg]
    """A completion choice's `logprobs` object (a plain dict to its users) that also keeps its records, so that the
    chat layer can report token ids' exact bytes and the top tokens without the text-keyed dict's collisions."""

    records: list[TokenLogprob | None]


def _piece(llama: Llama, token: int) -> bytes:
    return llama.detokenize([token])


def completion_logprobs(
    llama: Llama, records: list[TokenLogprob | None], tokens: list[int], offset: int, before: bytes
) -> RecordedLogprobs:
    """The completion shape for `tokens` (their records: None where there is none, the first token of an echoed
    prompt); `offset` is the text offset where `before` (the bytes of the tokens before these) starts."""
    out = RecordedLogprobs(tokens=[], text_offset=[], token_logprobs=[], top_logprobs=[])
    out.records = list(records)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # the text so far, as decode(ignore) sees it
    chars = offset + len(decoder.decode(before))
    for tok, rec in zip(tokens, records, strict=True):
        piece = _piece(llama, tok)
        text = piece.decode("utf-8", errors="ignore")
        out["tokens"].append(text)
        out["text_offset"].append(chars)
        chars += len(decoder.decode(piece))
        if rec is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {_piece(llama, i).decode("utf-8", errors="ignore"): v for i, v in rec.top}
        top[text] = rec.logprob
        out["token_logprobs"].append(rec.logprob)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(llama: Llama, lp: Any) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs` object from a completion's (records if it has them, else its text-keyed dicts, as
    llama-cpp-python converts them); positions without a log probability are left out."""
    if not lp:
        return None
    records = getattr(lp, "records", None)
    content = []
    if records is None:  # a completion made elsewhere (a user's handler): what its dicts say
        for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            if logprob is not None:
                entries = [{"token": t, "logprob": v, "bytes": None} for t, v in (top or {}).items()]
                content.append({"token": tok, "logprob": logprob, "bytes": None, "top_logprobs": entries})
        return {"content": content, "refusal": None}
    for rec in records:
        if rec is not None:
            content.append(
                {**_entry(llama, rec.token, rec.logprob), "top_logprobs": [_entry(llama, i, v) for i, v in rec.top]}
            )
    return {"content": content, "refusal": None}


def _entry(llama: Llama, token: int, logprob: float) -> dict[str, Any]:
    piece = _piece(llama, token)
    return {"token": piece.decode("utf-8", errors="ignore"), "logprob": logprob, "bytes": list(piece)}
