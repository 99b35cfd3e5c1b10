"""Tokenization and detokenization identical to llama-cpp-python 0.3.36 (committed reference data made by
tests/fixtures/make_tokenizer_refs.py) on a corpus of 2400 varied strings and 600 token-id sequences; long texts
encoded in pieces with the same ids, off the GIL, and refused early past a limit."""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
import time
from typing import Any

import pytest

from llama_dsv4 import tokenizer
from llama_dsv4.model.loader import load_model
from llama_dsv4.tokenizer import DSV4Tokenizer, TokenizerError, TooManyTokens, decode_utf8

REF = os.path.join(os.path.dirname(__file__), "data", "tokenizer_ref.json.gz")


@pytest.fixture(scope="module")
def ref() -> dict:
    with gzip.open(REF, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(real_vocab_path: str) -> DSV4Tokenizer:
    with load_model(real_vocab_path) as m:
        return DSV4Tokenizer(m.vocab)


def test_corpus_is_large_and_varied(ref: dict) -> None:
    texts = ref["input"]["texts"]
    assert len(texts) >= 2000 and len(ref["input"]["ids"]) >= 500
    joined = "".join(texts)
    for probe in ("  ", "\n\n", "123", "def ", "你好", "😀", "<｜User｜>", "<think>", "\t"):
        assert probe in joined


def test_tokenize_matches_reference(ref: dict, tok: DSV4Tokenizer) -> None:
    texts = ref["input"]["texts"]
    for i, t in enumerate(texts):
        b = t.encode("utf-8")
        assert tok.tokenize(b, add_bos=True, special=False) == ref["tokenize"][i], t
        assert tok.tokenize(b, add_bos=True, special=True) == ref["tokenize_special"][i], t


def test_tokenize_invalid_utf8_matches_reference(ref: dict, tok: DSV4Tokenizer) -> None:
    for h, expect in zip(ref["input"]["bytes"], ref["tokenize_bytes"], strict=True):
        assert tok.tokenize(bytes.fromhex(h), add_bos=False) == expect, h


def test_special_tokens_follow_llama_cpp(tok: DSV4Tokenizer) -> None:
    user, asst = 128803, 128804
    text = "<｜User｜>Hi<think>x</think>".encode()
    plain, special = tok.tokenize(text, special=False), tok.tokenize(text, special=True)
    assert user not in plain and special[0] == user  # control tokens only with special=True
    assert 128821 in plain and 128822 in plain  # user-defined <think> </think>: always
    assert tok.detokenize([user, 19923, asst]) == tok.detokenize([19923])  # control tokens hidden...
    assert tok.detokenize([user, 19923], special=True).startswith("<｜User｜>".encode())  # ...unless special


def test_detokenize_matches_reference(ref: dict, tok: DSV4Tokenizer) -> None:
    """llama-cpp-python decodes token by token into a 32-byte buffer and garbles the tokens whose bytes are longer
    (71 DeepSeek V4 tokens, plus control tokens such as <｜place▁holder▁no▁123｜> when special=True); for those we
    match llama.cpp's own llama_detokenize plus llama-cpp-python's leading-space rule. Everything else is compared
    byte for byte with llama-cpp-python's Llama.detokenize."""
    long_tokens = {sp: {i for i in range(tok.n_tokens) if len(tok.piece(i, special=sp)) > 32} for sp in (False, True)}
    assert len(long_tokens[False]) == 71  # and 702 control tokens with special=True
    checked_long = 0
    for i, ids in enumerate(ref["input"]["ids"]):
        for special, key, key_c in (
            (False, "detokenize", "detokenize_c"),
            (True, "detokenize_special", "detokenize_c_special"),
        ):
            ours = tok.detokenize(ids, special=special)
            if long_tokens[special].isdisjoint(ids):
                assert ours.hex() == ref[key][i], (ids, special)
            else:
                expect = bytes.fromhex(ref[key_c][i])
                if ids[0] == 0 and expect[:1] == b" ":
                    expect = expect[1:]
                assert ours == expect, (ids, special)
                checked_long += 1
    assert checked_long > 0


def test_round_trip_and_errors(tok: DSV4Tokenizer) -> None:
    for t in ("Hello world", "你好，世界 😀", "  x\n\n", "def f():\n\treturn 1"):
        assert tok.detokenize(tok.tokenize(t.encode())) == t.encode()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenize([129280])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenize([-1])


def test_decode_utf8_is_llama_cpp_s() -> None:
    assert decode_utf8("ok 你好".encode()) == "ok 你好"
    assert decode_utf8(b"\xe4\xbd") == "\ufffd\ufffd"  # one replacement per byte that starts no sequence
    assert decode_utf8(b"a\xffb") == "a\ufffdb"
    assert decode_utf8(b"\xc0\xaf") == "/"  # overlong forms are read as llama.cpp reads them


def test_unsupported_vocabularies_are_refused(real_vocab_path: str) -> None:
    import dataclasses

    with load_model(real_vocab_path) as m, pytest.raises(TokenizerError, match="pre-tokenizer 'llama3'"):
        DSV4Tokenizer(dataclasses.replace(m.vocab, pre="llama3"))


# ---------------------------------------------------------------------------------------------- long texts


def test_encoding_in_pieces_gives_the_tokens_of_the_whole(ref: dict, tok: DSV4Tokenizer, monkeypatch: Any) -> None:
    """Texts are encoded in pieces cut where no token or pre-token can cross. With pieces as small as the cuts
    allow, the reference corpus tokenizes as llama.cpp does, and soups of added tokens, letters of several scripts,
    digits, CJK runs, combining marks, punctuation and white space tokenize as the whole text does at once."""
    monkeypatch.setattr(tokenizer, "CHUNK_CHARS", 1)
    texts = ref["input"]["texts"]
    for i, t in enumerate(texts):
        b = t.encode("utf-8")
        assert tok.tokenize(b, special=False) == ref["tokenize"][i], t
        assert tok.tokenize(b, special=True) == ref["tokenize_special"][i], t
    assert len(list(tok._pieces_of("".join(texts)))) > 5000  # the corpus has cuts everywhere

    v = tok.vocab
    added = [t for t, ty in zip(v.tokens, v.token_types, strict=True) if ty != 1]
    frags = ["<think>", "</think>", "<｜User｜>", "<dsml:", "a", "k", "T", "ab", " the", "'s", "x.", "_x", "a_", " "]
    frags += ["\n", "\r\n", "\t", "  ", "\x00", "\x1c", "\xa0", "\u3000", "\u2028", ">", ":", "|", "<", "/", "!", "-"]
    frags += ["1", "23", "²", "½", "Ⅻ", "x²", "中文", "中文，", "。", "「", "」", "ー", "・", "゠", "カタ", "ひら"]
    frags += ["привет", "мир,", "é", "e\u0301", "ǅ", "ß", "😀"]
    rnd = random.Random(0)
    for _ in range(200):
        text = "".join(rnd.choice(frags + rnd.sample(added, 3)) for _ in range(rnd.randint(1, 120)))
        for special, whole in ((True, tok._special), (False, tok._plain_tokenizer())):
            assert tok.tokenize(text.encode(), add_bos=False, special=special) == whole.encode(text).ids, text


def test_bytes_bound_the_token_count(ref: dict, tok: DSV4Tokenizer) -> None:
    """No token covers more bytes than the longest piece of the vocabulary, so a text of n bytes needs at least
    n / max_token_bytes tokens: true over the corpus, with and without special tokens."""
    longest = max(len(tok.piece(i, special=True)) for i in range(tok.n_tokens))
    assert tok.max_token_bytes == longest == 128
    for i, t in enumerate(ref["input"]["texts"]):
        n = len(t.encode("utf-8"))
        assert len(ref["tokenize"][i]) >= tok.min_tokens(n) and len(ref["tokenize_special"][i]) >= tok.min_tokens(n)


class EncodeSpy:
    """Counts the characters a Tokenizer is asked to encode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.chars = 0

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> Any:
        self.chars += sum(map(len, texts))
        return self.inner.encode_batch(texts, add_special_tokens=add_special_tokens)


def test_a_limit_refuses_a_long_text_early(tok: DSV4Tokenizer, monkeypatch: Any) -> None:
    """With a limit, a text whose length alone shows it needs more tokens is refused without encoding any of it;
    one that needs more but does not show it is encoded only until the count is over; a short one is encoded
    whole and the count is exact."""
    spy = EncodeSpy(tok._special)
    monkeypatch.setattr(tok, "_special", spy)
    text = ("word " * 1_000_000).encode()  # 5 MB, a million tokens
    t0 = time.perf_counter()
    with pytest.raises(TooManyTokens) as e:
        tok.tokenize(text, special=True, limit=1000)
    assert time.perf_counter() - t0 < 2 and spy.chars == 0
    assert e.value.at_least == tok.min_tokens(len(text)) and not e.value.exact and "at least" in str(e.value)

    with pytest.raises(TooManyTokens) as e:
        tok.tokenize(text, special=True, limit=60_000)  # over the bound from bytes (39063)
    assert 0 < spy.chars < len(text) // 20 and e.value.at_least > 60_000 and not e.value.exact

    ids = tok.tokenize(b"Hello world, again", special=True)
    with pytest.raises(TooManyTokens) as e:
        tok.tokenize(b"Hello world, again", special=True, limit=len(ids) - 1)
    assert e.value.exact and e.value.at_least == len(ids)
    assert tok.tokenize(b"Hello world, again", special=True, limit=len(ids)) == ids


def test_tokenizing_lets_other_threads_run(tok: DSV4Tokenizer) -> None:
    """Tokenizing a 4 MB text leaves the GIL to other threads (a server's event loop): a thread that wakes every
    5 ms is never held up for more than a small part of the time (the library's `encode` held it throughout)."""
    text = ("Hello world, this is some text 12345 with punctuation!\n" * 75_000).encode()
    gaps: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    th = threading.Thread(target=ticker)
    th.start()
    try:
        t0 = time.perf_counter()
        ids = tok.tokenize(text, special=True)
        total = time.perf_counter() - t0
    finally:
        done.set()
        th.join()
    assert len(ids) > 900_000
    print(f"tokenize 4 MB: {total:.2f} s, longest wait of another thread {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < 0.25 * total, (max(gaps), total)
