"""Constrained decoding on llguidance (PyPI `llguidance`): GBNF grammars, JSON schemas, and the DSML tool-call
grammar of chat, applied token by token as a mask on the logits.

What reaches llguidance is bounded first (sampling/grammar_bounds.py: depth, size, rules), its compiler runs on a
thread with a large stack, and its messages are cleaned (no Rust backtrace reaches a client).

The model's vocabulary is handed to llguidance once per tokenizer (byte strings of every token; control tokens are
special and never match text). A `GrammarState` is the sampler's hook: `mask(logits)` removes every token the
grammar forbids (the end-of-sequence token only where the grammar may end), `accept(token)` advances it.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from .grammar_bounds import MAX_DEPTH, MAX_SCHEMA_CHARS, GrammarError, check_gbnf, check_json_schema, clean_message
from .json_limits import NumberDigits, digit_table, is_json_grammar, with_limits

if TYPE_CHECKING:
    from ..tokenizer import DSV4Tokenizer


COMPILE_STACK = 64 << 20  # bytes of stack for llguidance's (recursive, native) compiler: 8x an ordinary thread's


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise ImportError("constrained decoding needs llguidance (pip install llguidance)") from e
    return llguidance


class _Wrapper:
    """What llguidance's LLTokenizer reads from a tokenizer."""

    def __init__(self, tok: DSV4Tokenizer) -> None:
        v = tok.vocab
        self.eos_token_id = v.eos_id if v.eos_id is not None else 0
        self.bos_token_id = v.bos_id
        self.tokens = [tok.piece(i, special=True) for i in range(tok.n_tokens)]
        self.special_token_ids = sorted(tok._control)
        self._tok = tok
        self.is_tokenizer_wrapper = True

    def __call__(self, text: bytes | str) -> list[int]:
        b = text if isinstance(text, bytes) else text.encode("utf-8")
        return self._tok.tokenize(b, add_bos=False, special=False)


_cache: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_stack_lock = threading.Lock()


def on_large_stack(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on a thread of its own with a COMPILE_STACK stack (llguidance compiles recursively
    in native code, where running out of stack kills the process); its result, or its exception raised here."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # handed to the calling thread
            result.append((False, e))

    with _stack_lock:  # the stack size is process-wide: set it for this thread only
        old = threading.stack_size(COMPILE_STACK)
        try:
            t = threading.Thread(target=run, name="llguidance-compile", daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    t.join()
    ok, value = result[0]
    if ok:
        return value
    if type(value).__name__ == "PanicException":  # a Rust panic llguidance did not catch (a BaseException)
        raise GrammarError(f"the grammar compiler failed: {clean_message(str(value))}") from None
    raise value


def llg_tokenizer(tok: DSV4Tokenizer) -> Any:
    """llguidance's view of a vocabulary, built once per tokenizer (a second or so for 129k tokens)."""
    with _lock:
        t = _cache.get(tok)
        if t is None:
            llg = _llg()
            t = llg.LLTokenizer(_Wrapper(tok), n_vocab=tok.n_tokens)
            _cache[tok] = t
        return t


def check(grammar: str) -> str:
    """Validate an llguidance grammar (from grammar_from_*); raises GrammarError with llguidance's message."""
    llg = _llg()
    is_error, messages = on_large_stack(llg.LLMatcher.validate_grammar_with_warnings, grammar)
    if is_error:
        raise GrammarError(f"invalid grammar: {clean_message(messages[0]) if messages else 'unknown error'}")
    return grammar


def from_gbnf(gbnf: str) -> str:
    """A GBNF grammar (llama.cpp's dialect), bounded (grammar_bounds.check_gbnf) and compiled."""
    llg = _llg()
    from llguidance.gbnf_to_lark import gbnf_to_lark

    check_gbnf(gbnf)
    try:
        lark = gbnf_to_lark(gbnf)
    except Exception as e:  # the converter raises plain exceptions on bad input
        raise GrammarError(f"invalid GBNF grammar: {clean_message(str(e))}") from None
    return check(llg.LLMatcher.grammar_from_lark(lark))


def parse_json_schema(schema: Any) -> dict[str, Any]:
    """A JSON schema (an object, or its JSON text) within grammar_bounds' bounds."""
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is larger than {MAX_SCHEMA_CHARS} characters")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not JSON: {e.msg}") from None
        except RecursionError:
            raise GrammarError(
                f"the JSON schema nests too deep to parse; at most {MAX_DEPTH} levels are allowed"
            ) from None
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    check_json_schema(schema)
    return schema


def from_json_schema(schema: Any) -> str:
    """Output that validates against a JSON schema (an object or its JSON text), bounded and compiled, with
    llama.cpp's choices that make it end (json_limits: no undeclared keys, llama.cpp's whitespace; the digits
    of numbers are bounded when decoding)."""
    llg = _llg()
    schema = with_limits(parse_json_schema(schema))
    try:
        g = on_large_stack(llg.LLMatcher.grammar_from_json_schema, schema)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {clean_message(str(e))}") from None
    return check(g)


def from_lark(lark: str) -> str:
    """A grammar in llguidance's Lark syntax as llguidance's serialized grammar, checked (GrammarError if not)."""
    return check(_llg().LLMatcher.grammar_from_lark(lark))


class GrammarState:
    """One generation's grammar: masks logits, follows sampled tokens. A JSON schema's grammar also keeps the
    digits of its numbers within json_limits.MAX_NUMBER_DIGITS per part."""

    def __init__(self, tok: DSV4Tokenizer, grammar: str) -> None:
        llg = _llg()
        self.matcher = on_large_stack(llg.LLMatcher, llg_tokenizer(tok), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"invalid grammar: {clean_message(self.matcher.get_error())}")
        self.tok = tok
        self.n_vocab = tok.n_tokens
        self.eos = tok.vocab.eos_id
        self._mask = np.zeros((self.n_vocab + 31) // 32, np.int32)
        self.numbers = NumberDigits(digit_table(tok)) if is_json_grammar(grammar) else None

    def allowed(self) -> np.ndarray:
        """Boolean [n_vocab]: the tokens the grammar allows next (and json_limits' digit bound, for JSON)."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        ok = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)
        return ok if self.numbers is None else self.numbers.restrict(ok)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        if self.matcher.is_error():
            raise GrammarError(f"constrained decoding failed: {clean_message(self.matcher.get_error())}")
        ok = self.allowed()
        if not ok.any():
            raise GrammarError("the grammar allows no token here")
        out = np.where(ok, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
        if not np.isfinite(out).any():  # every allowed token had -inf logits: keep the grammar's choice possible
            out = np.where(ok, 0.0, -np.inf).astype(np.float32)
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)) and token != self.eos:
            raise GrammarError(
                f"token {token} was not allowed by the grammar: {clean_message(self.matcher.get_error())}"
            )
        if self.numbers is not None:
            self.numbers.advance(self.tok.piece(int(token)))

    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()


def grammar_state(tok: DSV4Tokenizer | None, grammar: Any) -> GrammarState:
    """The state for a LlamaGrammar (or a compiled llguidance grammar string) over the model's tokenizer."""
    if tok is None:
        raise ValueError("grammars need the model's tokenizer, and this model file has none (no_vocab)")
    source = grammar if isinstance(grammar, str) else grammar._llguidance()
    return GrammarState(tok, source)
