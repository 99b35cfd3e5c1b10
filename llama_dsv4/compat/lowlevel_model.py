"""Models and vocabularies of the low-level API (lowlevel.py says how it maps onto llama-dsv4): loading and
freeing a model, its queries and metadata, the vocabulary's special tokens and attributes, llama_tokenize /
llama_token_to_piece / llama_detokenize into the caller's ctypes buffers, and `_lib.llama_tokenize`, the same
tokenizer behind a C function pointer (llguidance calls it from Rust)."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ..tokenizer import check_token_ids
from . import cbuffers
from . import constants as C
from .cbuffers import as_int
from .handles import handle_of, register, release
from .lowlevel import _MODEL, _VOCAB, INT32_MAX, _limit, _llama, log
from .lowlevel_types import llama_model_params


def _load_flags(params: Any) -> tuple[bool, bool]:
    """(use_mmap, use_mlock) from load_mode, or from the use_mmap / use_mlock attributes older callers set."""
    if params is None:
        return True, False
    mode = int(getattr(params, "load_mode", C.LLAMA_LOAD_MODE_AUTO))
    use_mmap = mode in (C.LLAMA_LOAD_MODE_AUTO, C.LLAMA_LOAD_MODE_MMAP, C.LLAMA_LOAD_MODE_MMAP_MLOCK)
    use_mlock = mode in (C.LLAMA_LOAD_MODE_MLOCK, C.LLAMA_LOAD_MODE_MMAP_MLOCK)
    extra = vars(params) if hasattr(params, "__dict__") else {}
    return bool(extra.get("use_mmap", use_mmap)), bool(extra.get("use_mlock", use_mlock))


def llama_model_load_from_file(path_model: bytes | str, params: llama_model_params | None = None) -> int | None:
    """A model handle, or None (and the reason logged) if the file does not load, as llama.cpp."""
    from ..llama import Llama

    if not isinstance(path_model, (bytes, str, os.PathLike)):
        raise TypeError(f"path_model must be bytes (the file's path), got {type(path_model).__name__}")
    path = os.fsdecode(path_model)
    use_mmap, use_mlock = _load_flags(params)
    try:
        llm = Llama(path, vocab_only=True, use_mmap=use_mmap, verbose=False)
    except (ValueError, OSError) as e:
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_model_load_from_file: failed to load model from {path}: {e}")
        return None
    llm._lowlevel_load = {"use_mmap": use_mmap, "use_mlock": use_mlock}
    return register(llm, "model")


llama_load_model_from_file = llama_model_load_from_file  # the name before llama.cpp b4000


def llama_model_free(model: int) -> None:
    """Free a model from llama_model_load_from_file (contexts made from it keep working until freed)."""
    release(model, _MODEL).close()


llama_free_model = llama_model_free


def llama_model_get_vocab(model: int) -> int:
    llm = _llama(model, _MODEL)
    return handle_of(llm, "vocab")


def _params(model: Any) -> Any:
    return _llama(model, _MODEL)._params


def llama_model_n_ctx_train(model: int) -> int:
    return int(_params(model).n_ctx_train)


def llama_model_n_embd(model: int) -> int:
    return int(_params(model).n_embd)


def llama_model_n_layer(model: int) -> int:
    return int(_params(model).n_layer)


def llama_model_n_head(model: int) -> int:
    return int(_params(model).n_head)


def llama_model_n_head_kv(model: int) -> int:
    return 1  # one latent key/value head shared by all query heads


def llama_model_n_swa(model: int) -> int:
    return int(_params(model).window)


def llama_model_n_params(model: int) -> int:
    return sum(t.n_elements for t in _llama(model, _MODEL)._model.tensors.values())


def llama_model_size(model: int) -> int:
    return int(_llama(model, _MODEL)._model.n_bytes)


def llama_model_has_encoder(model: int) -> bool:
    _llama(model, _MODEL)
    return False


def llama_model_has_decoder(model: int) -> bool:
    _llama(model, _MODEL)
    return True


def llama_model_is_recurrent(model: int) -> bool:
    _llama(model, _MODEL)
    return False


llama_model_is_hybrid = llama_model_is_diffusion = llama_model_is_recurrent


def llama_model_decoder_start_token(model: int) -> int:
    _llama(model, _MODEL)
    return C.LLAMA_TOKEN_NULL


def _snprintf(text: str | bytes, buf: Any, buf_size: int) -> int:
    """C's snprintf into buf: at most buf_size - 1 bytes and a NUL; returns the full length."""
    data = text.encode() if isinstance(text, str) else text
    buf_size = as_int(buf_size, "buf_size")
    if buf_size < 0:
        raise ValueError(f"buf_size must be a non-negative integer, got {buf_size!r}")
    if buf_size > 0:
        cbuffers.write_bytes(buf, buf_size, data[: buf_size - 1] + b"\0", "buf")
    return len(data)


