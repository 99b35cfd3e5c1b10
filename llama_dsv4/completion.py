"""Text completion with llama-cpp-python's semantics and shapes (`Llama.create_completion`).

Prompt handling, context checks, the seed chain and prompt caches follow llama-cpp-python; generated text is
emitted only as complete UTF-8 and never includes a stop string or text that may still become one (also across
token boundaries). Where llama-cpp-python is sloppy (the stream's tail drops bytes of a character split across
tokens; the non-stream cut uses the first stop string in list order rather than the earliest in the text) this
module does the careful thing.
"""

from __future__ import annotations

import math
import numbers
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import longest_token_prefix
from .logprobs import TokenLogprob, completion_logprobs, token_logprob
from .sampling import LogitsProcessorList, StoppingCriteriaList, logit_bias_processor
from .tokenizer import DSV4Tokenizer, TooManyTokens, check_token_ids

if TYPE_CHECKING:
    from .llama import Llama


def _incomplete_tail(b: bytes) -> int:
    """How many bytes at the end of `b` are the start of a UTF-8 character that is not complete yet."""
    for k in range(1, min(4, len(b)) + 1):
        c = b[-k]
        if c & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


def _stop_holdback(b: bytes, stops: list[bytes]) -> int:
    """The longest suffix of `b` that is a proper prefix of a stop string (it may still become the stop)."""
    hold = 0
    for s in stops:
        for i in range(min(len(s) - 1, len(b)), hold, -1):
            if b.endswith(s[:i]):
                hold = i
                break
    return hold


