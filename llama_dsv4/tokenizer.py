"""DeepSeek V4's byte-level BPE tokenizer, built from a GGUF vocabulary, with llama.cpp's semantics.

Encoding runs on HF `tokenizers` (Rust): the GGUF's tokens and merges as a BPE model, the `deepseek-v3` /
`joyai-llm` pre-tokenizer (three regexes applied in sequence, docs/architecture.md §14.1) and GPT-2's byte-level
alphabet. Special tokens behave as in llama.cpp: user-defined tokens (e.g. `<think>`) are always matched in the
text, control tokens (e.g. `<｜User｜>`) only when `special=True`. Decoding is a table lookup per token.

Long texts are encoded in pieces of about `CHUNK_CHARS` characters, cut only where no token and no pre-token can
cross (after a letter, before white space or punctuation, not inside an added token: `_CUT`), so the ids are those
of the whole text at once; each piece goes through `encode_batch`, which releases the GIL (`encode` holds it), so
other threads (the server's event loop) run meanwhile, and the library's working memory (some 150 bytes per byte of
text) is that of one piece. A text with no such place (one 4 MB "word") is encoded at once. A `limit` on the token
count is checked before anything is encoded (no token covers more than `max_token_bytes` bytes of text, so the
text's length bounds its token count from below) and after each piece.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .model.vocab import CONTROL, NORMAL, USER_DEFINED, Vocab, bytes_to_unicode

# the three splits of llama.cpp's deepseek-v3 pre-tokenizer, applied in sequence (docs/architecture.md §14.1)
_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
    r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
PRE_TOKENIZERS = ("deepseek-v3", "joyai-llm")
CHUNK_CHARS = 1 << 16  # characters encoded per call, about (the next safe cut after it)
# Places no pre-token crosses (a match starts at one): after a letter or a non-decimal number ([^\W\d_]: a run of
# letters or of numbers ends there) and before white space, an ASCII punctuation mark or symbol, or common CJK and
# fullwidth punctuation (none of them a letter, mark, number or part of a CJK run, so the run ends; punctuation
# cannot be glued backwards onto a letter), in every split of _SPLITS: their regexes look ahead, never behind.
_CUT = re.compile(r"(?<=[^\W\d_])[\s!-/:-@\[-`{-~\u3001-\u3003\u3008-\u3011\uff01-\uff0f\uff1a-\uff20]")


class TokenizerError(ValueError):
    """The vocabulary cannot make a DeepSeek V4 tokenizer (another tokenizer model or pre-tokenizer, or a
    vocabulary the BPE library refuses)."""


class TooManyTokens(ValueError):
    """The text needs more tokens than the `limit` it was tokenized against: at least `at_least`, exactly that
    many when `exact` (it was tokenized whole)."""

    def __init__(self, at_least: int, limit: int, exact: bool) -> None:
        n = at_least if exact else f"at least {at_least}"
        super().__init__(f"the text is {n} tokens, over the limit of {limit}")
        self.at_least = at_least
        self.limit = limit
        self.exact = exact


def check_token_ids(tokens: Iterable[object], n_vocab: int) -> list[int]:
    """`tokens` as a list of ints: TypeError for anything that is not an integer (a float, a string: llama.cpp's
    C API would not take them either), ValueError naming the first id outside [0, n_vocab)."""
    out = []
    for t in tokens:
        if not isinstance(t, (int, np.integer)):
            raise TypeError(f"token ids must be integers, got {type(t).__name__} {t!r}")
        t = int(t)
        if not 0 <= t < n_vocab:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {n_vocab})")
        out.append(t)
    return out


def decode_utf8(b: bytes) -> str:
    """Text of `b` as llama.cpp reads it: well-formed UTF-8 as usual; each byte that does not start a complete
    sequence becomes U+FFFD on its own (Python's "replace" would merge a truncated sequence into one U+FFFD)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, i, n = [], 0, len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            out.append(chr(c))
            i += 1
            continue
        length = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 0
        if length and i + length <= n and all(b[i + k] & 0xC0 == 0x80 for k in range(1, length)):
            cp = c & (0x7F >> length)
            for k in range(1, length):
                cp = (cp << 6) | (b[i + k] & 0x3F)
            # llama.cpp accepts overlong forms too; code points a Python/Rust string cannot hold become U+FFFD
            out.append("\ufffd" if 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF else chr(cp))
            i += length
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


def _bpe(vocab: Vocab, specials: Iterable[int]) -> Tokenizer:
    tk = Tokenizer(models.BPE(vocab=vocab.token_index, merges=vocab.merge_pairs, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(vocab.tokens[i], special=True, normalized=False) for i in specials])
    return tk


class DSV4Tokenizer:
    """tokenize(bytes) -> ids and detokenize(ids) -> bytes for one vocabulary."""

    def __init__(self, vocab: Vocab) -> None:
        if vocab.model != "gpt2":
            raise TokenizerError(f"tokenizer model {vocab.model!r} is not supported (deepseek4 uses 'gpt2')")
        if vocab.pre is not None and vocab.pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"pre-tokenizer {vocab.pre!r} is not supported; expected one of {PRE_TOKENIZERS}")
        self.vocab = vocab
        types = vocab.token_types
        user = [i for i in range(vocab.n_tokens) if types[i] == USER_DEFINED]
        control = [i for i in range(vocab.n_tokens) if types[i] == CONTROL]
        self._user = user
        # special=True (how llama-cpp-python tokenizes prompts) is built now; special=False on first use
        self._special = self._build(user + control)
        self._plain: Tokenizer | None = None  # user-defined tokens are always recognised
        self._plain_lock = threading.Lock()
        # the bytes of every token: byte-level symbols decoded; user-defined as written; control as written
        # (emitted only when special=True). A symbol outside the byte alphabet keeps the token's UTF-8.
        to_byte = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
        to_byte.update({i: "\uffff" for i in range(256) if i not in to_byte})  # (not latin-1: flags the token)
        self._pieces: list[bytes] = []
        for t, ty in zip(vocab.tokens, types, strict=True):
            if ty == NORMAL:
                try:
                    self._pieces.append(t.translate(to_byte).encode("latin-1"))
                except UnicodeEncodeError:
                    self._pieces.append(t.encode("utf-8"))
            else:
                self._pieces.append(t.encode("utf-8"))
        self._control = frozenset(control)
        # no token covers more bytes of text than its piece: a text of n bytes is at least n / this many tokens
        self.max_token_bytes = max(1, max(map(len, self._pieces)))
        # a cut between two characters that follow each other in an added token could split one: not there
        self._in_added = {
            t[i : i + 2] for t, ty in zip(vocab.tokens, types, strict=True) if ty != NORMAL for i in range(len(t) - 1)
        }

    def _build(self, specials: list[int]) -> Tokenizer:
        try:
            return _bpe(self.vocab, specials)
        except BaseException as e:
            # the tokenizer library reports a vocabulary it cannot build with Exception, or with a Rust panic
            # (pyo3's PanicException, a BaseException); the loader's checks should leave neither possible
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(f"the vocabulary does not make a BPE tokenizer: {type(e).__name__}: {e}") from None

    def _plain_tokenizer(self) -> Tokenizer:
        with self._plain_lock:
            if self._plain is None:
                self._plain = self._build(self._user)
            return self._plain

    @property
    def n_tokens(self) -> int:
        """The vocabulary size."""
        return self.vocab.n_tokens

    def min_tokens(self, n_bytes: int) -> int:
        """A lower bound on the token count of any text of `n_bytes` bytes (of UTF-8; characters also do)."""
        return -(-n_bytes // self.max_token_bytes)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False, limit: int | None = None) -> list[int]:
        """Token ids of `text` (bytes, read as UTF-8 the way llama.cpp reads it). A BOS token is prepended only if
        `add_bos` and the vocabulary asks for one (DeepSeek V4 files do not), as in llama.cpp. With `limit`, a text
        that needs more tokens raises TooManyTokens: before any encoding when its length shows it, else as soon as
        the count is over."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            n_bytes, s = len(text), decode_utf8(bytes(text))
        else:
            s = str(text)
            n_bytes = len(s)
        v = self.vocab
        head = [v.bos_id] if add_bos and v.add_bos and v.bos_id is not None else []
        tail = [v.eos_id] if add_bos and v.add_eos and v.eos_id is not None else []
        if limit is not None and len(head) + len(tail) + self.min_tokens(n_bytes) > limit:
            raise TooManyTokens(len(head) + len(tail) + self.min_tokens(n_bytes), limit, exact=False)
        enc = self._special if special else self._plain_tokenizer()
        ids = head
        for a, z in self._pieces_of(s):
            ids += enc.encode_batch([s[a:z]], add_special_tokens=False)[0].ids  # (releases the GIL)
            at_least = len(ids) + len(tail) + self.min_tokens(len(s) - z)
            if limit is not None and at_least > limit:
                raise TooManyTokens(at_least, limit, exact=z == len(s))
        return ids + tail if tail else ids

    def _pieces_of(self, s: str) -> Iterator[tuple[int, int]]:
        """(start, end) of the pieces `s` is encoded in: about CHUNK_CHARS long, cut where no token can cross."""
        start, n = 0, len(s)
        while n - start > CHUNK_CHARS:
            cut = self._cut_after(s, start + CHUNK_CHARS)
            if cut is None:
                break
            yield start, cut
            start = cut
        yield start, n

    def _cut_after(self, s: str, pos: int) -> int | None:
        """The first place at or after `pos` where `s` can be cut without changing its tokens, or None."""
        while (m := _CUT.search(s, pos)) is not None:
            cut = m.start()
            if s[cut - 1 : cut + 1] not in self._in_added:
                return cut
            pos = cut + 1
        return None

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; a control token is empty unless `special`. ValueError for an id outside the
        vocabulary (TypeError for a non-integer)."""
        (token,) = check_token_ids((token,), len(self._pieces))
        if not special and token in self._control:
            return b""
        return self._pieces[token]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of `tokens` (control tokens only with `special`); a leading space after a BOS is dropped,
        as llama-cpp-python does."""
        pieces, control = self._pieces, self._control
        tokens = check_token_ids(tokens, len(pieces))
        out = []
        for t in tokens:
            if special or t not in control:
                out.append(pieces[t])
        b = b"".join(out)
        if tokens and int(tokens[0]) == self.vocab.bos_id and b[:1] == b" ":
            b = b[1:]
        return b


# ------------------------------------------------------------------------------------------ llama-cpp-python API


class BaseLlamaTokenizer:
    """llama-cpp-python's tokenizer interface (`llama_cpp.llama_tokenizer.BaseLlamaTokenizer`)."""

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text` (UTF-8 bytes); `special` parses control tokens written in the text."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes of `tokens` (`prev_tokens`: the tokens before them, for tokenizers whose text depends on
        them); control tokens only with `special`."""
        raise NotImplementedError


class LlamaTokenizer(BaseLlamaTokenizer):
    """The model's own tokenizer, as `Llama.tokenizer()` returns it."""

    def __init__(self, llama: object, weak: bool = False) -> None:
        """weak: refer to `llama` without keeping it alive (its own `tokenizer_`: no reference cycle, so a Llama
        and its buffers are freed as soon as the last reference to it goes)."""
        self._strong = None if weak else llama
        self._llama = weakref.ref(llama)

    def _tok(self) -> DSV4Tokenizer:
        llama = self._llama()
        if llama is None:
            raise ValueError("the Llama of this tokenizer has been closed")
        return llama.dsv4_tokenizer  # type: ignore[attr-defined]

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of `text` (bytes) with the model's tokenizer (DSV4Tokenizer.tokenize)."""
        return self._tok().tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes of `tokens` (every token's whole piece; `prev_tokens` is not needed and ignored)."""
        return self._tok().detokenize(tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of a str."""
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: list[int]) -> str:
        """The text of `tokens` (control tokens left out; bytes that are not UTF-8 dropped)."""
        return self.detokenize(tokens).decode("utf-8", errors="ignore")

    @classmethod
    def from_ggml_file(cls, path: str) -> LlamaTokenizer:
        """The tokenizer of a GGUF file (its vocabulary only; the file stays mapped while the tokenizer lives)."""
        return cls(_VocabFile(path))


class _VocabFile:
    """A model file opened for its vocabulary (LlamaTokenizer.from_ggml_file)."""

    def __init__(self, path: str) -> None:
        from .model.loader import load_model

        try:
            self._model = load_model(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"Failed to load model from file: {path}: {e}") from e
        vocab = self._model.vocab
        self._tok = DSV4Tokenizer(vocab) if vocab is not None else None
        self.path = path

    @property
    def dsv4_tokenizer(self) -> DSV4Tokenizer:
        if self._tok is None:
            raise ValueError(f"{self.path} has no tokenizer (tokenizer.ggml.model = no_vocab); pass token ids")
        return self._tok


class LlamaHFTokenizer(BaseLlamaTokenizer):
    """A Hugging Face tokenizer (anything with encode/decode) in the llama-cpp-python interface."""

    def __init__(self, hf_tokenizer: object) -> None:
        self.hf_tokenizer = hf_tokenizer

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        """The HF tokenizer's ids of `text` (`special` is its add_special_tokens; `add_bos` is not used)."""
        return self.hf_tokenizer.encode(text.decode("utf-8", errors="ignore"), add_special_tokens=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """The bytes `tokens` add after `prev_tokens` (decoded together, so merged pieces come out right); special
        tokens only with `special`."""
        skip = not special
        if prev_tokens is not None:
            text = self.hf_tokenizer.decode(prev_tokens + tokens, skip_special_tokens=skip).encode("utf-8", "ignore")
            prev = self.hf_tokenizer.decode(prev_tokens, skip_special_tokens=skip).encode("utf-8", "ignore")
            return text[len(prev) :]
        return self.hf_tokenizer.decode(tokens, skip_special_tokens=skip).encode("utf-8", errors="ignore")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str) -> LlamaHFTokenizer:
        """Wrap `transformers.AutoTokenizer.from_pretrained(...)` (needs transformers installed)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("LlamaHFTokenizer.from_pretrained needs transformers (pip install transformers)") from e
        return cls(AutoTokenizer.from_pretrained(pretrained_model_name_or_path))