def llama_model_desc(model: int, buf: Any, buf_size: int) -> int:
    llm = _llama(model, _MODEL)
    label = llm.metadata.get("general.size_label") or f"{llama_model_n_params(model) / 1e9:.1f}B"
    return _snprintf(f"deepseek4 {label}", buf, buf_size)


def _meta_items(model: Any) -> list[tuple[str, str]]:
    return list(_llama(model, _MODEL).metadata.items())


def llama_model_meta_val_str(model: int, key: bytes | str, buf: Any, buf_size: int) -> int:
    """The metadata value of `key` as a string into buf; -1 (and buf cleared) if there is none."""
    k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    value = _llama(model, _MODEL).metadata.get(k)
    if value is None:
        _snprintf(b"", buf, min(as_int(buf_size, "buf_size"), 1))
        return -1
    return _snprintf(value, buf, buf_size)


def llama_model_meta_count(model: int) -> int:
    return len(_meta_items(model))


def _meta_at(model: int, i: int, which: int, buf: Any, buf_size: int) -> int:
    items = _meta_items(model)
    if not 0 <= as_int(i, "i") < len(items):
        _snprintf(b"", buf, min(as_int(buf_size, "buf_size"), 1))
        return -1
    return _snprintf(items[i][which], buf, buf_size)


def llama_model_meta_key_by_index(model: int, i: int, buf: Any, buf_size: int) -> int:
    return _meta_at(model, i, 0, buf, buf_size)


def llama_model_meta_val_str_by_index(model: int, i: int, buf: Any, buf_size: int) -> int:
    return _meta_at(model, i, 1, buf, buf_size)


def llama_model_chat_template(model: int, name: bytes | str | None) -> bytes | None:
    """The file's chat template (`name`: a named one, tokenizer.chat_template.NAME), None if it has none."""
    key = "tokenizer.chat_template"
    if name:
        key += "." + (name.decode() if isinstance(name, bytes) else str(name))
    value = _llama(model, _MODEL).metadata.get(key)
    return value.encode() if value is not None else None


# deprecated names that took the model
llama_n_ctx_train, llama_n_embd = llama_model_n_ctx_train, llama_model_n_embd
llama_n_layer, llama_n_head = llama_model_n_layer, llama_model_n_head


# ------------------------------------------------------------------------------------------------ vocabulary
def _vocab(vocab: Any) -> Any:
    """The Llama of a vocab (or model) handle, after checking it has a tokenizer."""
    llm = _llama(vocab, _VOCAB)
    llm.dsv4_tokenizer  # noqa: B018 - raises without a vocabulary
    return llm


def _token(llm: Any, token: Any) -> int:
    (t,) = check_token_ids((token,), llm.n_vocab())
    return t


def llama_vocab_n_tokens(vocab: int) -> int:
    return int(_llama(vocab, _VOCAB).n_vocab())


llama_n_vocab = llama_vocab_n_tokens


def llama_vocab_type(vocab: int) -> int:
    llm = _llama(vocab, _VOCAB)
    return C.LLAMA_VOCAB_TYPE_BPE if llm._vocab is not None else C.LLAMA_VOCAB_TYPE_NONE