def _first_stop(b: bytes, stops: list[bytes]) -> int:
    """Byte index of the earliest stop string in `b`, or -1."""
    found = [i for i in (b.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def context_exceeded(n: int, n_ctx: int, exact: bool = True) -> ValueError:
    """llama-cpp-python's error for a prompt of `n` tokens (`exact`, else at least that many) that does not fit."""
    return ValueError(f"Requested tokens ({n if exact else f'at least {n}'}) exceed context window of {n_ctx}")


def text_tokens(
    llama: Llama, text: str, special: bool, n_other: int = 0, more: bool = False, tok: DSV4Tokenizer | None = None
) -> list[int]:
    """The tokens of prompt text (no BOS) in the model's vocabulary. A text that cannot fit the context (with
    `n_other` more tokens in its prompt, and others not counted yet if `more`) raises the context error before it
    is tokenized whole: its bytes bound its token count from below, and tokenizing stops once the count is over."""
    tok = tok or llama.dsv4_tokenizer
    n_ctx = llama.n_ctx()
    try:
        return tok.tokenize(text.encode("utf-8"), add_bos=False, special=special, limit=n_ctx - 1 - n_other)
    except TooManyTokens as e:
        raise context_exceeded(e.at_least + n_other, n_ctx, e.exact and not more) from None


def _prompt_tokens(llama: Llama, prompt: str | list[int], suffix: str | None) -> list[int]:
    if isinstance(prompt, (list, tuple, np.ndarray)) and suffix is None:
        return check_token_ids(prompt, llama.n_vocab())
    if not isinstance(prompt, (str, list, tuple, np.ndarray)):
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    tok = llama.dsv4_tokenizer
    v = tok.vocab
    if suffix is None:
        head = [v.bos_id] if v.add_bos and v.bos_id is not None else []
        tail = [v.eos_id] if v.add_eos and v.eos_id is not None else []
        ids = [*head, *text_tokens(llama, prompt, True, len(head) + len(tail), tok=tok), *tail] if prompt else []
        if not ids and v.bos_id is not None:  # an empty prompt starts from the BOS token
            ids = [v.bos_id]
        return ids
    fim = [v.id_of(t) for t in ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")]
    if None in fim:
        raise ValueError("suffix needs fill-in-the-middle tokens, which this model's vocabulary lacks")
    pre, suf, mid = fim
    head = prompt if isinstance(prompt, str) else llama.detokenize(list(prompt)).decode("utf-8", errors="ignore")
    p_ids = text_tokens(llama, head, False, len(fim), more=bool(suffix), tok=tok)
    s_ids = text_tokens(llama, suffix, False, len(fim) + len(p_ids), tok=tok) if suffix else []
    if llama.spm_infill:
        return [suf, *s_ids, pre, *p_ids, mid]
    return [pre, *p_ids, suf, *s_ids, mid]


def prompt_tokens_of(llama: Llama, prompt: str | list[int], suffix: str | None = None) -> list[int]:
    """The tokens a completion of `prompt` evaluates; the context error if they do not fit (room for one more), a
    ValueError for a token id outside the vocabulary."""
    prompt_tokens = _prompt_tokens(llama, prompt, suffix)
    n_ctx = llama.n_ctx()
    if len(prompt_tokens) >= n_ctx:
        raise context_exceeded(len(prompt_tokens), n_ctx)
    bad = [t for t in prompt_tokens if not 0 <= t < llama.n_vocab()]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {llama.n_vocab()})")
    return prompt_tokens


def create_completion(llama: Llama, prompt: str | list[int], **kw: Any) -> Iterator[Any]:
    """Yield the response (stream=False: one item) or its chunks (stream=True), holding the Llama exclusively."""
    return llama.sequence.lock.relay(_create_completion(llama, prompt, **kw))


def on_sequences(llamas: list[Llama], prompts: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """`create_completion(prompt, **kwargs)` for every prompt, each on the first free Llama of `llamas` (slots of one
    context: their completions are evaluated together), one thread per Llama; the responses in the order of
    `prompts`. After a failure no more prompts start; the first failure in prompt order is raised once the running
    completions have ended."""
    free: queue.SimpleQueue[Llama] = queue.SimpleQueue()
    for llm in llamas:
        free.put(llm)
    failed = threading.Event()

    def one(prompt: Any) -> Any:
        if failed.is_set():
            return None
        llm = free.get()
        try:
            return llm.create_completion(prompt, **kwargs)
        except BaseException:
            failed.set()
            raise
        finally:
            free.put(llm)

    with ThreadPoolExecutor(len(llamas), thread_name_prefix="completions") as pool:
        futures = [pool.submit(one, p) for p in prompts]
    return [f.result() for f in futures]


def _create_completion(
    llama: Llama,
    prompt: str | list[int],
    *,
    suffix: str | None,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    min_p: float,
    typical_p: float,
    logprobs: int | None,
    echo: bool,
    stop: str | list[str] | None,
    frequency_penalty: float,
    presence_penalty: float,
    repeat_penalty: float,
    top_k: int,
    stream: bool,
    seed: int | None,
    mirostat_mode: int,
    mirostat_tau: float,
    mirostat_eta: float,
    model: str | None,
    stopping_criteria: StoppingCriteriaList | None,
    logits_processor: LogitsProcessorList | None,
    grammar: Any,
    logit_bias: dict[int, float] | None,
    tfs_z: float = 1.0,
) -> Iterator[Any]:
    seq = llama.sequence
    seq.check_usable()
    if suffix is not None and not isinstance(suffix, str):
        raise TypeError(f"suffix must be a string, got {type(suffix).__name__}")
    if max_tokens is not None and (not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool)):
        raise TypeError(f"max_tokens must be an integer or None, got {type(max_tokens).__name__}")
    if logprobs is not None and (not isinstance(logprobs, (int, np.integer)) or logprobs < 0):
        raise ValueError(f"logprobs must be a non-negative integer, got {logprobs!r}")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)):
        stops = list(stop)
    else:
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a string or a list of strings")
    stop_bytes = [s.encode("utf-8") for s in stops if s]

    completion_id = f"cmpl-{uuid.uuid4()}"
    created = int(time.time())
    model_name = model if model is not None else llama.model_path
    prompt_tokens = prompt_tokens_of(llama, prompt, suffix)
    n_ctx = llama.n_ctx()
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt_tokens)
    max_tokens = min(int(max_tokens), n_ctx - len(prompt_tokens))
    if logprobs is not None and echo and not seq.logits_all:
        raise ValueError(
            "logprobs with echo=True include the prompt's tokens, whose log probabilities need the logits of every "
            "prompt position: create the Llama with logits_all=True (server: --logits-all); the generated tokens' "
            "logprobs need nothing more (echo=False)"
        )
    if logit_bias:
        for k, v in logit_bias.items():
            if not 0 <= int(k) < llama.n_vocab():
                raise ValueError(f"logit_bias token id {k} is outside the vocabulary [0, {llama.n_vocab()})")
            if not isinstance(v, numbers.Real) or math.isnan(v):  # -inf bans a token, +inf forces it; NaN is nothing
                raise ValueError(f"logit_bias for token {k} must be a number, got {v!r}")
        extra = LogitsProcessorList([logit_bias_processor(logit_bias)])
        logits_processor = LogitsProcessorList([*(logits_processor or []), *extra])

    if llama.cache is not None:
        try:
            item = llama.cache[prompt_tokens]
            cached = longest_token_prefix(item.input_ids[: item.n_tokens].tolist(), prompt_tokens)
            if cached > longest_token_prefix(seq.tokens.tolist(), prompt_tokens):
                llama.load_state(item)
        except KeyError:
            pass

    llama.set_seed(seed if seed is not None else random.Random(seq.seed).randint(0, 2**32))

    def chunk(text: str, lp: Any, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
        }

    tokens: list[int] = []
    records: list[TokenLogprob | None] = []  # the generated tokens' log probabilities (with logprobs)
    text = b""
    emitted = 0  # bytes of `text` already streamed
    stream_tokens = 0  # tokens whose logprobs were streamed
    prompt_text = prompt if isinstance(prompt, str) else None  # (token ids: decoded when needed)

    def stream_logprobs() -> Any:
        """The logprobs of the tokens generated since the last chunk that carried some (None without logprobs)."""
        nonlocal stream_tokens, prompt_text
        if logprobs is None:
            return None
        if prompt_text is None:
            prompt_text = llama.detokenize(prompt_tokens).decode("utf-8", "replace")
        first, stream_tokens = stream_tokens, len(tokens)
        before = llama.detokenize(tokens[:first])
        return completion_logprobs(llama, records[first:], tokens[first:], len(prompt_text), before)

    finish = "length"
    cut = -1
    gen = seq.steps(
        prompt_tokens,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        typical_p=typical_p,
        temp=temperature,
        tfs_z=tfs_z,
        mirostat_mode=mirostat_mode,
        mirostat_tau=mirostat_tau,
        mirostat_eta=mirostat_eta,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repeat_penalty=repeat_penalty,
        stopping_criteria=stopping_criteria,
        logits_processor=logits_processor,
        grammar=grammar,
    )
    eos = llama.token_eos()
    for token in gen:
        if token == eos:
            finish = "stop"
            break
        if logprobs is not None:  # the logits this token was sampled from (the last evaluated position)
            records.append(token_logprob(seq.logits_at(len(prompt_tokens) + len(tokens) - 1), token, logprobs))
        tokens.append(token)
        text += llama.detokenize([token])
        cut = _first_stop(text, stop_bytes)
        if cut >= 0:
            finish = "stop"
            break
        if stream:
            safe = len(text) - max(_incomplete_tail(text), _stop_holdback(text, stop_bytes))
            if safe > emitted:
                yield chunk(text[emitted:safe].decode("utf-8", errors="replace"), stream_logprobs(), None)
                emitted = safe
        if len(tokens) >= max_tokens:
            break
    else:  # generate() only returns when a stopping criterion says so
        finish = "stop"
    gen.close()
    end = cut if cut >= 0 else len(text)

    if llama.cache is not None:
        llama.cache[prompt_tokens + tokens] = llama.save_state()

    if stream:
        if end > emitted or (stream_tokens < len(tokens) and logprobs is not None):  # (every token's logprobs)
            yield chunk(text[emitted:end].decode("utf-8", errors="replace"), stream_logprobs(), None)
        yield chunk("", None, finish)
        return

    text_str = text[:end].decode("utf-8", errors="replace")
    if prompt_text is None:
        prompt_text = llama.detokenize(prompt_tokens).decode("utf-8", "replace")
    if echo:
        text_str = prompt_text + text_str
    lp_out = None
    if logprobs is not None and echo:
        lp_out = completion_logprobs(
            llama, [*_prompt_records(llama, prompt_tokens, logprobs), *records], prompt_tokens + tokens, 0, b""
        )
    elif logprobs is not None:
        lp_out = completion_logprobs(llama, records, tokens, len(prompt_text), b"")
    response = chunk(text_str, lp_out, finish)
    response["usage"] = {
        "prompt_tokens": len(prompt_tokens),
        "completion_tokens": len(tokens),
        "total_tokens": len(prompt_tokens) + len(tokens),
    }
    yield response


def _prompt_records(llama: Llama, prompt_tokens: list[int], n: int) -> list[TokenLogprob | None]:
    """The prompt's tokens' log probabilities (from logits_all's scores); the first token has none (OpenAI's)."""
    return [
        None,
        *(token_logprob(llama.sequence.scores[i - 1], prompt_tokens[i], n) for i in range(1, len(prompt_tokens))),
    ]
