"""Broken and hostile model files: each is rejected before use with a ValueError naming the file and the key or
tensor at fault (never a crash, never a half-loaded model)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from conftest import MICRO

from llama_dsv4.model.gguf_format import GGMLType, ValueType
from llama_dsv4.model.gguf_read import read_header
from llama_dsv4.model.gguf_write import KV, TensorEntry, write_gguf
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model


def rewrite(
    src: str,
    dst: str,
    *,
    kv: Callable[[list[KV]], list[KV]] = lambda k: k,
    tensors: Callable[[list[TensorEntry]], list[TensorEntry]] = lambda t: t,
    data: Callable[[TensorEntry, np.ndarray], np.ndarray] = lambda e, d: d,
) -> str:
    """Copy a valid single-file model with its metadata and/or tensor table edited."""
    with open(src, "rb") as f:
        buf = f.read()
    h = read_header(buf, src)
    kvs = []
    for key, value in h.kv.items():
        t = h.kv_types[key]
        kvs.append(KV(key, t.type, value, t.elem))
    entries = tensors([TensorEntry(t.name, t.ne, t.type) for t in h.tensors])
    infos = {t.name: t for t in h.tensors}

    def payload(e: TensorEntry) -> np.ndarray:
        t = infos.get(e.name)
        raw = np.frombuffer(buf, np.uint8, t.nbytes, t.offset) if t else np.zeros(e.nbytes, np.uint8)
        return data(e, raw)

    write_gguf(dst, kv(kvs), entries, payload)
    return dst


def set_kv(key: str, vtype: ValueType, value: object, elem: ValueType | None = None) -> Callable[[list[KV]], list[KV]]:
    return lambda kvs: [KV(key, vtype, value, elem) if k.key == key else k for k in kvs]


def drop_kv(key: str) -> Callable[[list[KV]], list[KV]]:
    return lambda kvs: [k for k in kvs if k.key != key]


def patch(src: str, dst: str, edit: Callable[[bytearray], None]) -> str:
    with open(src, "rb") as f:
        b = bytearray(f.read())
    edit(b)
    with open(dst, "wb") as f:
        f.write(b)
    return dst


def info_pos(b: bytes | bytearray, name: str) -> int:
    """Byte offset of the n_dims field of tensor `name`'s info record."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = bytes(b).index(key)
    return i + len(key)


def field_after_ne(b: bytes | bytearray, name: str) -> int:
    """Byte offset of the type field of tensor `name` (the offset field follows it)."""
    p = info_pos(b, name)
    (n_dims,) = struct.unpack_from("<I", b, p)
    return p + 4 + 8 * n_dims