def llama_vocab_get_text(vocab: int, token: int) -> bytes:
    llm = _vocab(vocab)
    return llm._vocab.tokens[_token(llm, token)].encode()


def llama_vocab_get_score(vocab: int, token: int) -> float:
    llm = _vocab(vocab)
    _token(llm, token)
    return 0.0  # a BPE vocabulary has no scores


_ATTRS = {
    1: C.LLAMA_TOKEN_ATTR_NORMAL,
    2: C.LLAMA_TOKEN_ATTR_UNKNOWN,
    3: C.LLAMA_TOKEN_ATTR_CONTROL,
    4: C.LLAMA_TOKEN_ATTR_USER_DEFINED,
    5: C.LLAMA_TOKEN_ATTR_UNUSED,
    6: C.LLAMA_TOKEN_ATTR_BYTE,
}


def llama_vocab_get_attr(vocab: int, token: int) -> int:
    llm = _vocab(vocab)
    return _ATTRS.get(int(llm._vocab.token_types[_token(llm, token)]), C.LLAMA_TOKEN_ATTR_UNDEFINED)


def llama_vocab_is_eog(vocab: int, token: int) -> bool:
    llm = _vocab(vocab)
    return _token(llm, token) == llm.token_eos()


def llama_vocab_is_control(vocab: int, token: int) -> bool:
    return llama_vocab_get_attr(vocab, token) == C.LLAMA_TOKEN_ATTR_CONTROL


def _special(vocab: Any, attr: str) -> int:
    v = _llama(vocab, _VOCAB)._vocab
    value = getattr(v, attr) if v is not None else None
    return int(value) if value is not None else C.LLAMA_TOKEN_NULL


def llama_vocab_bos(vocab: int) -> int:
    return _special(vocab, "bos_id")


def llama_vocab_eos(vocab: int) -> int:
    return _special(vocab, "eos_id")


def llama_vocab_pad(vocab: int) -> int:
    return _special(vocab, "pad_id")


def llama_vocab_nl(vocab: int) -> int:
    return int(_llama(vocab, _VOCAB).token_nl())


def llama_vocab_eot(vocab: int) -> int:
    _llama(vocab, _VOCAB)
    return C.LLAMA_TOKEN_NULL  # DeepSeek V4 ends a turn with EOS


llama_vocab_sep = llama_vocab_mask = llama_vocab_cls = llama_vocab_eot
llama_vocab_fim_pre = llama_vocab_fim_suf = llama_vocab_fim_mid = llama_vocab_eot
llama_vocab_fim_pad = llama_vocab_fim_rep = llama_vocab_fim_sep = llama_vocab_eot


def llama_vocab_get_add_bos(vocab: int) -> bool:
    v = _llama(vocab, _VOCAB)._vocab
    return bool(v is not None and v.add_bos)


def llama_vocab_get_add_eos(vocab: int) -> bool:
    v = _llama(vocab, _VOCAB)._vocab
    return bool(v is not None and v.add_eos)


def llama_vocab_get_add_sep(vocab: int) -> bool:
    _llama(vocab, _VOCAB)
    return False


# the names before llama.cpp's vocab split (they took the model; either handle works)
llama_token_get_text, llama_token_get_score = llama_vocab_get_text, llama_vocab_get_score
llama_token_get_attr, llama_token_is_eog, llama_token_is_control = (
    llama_vocab_get_attr,
    llama_vocab_is_eog,
    llama_vocab_is_control,
)
llama_token_bos, llama_token_eos, llama_token_eot = llama_vocab_bos, llama_vocab_eos, llama_vocab_eot
llama_token_cls = llama_token_sep = llama_token_fim_pre = llama_token_fim_suf = llama_vocab_eot
llama_token_fim_mid = llama_token_fim_pad = llama_token_fim_rep = llama_token_fim_sep = llama_vocab_eot
llama_token_nl, llama_token_pad = llama_vocab_nl, llama_vocab_pad
llama_add_bos_token, llama_add_eos_token = llama_vocab_get_add_bos, llama_vocab_get_add_eos


def llama_tokenize(
    vocab: int,
    text: Any,
    text_len: int,
    tokens: Any,
    n_tokens_max: int,
    add_special: bool,
    parse_special: bool,
) -> int:
    """Tokenize text[:text_len] into `tokens` (a ctypes int32 array of at least n_tokens_max); returns the count,
    or minus the count needed when n_tokens_max is too small (nothing written)."""
    tok = _vocab(vocab).dsv4_tokenizer
    n_max = _limit(n_tokens_max, "n_tokens_max")
    cbuffers.check_writable(tokens, n_max, 4, "tokens")
    data = cbuffers.read_bytes(text, text_len, "text")
    ids = tok.tokenize(data, add_bos=bool(add_special), special=bool(parse_special))
    if len(ids) > n_max:
        return -len(ids) if len(ids) <= INT32_MAX else -INT32_MAX - 1
    cbuffers.write_int32(tokens, n_max, ids, "tokens")
    return len(ids)


def llama_token_to_piece(vocab: int, token: int, buf: Any, length: int, lstrip: int, special: bool) -> int:
    """The bytes of `token` into buf (no NUL); control tokens only with `special`; up to `lstrip` leading spaces
    skipped. Returns the byte count, or minus it when `length` is too small (nothing written)."""
    llm = _vocab(vocab)
    length = _limit(length, "length")
    cbuffers.check_writable(buf, length, 1, "buf")
    piece = llm.dsv4_tokenizer.piece(_token(llm, token), special=bool(special))
    strip = _limit(lstrip, "lstrip")
    while strip > 0 and piece[:1] == b" ":
        piece, strip = piece[1:], strip - 1
    if len(piece) > length:
        return -len(piece)
    cbuffers.write_bytes(buf, length, piece, "buf")
    return len(piece)


def llama_detokenize(
    vocab: int,
    tokens: Any,
    n_tokens: int,
    text: Any,
    text_len_max: int,
    remove_special: bool,
    unparse_special: bool,
) -> int:
    """The text of tokens[:n_tokens] into `text`; returns its byte count, or minus it when text_len_max is too
    small (nothing written). remove_special drops a leading BOS / trailing EOS the vocabulary adds."""
    llm = _vocab(vocab)
    n_max = _limit(text_len_max, "text_len_max")
    cbuffers.check_writable(text, n_max, 1, "text")
    ids = check_token_ids(cbuffers.read_int32(tokens, n_tokens, "tokens"), llm.n_vocab())
    v = llm._vocab
    if remove_special and ids and v.add_bos and ids[0] == v.bos_id:
        ids = ids[1:]
    if remove_special and ids and v.add_eos and ids[-1] == v.eos_id:
        ids = ids[:-1]
    data = llm.dsv4_tokenizer.detokenize(ids, special=bool(unparse_special))
    if len(data) > n_max:
        return -len(data)
    cbuffers.write_bytes(text, n_max, data, "text")
    return len(data)


# ------------------------------------------------------------------------------------------------ _lib
_TOKENIZE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int32,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_bool,
    ctypes.c_bool,
)


def _c_tokenize(vocab: Any, text: Any, text_len: int, tokens: Any, n_max: int, add: bool, parse: bool) -> int:
    try:
        return llama_tokenize(vocab, text or 0, text_len, tokens or 0, n_max, add, parse)
    except Exception as e:  # a C caller cannot receive an exception: say why, and return no tokens
        log(C.GGML_LOG_LEVEL_ERROR, f"llama_tokenize (C callback): {type(e).__name__}: {e}")
        return 0


class _Lib:
    """`llama_cpp.llama_cpp._lib`: the functions a C caller may need by address. llguidance's llama.cpp tokenizer
    takes `_lib.llama_tokenize` and calls it from Rust; it is our llama_tokenize behind a C function pointer."""

    llama_tokenize = _TOKENIZE_FN(_c_tokenize)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"llama-dsv4 has no C library: _lib.{name} does not exist (the low-level functions are in llama_cpp)"
        )


_lib = _Lib()

__all__ = [n for n in list(globals()) if n.startswith("llama_") and callable(globals()[n])]