def bad_cases(micro: str, tmp: str) -> list[tuple[str, str, str]]:
    """(case id, broken file, a fragment the error message must contain)."""
    out = []
    P = lambda name: os.path.join(tmp, name + ".gguf")  # noqa: E731
    A = "deepseek4."

    def add(case: str, path: str, expect: str) -> None:
        out.append((case, path, expect))

    # --- container structure (byte patches)
    add("bad magic", patch(micro, P("magic"), lambda b: b.__setitem__(slice(0, 4), b"GGML")), "not a GGUF file")
    add("version 1", patch(micro, P("v1"), lambda b: struct.pack_into("<I", b, 4, 1)), "unsupported GGUF version 1")
    add("big-endian", patch(micro, P("be"), lambda b: struct.pack_into(">I", b, 4, 3)), "big-endian")
    size = os.path.getsize(micro)
    add("truncated header", patch(micro, P("trunc_head"), lambda b: b.__delitem__(slice(12000, None))), "truncated")
    add(
        "truncated data",
        patch(micro, P("trunc_data"), lambda b: b.__delitem__(slice(size - 4096, None))),
        "extends past the end of the file",
    )
    add("huge kv count", patch(micro, P("nkv"), lambda b: struct.pack_into("<Q", b, 16, 1 << 40)), "implausible counts")
    add(
        "huge string length",
        patch(micro, P("strlen"), lambda b: struct.pack_into("<Q", b, 24, 1 << 60)),
        "truncated: key 0",
    )
    add(
        "too many dims",
        patch(micro, P("ndims"), lambda b: struct.pack_into("<I", b, info_pos(b, "output.weight"), 5)),
        "'output.weight': 5 dimensions",
    )
    add(
        "unknown ggml type",
        patch(micro, P("gtype"), lambda b: struct.pack_into("<I", b, field_after_ne(b, "output.weight"), 4)),
        "'output.weight' has unknown ggml type 4",
    )
    add(
        "misaligned offset",
        patch(
            micro,
            P("misalign"),
            lambda b: struct.pack_into(
                "<Q",
                b,
                field_after_ne(b, "output.weight") + 4,
                struct.unpack_from("<Q", b, field_after_ne(b, "output.weight") + 4)[0] + 4,
            ),
        ),
        "not aligned",
    )

    def overlap(b: bytearray) -> None:
        off = struct.unpack_from("<Q", b, field_after_ne(b, "blk.0.attn_norm.weight") + 4)[0]
        struct.pack_into("<Q", b, field_after_ne(b, "blk.1.attn_norm.weight") + 4, off)

    add("overlapping tensors", patch(micro, P("overlap"), overlap), "overlap")

    def retype(name: str, type_id: int) -> Callable[[bytearray], None]:
        return lambda b: struct.pack_into("<I", b, field_after_ne(b, name), type_id)

    # a type whose block does not divide the row (attn_q_b's rows are q_lora_rank = 32 long; Q4_K blocks are 256)
    add(
        "row not a whole number of blocks",
        patch(micro, P("qblock"), retype("blk.0.attn_q_b.weight", 12)),
        "'blk.0.attn_q_b.weight' (q4_K, shape [32, 128]): its row length 32 is not a multiple of the q4_K block",
    )
    # types that fit the rows but not the bytes the file gives the tensor (the next tensor's offset shows it)
    add(
        "stored size is not the type's",
        patch(micro, P("f16size"), retype("output.weight", 1)),
        "'output.weight' (f16, shape [64, 512]) needs 65536 bytes",
    )
    add(
        "stored size is not the quantized type's",
        patch(micro, P("q8size"), retype("blk.0.ffn_gate_exps.weight", 8)),
        "'blk.0.ffn_gate_exps.weight' (q8_0, shape [64, 64, 4]) needs 17408 bytes",
    )

    def dup_name(b: bytearray) -> None:
        i = bytes(b).index(b"blk.1.attn_norm.weight")
        b[i : i + 5] = b"blk.0"

    add("duplicate tensor", patch(micro, P("dupname"), dup_name), "duplicate tensor 'blk.0.attn_norm.weight'")
    add("duplicate key", rewrite(micro, P("dupkey"), kv=lambda k: [*k, k[0]]), "duplicate key 'general.architecture'")

    # --- metadata (rewritten files)
    add(
        "wrong architecture",
        rewrite(micro, P("arch"), kv=set_kv("general.architecture", ValueType.STRING, "llama")),
        "general.architecture is 'llama'",
    )
    add(
        "missing required key",
        rewrite(micro, P("nokey"), kv=drop_kv(A + "attention.q_lora_rank")),
        "'deepseek4.attention.q_lora_rank': required key is missing",
    )
    add(
        "wrong key type",
        rewrite(micro, P("ktype"), kv=set_kv(A + "expert_count", ValueType.FLOAT32, 4.0)),
        "'deepseek4.expert_count': expected u32, found float32",
    )
    add(
        "gating func",
        rewrite(micro, P("gating"), kv=set_kv(A + "expert_gating_func", ValueType.UINT32, 2)),
        "expert_gating_func: must be 4",
    )
    add(
        "bad compress ratio",
        rewrite(
            micro,
            P("ratio"),
            kv=set_kv(A + "attention.compress_ratios", ValueType.ARRAY, [0, 4, 64, 4, 128, 0], ValueType.INT32),
        ),
        "layer 2 has ratio 64",
    )
    add(
        "short compress ratios",
        rewrite(
            micro,
            P("ratio_len"),
            kv=set_kv(A + "attention.compress_ratios", ValueType.ARRAY, [0, 4, 128], ValueType.INT32),
        ),
        "compress_ratios: has 3 entries, block_count is 6",
    )
    add(
        "hc count",
        rewrite(micro, P("hc"), kv=set_kv(A + "hyper_connection.count", ValueType.UINT32, 3)),
        "hyper_connection.count: must be 4",
    )
    add(
        "head_count_kv",
        rewrite(micro, P("hkv"), kv=set_kv(A + "attention.head_count_kv", ValueType.UINT32, 2)),
        "head_count_kv': must be 1",
    )
    # values the architecture cannot mean: a window longer than the context, more blocks than the context holds
    add(
        "window beyond the context",
        rewrite(micro, P("window_ctx"), kv=set_kv(A + "attention.sliding_window", ValueType.UINT32, 4097)),
        f"{A}attention.sliding_window: 4097 exceeds context_length 4096",
    )
    add(
        "top-k beyond the blocks",
        rewrite(micro, P("topk_ctx"), kv=set_kv(A + "attention.indexer.top_k", ValueType.UINT32, 1025)),
        f"{A}attention.indexer.top_k: 1025 exceeds the 1024 blocks",
    )
    add(
        "clamp length",
        rewrite(micro, P("clamp"), kv=set_kv(A + "swiglu_clamp_exp", ValueType.ARRAY, [1.0, 1.0], ValueType.FLOAT32)),
        "swiglu_clamp_exp': has 2 values",
    )
    add(
        "bos out of vocab",
        rewrite(micro, P("bos"), kv=set_kv("tokenizer.ggml.bos_token_id", ValueType.UINT32, 9999)),
        "'tokenizer.ggml.bos_token_id': token id 9999 is outside",
    )
    add(
        "tokenizer model",
        rewrite(micro, P("tokmodel"), kv=set_kv("tokenizer.ggml.model", ValueType.STRING, "bert")),
        "'bert' is not supported",
    )
    add(
        "token types length",
        rewrite(
            micro, P("toktype"), kv=set_kv("tokenizer.ggml.token_type", ValueType.ARRAY, [1, 1, 1], ValueType.INT32)
        ),
        "has 3 entries for 512 tokens",
    )
    add(
        "chat template type",
        rewrite(micro, P("tmpl"), kv=set_kv("tokenizer.chat_template", ValueType.UINT32, 7)),
        "'tokenizer.chat_template' must be a string",
    )

    # --- tensor table
    add(
        "missing tensor",
        rewrite(micro, P("notensor"), tensors=lambda ts: [t for t in ts if t.name != "blk.3.ffn_norm.weight"]),
        "tensor 'blk.3.ffn_norm.weight' is missing",
    )
    add(
        "extra tensor",
        rewrite(micro, P("extra"), tensors=lambda ts: [*ts, TensorEntry("blk.0.exp_probs_b.bias", (4,), 0)]),
        "unexpected tensor 'blk.0.exp_probs_b.bias'",
    )
    add(
        "wrong shape",
        rewrite(
            micro,
            P("shape"),
            tensors=lambda ts: [
                TensorEntry(t.name, (32, 64), t.type) if t.name == "blk.2.attn_q_a.weight" else t for t in ts
            ],
        ),
        "'blk.2.attn_q_a.weight' has shape [32, 64], the parameters need [64, 32]",
    )
    add(
        "norm stored as f16",
        rewrite(
            micro,
            P("normf16"),
            tensors=lambda ts: [
                TensorEntry(t.name, t.ne, GGMLType.F16) if t.name == "output_norm.weight" else t for t in ts
            ],
            data=lambda e, d: d.view(np.float32).astype(np.float16) if e.name == "output_norm.weight" else d,
        ),
        "'output_norm.weight' has type f16, not valid",
    )
    add(
        "tid2eid out of range",
        rewrite(micro, P("tid2eid"), data=lambda e, d: np.full(d.size // 4, 7, np.int32) if "tid2eid" in e.name else d),
        "'blk.0.ffn_gate_tid2eid.weight' holds expert id 7 outside [0, 4)",
    )
    add(
        "tid2eid as float",
        rewrite(
            micro,
            P("tid2eid_f"),
            tensors=lambda ts: [TensorEntry(t.name, t.ne, GGMLType.F32) if "tid2eid" in t.name else t for t in ts],
        ),
        "'blk.0.ffn_gate_tid2eid.weight' has type f32",
    )
    add("empty file", patch(micro, P("empty"), lambda b: b.clear()), "the file is empty")

    # --- found by the fuzzer (tests/test_fuzz.py): each raised something other than a ValueError
    add(
        "ggml type beyond C int",  # was OverflowError from the type lookup
        patch(
            micro, P("gtype_big"), lambda b: struct.pack_into("<I", b, field_after_ne(b, "output.weight"), 2**32 - 1)
        ),
        "'output.weight' has unknown ggml type 4294967295",
    )
    for key, value in (
        # values that shape no tensor went unchecked into the engine's C ints (OverflowError at Llama(), or a
        # graph that never finishes)
        ("rope.scaling.original_context_length", 2**31),
        ("context_length", 2**31),
        ("attention.sliding_window", 2**31),
        ("attention.indexer.top_k", 2**32 - 1),
        ("hyper_connection.sinkhorn_iterations", 2**31),
    ):
        add(
            f"huge {key}",
            rewrite(micro, P("huge_" + key), kv=set_kv(A + key, ValueType.UINT32, value)),
            f"{A}{key}: {value} is implausibly large",
        )

    def merges(edit: Callable[[list[str]], list[str]]) -> Callable[[list[KV]], list[KV]]:
        return lambda kvs: [
            KV(k.key, k.type, edit(list(k.value)), k.elem) if k.key == "tokenizer.ggml.merges" else k for k in kvs
        ]

    # a merge the BPE library cannot build: was a bare Exception, or a Rust panic (pyo3 PanicException, which is
    # not even an Exception) when the merged token is missing
    add(
        "merge of an unknown token",
        rewrite(micro, P("merge_part"), kv=merges(lambda m: ["zzzq Ġ", *m[1:]])),
        "merge 0 'zzzq Ġ' needs token 'zzzq', not in the vocabulary",
    )
    add(
        "merge into an unknown token",
        rewrite(micro, P("merge_product"), kv=merges(lambda m: ["q z", *m[1:]])),
        "merge 0 'q z' needs token 'qz', not in the vocabulary",
    )
    return out


@pytest.fixture(scope="module")
def cases(micro_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    tmp = str(tmp_path_factory.mktemp("bad"))
    return {c: (p, e) for c, p, e in bad_cases(micro_path, tmp)}


def test_there_are_many_distinct_cases(cases: dict[str, tuple[str, str]]) -> None:
    assert len(cases) >= 43


def test_the_valid_file_loads(micro_path: str) -> None:
    with load_model(micro_path) as m:
        assert len(m.tensors) == 178


@pytest.mark.parametrize(
    "case",
    [
        "bad magic",
        "version 1",
        "big-endian",
        "truncated header",
        "truncated data",
        "huge kv count",
        "huge string length",
        "too many dims",
        "unknown ggml type",
        "misaligned offset",
        "overlapping tensors",
        "row not a whole number of blocks",
        "stored size is not the type's",
        "stored size is not the quantized type's",
        "duplicate tensor",
        "duplicate key",
        "wrong architecture",
        "missing required key",
        "wrong key type",
        "gating func",
        "bad compress ratio",
        "short compress ratios",
        "hc count",
        "head_count_kv",
        "window beyond the context",
        "top-k beyond the blocks",
        "clamp length",
        "bos out of vocab",
        "tokenizer model",
        "token types length",
        "chat template type",
        "missing tensor",
        "extra tensor",
        "wrong shape",
        "norm stored as f16",
        "tid2eid out of range",
        "tid2eid as float",
        "empty file",
        "ggml type beyond C int",
        "huge rope.scaling.original_context_length",
        "huge context_length",
        "huge attention.sliding_window",
        "huge attention.indexer.top_k",
        "huge hyper_connection.sinkhorn_iterations",
        "merge of an unknown token",
        "merge into an unknown token",
    ],
)
def test_rejected_with_a_clear_error(cases: dict[str, tuple[str, str]], case: str) -> None:
    path, expect = cases[case]
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = str(e.value)
    assert path in msg, msg  # names the file
    assert expect in msg, msg  # and what is wrong with it


def test_missing_file_and_directory(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model(os.path.join(tmp_path, "nope.gguf"))
    with pytest.raises(ValueError, match="not a regular file"):
        load_model(tmp_path)


def test_split_sets(model_dir: str, tmp_path: os.PathLike[str]) -> None:
    paths = write_model(os.path.join(model_dir, "micro-split.gguf"), MICRO, n_shards=3)
    d = str(tmp_path)
    # a missing shard
    for p in paths[:2]:
        shutil.copy(p, d)
    with pytest.raises(ValueError, match=r"split set incomplete, shard .*-00003-of-00003.gguf is missing"):
        load_model(os.path.join(d, os.path.basename(paths[0])))
    # a shard of another set in its place: its split keys disagree with its name
    other = write_model(os.path.join(d, "other.gguf"), MICRO, n_shards=2)
    shutil.copy(other[1], os.path.join(d, os.path.basename(paths[2])))
    with pytest.raises(ValueError, match=r"split keys say shard 1 of 2, but the file name says shard 2 of 3"):
        load_model(os.path.join(d, os.path.basename(paths[0])))
    # a later shard whose split.tensors.count disagrees with the set (only the first shard's was checked)
    shard3 = os.path.join(d, os.path.basename(paths[2]))
    rewrite(paths[2], shard3, kv=set_kv("split.tensors.count", ValueType.INT32, 999))
    with pytest.raises(
        ValueError, match=r"-00003-of-00003.gguf: split.tensors.count says 999 tensors, the shards hold"
    ):
        load_model(os.path.join(d, os.path.basename(paths[0])))
    rewrite(paths[2], shard3, kv=set_kv("split.tensors.count", ValueType.STRING, "178"))
    with pytest.raises(ValueError, match=r"key 'split.tensors.count' has type string, expected an integer"):
        load_model(os.path.join(d, os.path.basename(paths[0])))
    shutil.copy(paths[2], shard3)
    with load_model(os.path.join(d, os.path.basename(paths[0]))) as m:
        assert len(m.tensors) == 178
    # a shard renamed to a plain name
    plain = os.path.join(d, "plain.gguf")
    shutil.copy(paths[1], plain)
    with pytest.raises(ValueError, match="this file is shard 1 of a 3-file split set"):
        load_model(plain)
    # an impossible shard name
    with pytest.raises(ValueError, match="impossible"):
        load_model(os.path.join(d, "x-00004-of-00003.gguf"))


def test_tokenizer_library_failures_are_value_errors(micro_path: str) -> None:
    """Should a vocabulary the tokenizer library cannot build get past the loader, Llama still gets a ValueError
    (the library raises Exception, or panics with a BaseException, for a merge of unknown tokens)."""
    import dataclasses

    from llama_dsv4.tokenizer import DSV4Tokenizer, TokenizerError

    with load_model(micro_path) as m:
        vocab = m.vocab
    assert vocab is not None
    for bad in ("zzzq Ġ", "q z"):
        broken = dataclasses.replace(vocab, merges=(bad, *vocab.merges[1:]))
        with pytest.raises(TokenizerError, match="does not make a BPE tokenizer"):
            DSV4Tokenizer(broken)


def test_failed_load_leaves_nothing_open(cases: dict[str, tuple[str, str]]) -> None:
    """A rejected file's mappings are closed: the file can be removed and replaced at once."""
    path, _ = cases["tid2eid out of range"]
    with pytest.raises(ValueError):
        load_model(path)
    os.remove(path)


# ---------------------------------------------------------------------------------------------- the file changing
# A loaded model's file rewritten or truncated by another process. Run in a child: the failures this guards against
# are signals (SIGSEGV from an expert id read from the shared mapping after validation, SIGBUS from a mapped page
# past the end of a truncated file), not exceptions.

CHANGE_SCRIPT = r"""
import itertools, sys
import numpy as np
from llama_dsv4 import Llama

path, change, use_mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
llm = Llama(path, n_ctx=64, n_threads=1, verbose=False, use_mmap=use_mmap)
tensors = llm._model.tensors

def greedy():
    llm.reset()
    return list(itertools.islice(llm.generate([5, 17, 42, 99, 300], temp=0.0), 8))

before = greedy()
with open(path, "r+b") as f:
    if change == "tid2eid":  # every hash layer's expert ids out of range, in place
        for name, t in tensors.items():
            if name.endswith("tid2eid.weight"):
                f.seek(t.offset)
                f.write(np.full(t.nbytes // 4, 1 << 30, np.int32).tobytes())
    elif change == "overwrite":  # every weight byte replaced, in place
        for t in tensors.values():
            f.seek(t.offset)
            f.write(np.full(t.nbytes, 0x7F, np.uint8).tobytes())
    elif change == "truncate":  # only the header is left
        f.truncate(min(t.offset for t in tensors.values()))
    f.flush()  # the page cache, which the mapping shares: visible at once, no fsync needed
after = greedy()
print(before, after)
sys.exit(0 if before == after else 3)
"""


def _change_file_under_model(micro_path: str, tmp: str, change: str, use_mmap: bool) -> subprocess.CompletedProcess:
    path = os.path.join(tmp, f"{change}-{int(use_mmap)}.gguf")
    shutil.copy(micro_path, path)
    cmd = [sys.executable, "-c", CHANGE_SCRIPT, path, change, "1" if use_mmap else "0"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_rewriting_tid2eid_after_load_cannot_reach_the_engine(micro_path: str, tmp_path: os.PathLike[str]) -> None:
    """tid2eid is validated once and used as expert indices: with the file mapped, the engine still reads the
    validated copy (was SIGSEGV: expert ids read from the mapping after validation). use_mmap=False: below."""
    r = _change_file_under_model(micro_path, str(tmp_path), "tid2eid", True)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])


def test_use_mmap_false_survives_truncation_and_overwrite(micro_path: str, tmp_path: os.PathLike[str]) -> None:
    """use_mmap=False reads the weights into memory the process owns: the file may then change or vanish (was
    SIGBUS: the parameter was accepted and ignored). The overwrite also puts tid2eid out of range."""
    for change in ("truncate", "overwrite"):
        r = _change_file_under_model(micro_path, str(tmp_path), change, False)
        assert r.returncode == 0, (change, r.returncode, r.stdout, r.stderr[-2000:])
    # the contract of the default (as llama.cpp's): a mapped file truncated under the model is a SIGBUS
    r = _change_file_under_model(micro_path, str(tmp_path), "truncate", True)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------- a window beyond n_ctx


def test_a_window_beyond_n_ctx_costs_what_n_ctx_does(model_dir: str) -> None:
    """sliding_window = 2**20, the largest a file may state (with a 1M-token context): a context of n_ctx positions
    computes the same logits as with a window of n_ctx and holds the same state, a ring of n_ctx rows (was: 2**20 +
    n_ubatch - 1 rows per layer, 128 MiB per layer for this small model, scanned by every decoded token)."""
    from llama_dsv4.engine.context import Context

    from llama_dsv4 import _ggml
    from llama_dsv4.engine.memory import state_bytes

    n_ctx = 48
    toks = np.random.default_rng(7).integers(0, 512, n_ctx)
    backends = _ggml.Backends("cpu", 1)
    runs = []
    for window in (1 << 20, n_ctx):
        params = MICRO.with_(n_ctx_train=1 << 20, sliding_window=window)
        path = write_model(os.path.join(model_dir, f"micro-window{window}.gguf"), params)[0]
        with load_model(path) as m:
            ctx = Context(m, n_ctx, n_ubatch=16, backends=backends)
            logits = [ctx.eval(toks[:32], all_logits=True)] + [ctx.eval(toks[i : i + 1]) for i in range(32, n_ctx)]
            runs.append((np.concatenate(logits), ctx.ring, ctx.state_bytes, state_bytes(m.params, n_ctx, 16)))
            del ctx
    (huge, ring_h, bytes_h, layout_h), (same, ring_s, bytes_s, layout_s) = runs
    np.testing.assert_array_equal(huge, same)
    assert ring_h == ring_s == n_ctx
    assert bytes_h == bytes_s and layout_h == layout_s


def test_use_mmap_false_file_truncated_before_the_weights_are_read(micro_path: str, tmp_path: os.PathLike[str]) -> None:
    """Without a mapping, a file that shrinks after validation is a ValueError naming the tensor, not a signal."""
    path = os.path.join(str(tmp_path), "shrinks.gguf")
    shutil.copy(micro_path, path)
    with load_model(path, use_mmap=False) as m:
        os.truncate(path, m.tensors["output.weight"].offset)
        where = r"shrinks.gguf: tensor 'output.weight': "
        with pytest.raises(ValueError, match=where + r"data \[\d+, \d+\) lies outside its file"):
            m.weights()
        with pytest.raises(ValueError, match=where + "the file ended before its data"):
            m.array("output.weight")
