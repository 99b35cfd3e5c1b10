"""A structure-aware fuzzer for deepseek4 GGUF files, run in worker processes that a crash or a hang cannot take
down with it (issue 9).

Seeds are tiny valid models written by our own writer (one file, a 3-shard split set, a quantized file, a file
without a vocabulary and with an MTP layer). Each case is derived from (master seed, case index) alone: the seed
file(s) and a short stack of mutations, both generic (bit flips, interesting byte values, truncation, insertion,
deletion) and aimed at the container's fields, which the mutator locates by walking the seed's header (string
lengths, value types, array counts, tensor counts, n_dims, dims, ggml types, offsets, alignment, key values,
split keys, shard files dropped, swapped or taken from another set, tensor data poisoned with NaN/inf and
out-of-range ids). A mutated case goes through `load_model` and, when that accepts it, through `Llama(...)` and one
decode step (tokenize, eval, a one-token completion, sometimes a one-token chat completion).

Outcomes: `ok` (loaded and decoded), `rejected` (a ValueError with a message; at load it must name the file),
and the findings: `error` (any other exception, or a ValueError without a message), `crash` (the worker died:
a signal or an abort), `hang` (no answer within the timeout). Workers process many cases each and announce every
case before running it, so a dead or stuck worker points at its case; a crash is retried alone in a fresh worker
to tell whether it reproduces by itself. Each finding's input is saved with a case.json that describes it.

    python tests/gguf_fuzz.py --replay MASTER INDEX     # regenerate one case and run it in this process
    python tests/gguf_fuzz.py --run-file PATH           # run one (saved) file as a worker would
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llama_dsv4.model.gguf_format import SCALAR_SIZE, ValueType

# ---------------------------------------------------------------------------------------------- seeds


def _seed_specs() -> dict[str, dict[str, Any]]:
    from llama_dsv4.model.params import DSV4Params

    nano = DSV4Params(
        n_embd=16,
        n_head=2,
        head_dim=16,
        rope_dim=8,
        q_lora_rank=8,
        o_group_count=2,
        o_lora_rank=8,
        indexer_n_head=1,
        indexer_head_dim=16,
        n_expert=4,
        n_expert_used=2,
        expert_ff=16,
        n_layer=3,
        compress_ratios=(0, 4, 128),
        hash_layer_count=1,
        sliding_window=8,
    )
    # Q8_0 and Q5_K need rows that are multiples of 32 and 256
    quant = nano.with_(
        n_embd=256, head_dim=32, q_lora_rank=32, o_group_count=1, o_lora_rank=32, n_expert=2, n_expert_used=1,
        expert_ff=256,
    )  # fmt: skip
    mtp = nano.with_(n_nextn=1, compress_ratios=(0, 4, 128, 0), swiglu_clamp_exp=1.0, swiglu_clamp_shexp=1.5)
    return {
        "f32": dict(params=nano, dtype="f32", vocab="small", n_shards=1),
        "split3": dict(params=nano, dtype="f16", vocab="small", n_shards=3),
        "q8xq5": dict(params=quant, dtype="q8xq5", vocab="small", n_shards=1),
        "novocab-mtp": dict(params=mtp, dtype="f16", vocab="none", n_shards=1, chat_template=None, o3d=True),
        "split2-other": dict(params=nano, dtype="f32", vocab="small", n_shards=2, seed=1),
    }


# how often each seed is the base of a case (split2-other only donates foreign shards, and is fuzzed rarely)
SEED_WEIGHTS = {"f32": 40, "split3": 30, "q8xq5": 12, "novocab-mtp": 15, "split2-other": 3}


def write_seeds(directory: str) -> None:
    """Write the seed models into `directory` (one sub-directory per seed)."""
    from llama_dsv4.model.vocab import small_vocab
    from llama_dsv4.model.writer import write_model

    vocab = small_vocab(300)
    for name, s in _seed_specs().items():
        d = os.path.join(directory, name)
        os.makedirs(d, exist_ok=True)
        write_model(
            os.path.join(d, "m.gguf"),
            s["params"],
            dtype=s["dtype"],
            vocab=vocab if s["vocab"] == "small" else s["vocab"],
            n_shards=s["n_shards"],
            chat_template=s.get("chat_template", "default"),
            attn_output_a_3d=s.get("o3d", False),
            seed=s.get("seed", 0),
        )


@dataclass(frozen=True)
class Field:
    kind: str
    pos: int
    size: int
    key: str = ""  # the key or tensor it belongs to
    vtype: int = -1  # value type of scalars / array elements


@dataclass
class Layout:
    fields: list[Field]
    strings: list[Field]  # string payloads (keys, values, array entries, tensor names)
    kv_end: int  # where the tensor infos start
    tensor_records: list[tuple[int, int, str]]  # (start, end, name) of each tensor info
    header_end: int
    data: list[tuple[str, int, int, int]]  # (tensor name, ggml type, absolute offset, nbytes)
    size: int


def parse_layout(b: bytes) -> Layout:
    """Locate every field of a (valid) GGUF file written by our writer."""
    fields = [Field("magic", 0, 4), Field("version", 4, 4), Field("n_tensors", 8, 8), Field("n_kv", 16, 8)]
    strings: list[Field] = []
    n_t, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24

    def u32(p: int) -> int:
        return struct.unpack_from("<I", b, p)[0]

    def u64(p: int) -> int:
        return struct.unpack_from("<Q", b, p)[0]

    alignment = 32
    for _ in range(n_kv):
        n = u64(pos)
        key = b[pos + 8 : pos + 8 + n].decode()
        fields.append(Field("key_len", pos, 8, key))
        strings.append(Field("key", pos + 8, n, key))
        pos += 8 + n
        vt = u32(pos)
        fields.append(Field("vtype", pos, 4, key))
        pos += 4
        if vt == ValueType.STRING:
            n = u64(pos)
            fields.append(Field("str_len", pos, 8, key))
            strings.append(Field("str", pos + 8, n, key))
            pos += 8 + n
        elif vt == ValueType.ARRAY:
            et, cnt = u32(pos), u64(pos + 4)
            fields.append(Field("arr_type", pos, 4, key))
            fields.append(Field("arr_count", pos + 4, 8, key))
            pos += 12
            if et == ValueType.STRING:
                for _ in range(cnt):
                    n = u64(pos)
                    fields.append(Field("arr_str_len", pos, 8, key))
                    strings.append(Field("arr_str", pos + 8, n, key))
                    pos += 8 + n
            else:
                esz = SCALAR_SIZE[ValueType(et)]
                fields.append(Field("arr_elems", pos, esz * cnt, key, et))
                pos += esz * cnt
        else:
            sz = SCALAR_SIZE[ValueType(vt)]
            fields.append(Field("scalar", pos, sz, key, vt))
            if key == "general.alignment":
                alignment = u32(pos)
            pos += sz
    kv_end = pos
    records = []
    infos = []
    for _ in range(n_t):
        start = pos
        n = u64(pos)
        name = b[pos + 8 : pos + 8 + n].decode()
        fields.append(Field("name_len", pos, 8, name))
        strings.append(Field("name", pos + 8, n, name))
        pos += 8 + n
        nd = u32(pos)
        fields.append(Field("n_dims", pos, 4, name))
        pos += 4
        ne = []
        for _ in range(nd):
            fields.append(Field("dim", pos, 8, name))
            ne.append(u64(pos))
            pos += 8
        fields.append(Field("ttype", pos, 4, name))
        fields.append(Field("toffset", pos + 4, 8, name))
        infos.append((name, u32(pos), u64(pos + 4), ne))
        pos += 12
        records.append((start, pos, name))
    header_end = pos
    data_start = -(-pos // alignment) * alignment
    from llama_dsv4.model.gguf_read import type_sizes

    data = []
    for name, ttype, off, ne in infos:
        sizes = type_sizes(ttype)
        assert sizes is not None
        data.append((name, ttype, data_start + off, math.prod(ne) // sizes[1] * sizes[2]))
    return Layout(fields, strings, kv_end, records, header_end, data, len(b))


@dataclass
class Seed:
    name: str
    files: list[str]  # file names (a split set's shard names)
    blobs: list[bytes]
    layouts: list[Layout]

    @property
    def split(self) -> bool:
        return len(self.files) > 1


def load_seeds(directory: str) -> dict[str, Seed]:
    out = {}
    for name in _seed_specs():
        d = os.path.join(directory, name)
        files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        blobs = []
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                blobs.append(fh.read())
        out[name] = Seed(name, files, blobs, [parse_layout(b) for b in blobs])
    return out


# ---------------------------------------------------------------------------------------------- mutations

# An op is a tuple: ("set", shard, pos, bytes) | ("ins", shard, pos, bytes) | ("del", shard, pos, n) |
# ("trunc", shard, length) | ("drop", shard) | ("swap", a, b) | ("copy", src, dst) | ("foreign", shard, seed, k)
Op = tuple[Any, ...]

U64_EDGES = [
    0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 1 << 40, 1 << 48, 1 << 62, (1 << 63) - 1, 1 << 63,
    (1 << 64) - 1, (1 << 64) - 2, (1 << 64) - 32,
]  # fmt: skip
F32_EDGES = [
    math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1.0, 1e-45, 1e-38, 1e-30, 1e30, 3.4028235e38, -3.4028235e38,
    65504.0, 1e6, -1e6,
]  # fmt: skip


def _interesting(rng: random.Random, width: int, orig: int, size: int, pos: int) -> int:
    mask = (1 << (8 * width)) - 1
    cands = [
        *U64_EDGES,
        size,
        size + 1,
        size - pos,
        size * 2,
        orig + 1,
        orig - 1,
        orig * 2,
        orig // 2,
        orig + 32,
        orig - 32,
        orig + (1 << 32),
        orig | (1 << 63),
        orig ^ (1 << rng.randrange(8 * width)),
        rng.getrandbits(8 * width),
    ]
    return rng.choice(cands) & mask


def _read_uint(b: bytes, pos: int, width: int) -> int:
    return int.from_bytes(b[pos : pos + width], "little")


def _pack_uint(v: int, width: int) -> bytes:
    return (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _typed_value(rng: random.Random, vt: int, orig: bytes) -> bytes:
    """An interesting value of GGUF value type `vt` (the original's bytes given)."""
    t = ValueType(vt)
    if t in (ValueType.FLOAT32, ValueType.FLOAT64):
        o = struct.unpack("<f" if t == ValueType.FLOAT32 else "<d", orig)[0]
        v = rng.choice([*F32_EDGES, o * 2, -o, o / 1024])
        with contextlib.suppress(OverflowError):
            return struct.pack("<f" if t == ValueType.FLOAT32 else "<d", v)
        return struct.pack("<f" if t == ValueType.FLOAT32 else "<d", math.inf)
    if t == ValueType.BOOL:
        return bytes([rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF])])
    width = SCALAR_SIZE[t]
    o = int.from_bytes(orig, "little", signed=t in (ValueType.INT8, ValueType.INT16, ValueType.INT32, ValueType.INT64))
    small = [0, 1, 2, 3, 4, 5, 6, 8, 16, 63, 64, 127, 128, 255, 256, 512, 4096, 65535, 65536, 1 << 20, 1 << 24]
    v = rng.choice([*small, *U64_EDGES, o + 1, o - 1, o * 2, o * 1000, -o, -1, -2, -(1 << 31)])
    return _pack_uint(v, width)


def _header_pos(rng: random.Random, lay: Layout) -> int:
    """A byte position, mostly in the header (where the structure is)."""
    if rng.random() < 0.85 or lay.size <= lay.header_end:
        return rng.randrange(lay.header_end)
    return rng.randrange(lay.size)


def _pick_shard(rng: random.Random, seed: Seed) -> int:
    if not seed.split:
        return 0
    return 0 if rng.random() < 0.5 else rng.randrange(len(seed.blobs))


FIELD_WEIGHTS = {
    "magic": 0.5, "version": 1, "n_tensors": 3, "n_kv": 3, "key_len": 4, "vtype": 5, "str_len": 5, "arr_type": 4,
    "arr_count": 5, "arr_str_len": 4, "name_len": 4, "n_dims": 5, "dim": 8, "ttype": 6, "toffset": 8,
}  # fmt: skip


def m_field(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """An interesting value in one length / count / type / dim / offset field of the header."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    kind = rng.choices(list(FIELD_WEIGHTS), list(FIELD_WEIGHTS.values()))[0]
    cands = [f for f in lay.fields if f.kind == kind]
    if not cands:
        return m_bitflip(rng, seed)
    f = rng.choice(cands)
    orig = _read_uint(b, f.pos, f.size)
    if kind in ("vtype", "arr_type") and rng.random() < 0.7:
        v = rng.choice([*range(14), 0xFFFFFFFF, 0x80000000, 13, 255])
    elif kind == "n_dims" and rng.random() < 0.7:
        v = rng.choice([0, 1, 2, 3, 4, 5, 8, 0xFFFFFFFF])
    elif kind == "ttype" and rng.random() < 0.7:
        v = rng.choice([*range(42), 0xFFFFFFFF, 1 << 31])
    elif kind == "toffset" and rng.random() < 0.5:
        others = [_read_uint(b, g.pos, 8) for g in lay.fields if g.kind == "toffset"]
        v = rng.choice(others) + rng.choice([0, 0, 32, -32, 1, 4096])
    elif kind == "dim" and rng.random() < 0.4:
        v = rng.choice([0, 1, orig + 1, orig * 2, orig * 256, 1 << 31, 1 << 32, (1 << 63) // max(orig, 1), 1 << 62])
    else:
        v = _interesting(rng, f.size, orig, lay.size, f.pos)
    return [("set", s, f.pos, _pack_uint(v, f.size))], f"{kind} of {f.key or 'header'} @{f.pos} in shard {s}: {v}"


def m_value(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """An interesting value for a key's scalar value or one element of a numeric array (split keys included)."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    cands = [f for f in lay.fields if f.kind in ("scalar", "arr_elems") and f.size]
    f = rng.choice(cands)
    if f.kind == "scalar":
        pos, width = f.pos, f.size
    else:
        width = SCALAR_SIZE[ValueType(f.vtype)]
        pos = f.pos + width * rng.randrange(f.size // width)
    val = _typed_value(rng, f.vtype, b[pos : pos + width])
    ops: list[Op] = [("set", s, pos, val)]
    if f.kind == "arr_elems" and rng.random() < 0.2:  # the whole array
        ops = [("set", s, f.pos, val * (f.size // width))]
    return ops, f"value of {f.key} @{pos} in shard {s}: {val.hex()}{' (all)' if len(ops[0][3]) > width else ''}"


def m_string(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """Corrupt a string's bytes (same length): invalid UTF-8, NUL, spaces, or another string's bytes."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    cands = [f for f in lay.strings if f.size]
    f = rng.choice(cands)
    choice = rng.randrange(5)
    if choice == 0:
        junk = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
    elif choice == 1:
        junk = rng.choice([b"\0", b" ", b"  ", b"{{", b"{%", b"}}", b"%}", b"'", b"\n"])
    elif choice == 2:  # another string of the same length (duplicate tokens, keys or names)
        same = [g for g in lay.strings if g.size == f.size and g.pos != f.pos]
        if not same:
            return m_bitflip(rng, seed)
        g = rng.choice(same)
        return [("set", s, f.pos, b[g.pos : g.pos + g.size])], f"{f.kind} {f.key!r} @{f.pos} := copy of {g.key!r}"
    elif choice == 3:
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4)))
    else:
        junk = bytes([rng.choice(b"abcdefghijklmnopqrstuvwxyz._0123456789")]) * rng.randint(1, 3)
    at = f.pos + rng.randrange(f.size)
    junk = junk[: f.pos + f.size - at]
    return [("set", s, at, junk)], f"{f.kind} of {f.key!r} @{at}: {junk!r}"


def m_bitflip(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    ops: list[Op] = []
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        p = _header_pos(rng, lay)
        ops.append(("set", s, p, bytes([b[p] ^ (1 << rng.randrange(8))])))
    return ops, f"{len(ops)} bit flip(s) in shard {s} at {[o[2] for o in ops]}"


def m_bytes(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """An interesting 1/2/4/8-byte value at a random position."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    width = rng.choice([1, 2, 4, 8])
    p = _header_pos(rng, lay)
    v = _interesting(rng, width, _read_uint(b, p, width), lay.size, p)
    return [("set", s, p, _pack_uint(v, width))], f"{width}-byte value {v:#x} at {p} in shard {s}"


def m_truncate(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    s = _pick_shard(rng, seed)
    lay = seed.layouts[s]
    n = rng.choice(
        [
            rng.randrange(25),
            rng.randrange(lay.header_end + 64),
            rng.randrange(lay.header_end, lay.size),
            lay.size - 1,
            lay.size - rng.randint(1, 4096),
            rng.choice([f.pos for f in lay.fields]),
        ]
    )
    n = max(0, min(n, lay.size - 1))
    return [("trunc", s, n)], f"shard {s} truncated to {n} of {lay.size} bytes"


def m_insdel(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    p = _header_pos(rng, lay)
    if rng.random() < 0.5:
        n = rng.choice([1, 2, 4, 7, 8, 12, 32, 64, 1000])
        kind = rng.randrange(3)
        if kind == 0:
            data = bytes(n)
        elif kind == 1:
            data = bytes(rng.getrandbits(8) for _ in range(n))
        else:
            q = rng.randrange(max(1, lay.header_end - n))
            data = b[q : q + n]
        return [("ins", s, p, data)], f"{n} bytes inserted at {p} in shard {s}"
    n = rng.choice([1, 2, 4, 7, 8, 12, 32, 64, 1000])
    return [("del", s, p, n)], f"{n} bytes deleted at {p} in shard {s}"


def _pack_kv(key: str, vt: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vt) + payload


def m_kv_insert(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """New key/value pairs after the last one (n_kv raised), padded to a multiple of 32 bytes so that a file stays
    valid apart from what the new keys say: alignment, duplicate and split keys, extra templates, odd types."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    keys = sorted({f.key for f in lay.fields if f.kind == "key_len"})
    choice = rng.randrange(8)
    if choice == 0:
        v = rng.choice([0, 1, 2, 3, 16, 24, 64, 4096, 1 << 20, 1 << 21, 0xFFFFFFFF, 0x80000000])
        kvs = [_pack_kv("general.alignment", ValueType.UINT32, struct.pack("<I", v))]
        what = f"general.alignment = {v}"
    elif choice == 1:
        kvs = [_pack_kv("general.alignment", ValueType.UINT64, struct.pack("<Q", 32))]
        what = "general.alignment as u64"
    elif choice == 2:  # a duplicate key with another value
        k = rng.choice(keys)
        kvs = [_pack_kv(k, ValueType.UINT32, struct.pack("<I", rng.choice([0, 1, 4, 0xFFFFFFFF])))]
        what = f"duplicate key {k!r}"
    elif choice == 3:  # split keys where there should be none, or disagreeing ones
        no, cnt = rng.choice([(0, 2), (1, 1), (0, 0), (5, 3), (0, 0xFFFF)])
        kvs = [
            _pack_kv("split.no", ValueType.UINT16, struct.pack("<H", no)),
            _pack_kv("split.count", ValueType.UINT16, struct.pack("<H", cnt)),
        ]
        what = f"split.no={no} split.count={cnt}"
    elif choice == 4:  # an extra named chat template
        src = rng.choice(["{{ messages[0].content }}", "{% for m in messages %}{{ m.content }}{% endfor %}", "{{", ""])
        kvs = [
            _pack_kv("tokenizer.chat_template.tool_use", ValueType.STRING, struct.pack("<Q", len(src)) + src.encode())
        ]
        what = f"extra template {src!r}"
    elif choice == 5:  # a key with an array of arrays / strings of odd lengths
        kvs = [
            _pack_kv("fuzz.nested", ValueType.ARRAY, struct.pack("<IQ", ValueType.ARRAY, 1) + struct.pack("<IQ", 4, 0))
        ]
        what = "nested array"
    elif choice == 6:  # an empty key
        kvs = [_pack_kv("", ValueType.UINT8, b"\x01")]
        what = "empty key"
    else:  # a huge declared string array with few bytes behind it
        kvs = [_pack_kv("fuzz.strings", ValueType.ARRAY, struct.pack("<IQ", ValueType.STRING, 1 << 40))]
        what = "string array claiming 2^40 entries"
    block = b"".join(kvs)
    filler_fixed = len(_pack_kv("fuzz.pad", ValueType.STRING, struct.pack("<Q", 0)))
    pad = (-(len(block) + filler_fixed)) % 32
    block += _pack_kv("fuzz.pad", ValueType.STRING, struct.pack("<Q", pad) + b"p" * pad)
    n_kv = _read_uint(b, 16, 8) + len(kvs) + 1
    ops: list[Op] = [("set", s, 16, _pack_uint(n_kv, 8)), ("ins", s, lay.kv_end, block)]
    return ops, f"inserted keys in shard {s}: {what}"


def m_tensor_record(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """Drop or duplicate a tensor info (n_tensors adjusted), or swap a field between two tensor infos."""
    s = _pick_shard(rng, seed)
    lay, b = seed.layouts[s], seed.blobs[s]
    if not lay.tensor_records:
        return m_bitflip(rng, seed)
    start, end, name = rng.choice(lay.tensor_records)
    n_t = _read_uint(b, 8, 8)
    choice = rng.randrange(3)
    if choice == 0:
        return [("set", s, 8, _pack_uint(n_t - 1, 8)), ("del", s, start, end - start)], f"tensor info {name!r} dropped"
    if choice == 1:
        return [("set", s, 8, _pack_uint(n_t + 1, 8)), ("ins", s, end, b[start:end])], f"tensor info {name!r} doubled"
    kind = rng.choice(["dim", "ttype", "toffset", "n_dims"])
    fs = [f for f in lay.fields if f.kind == kind]
    f, g = rng.sample(fs, 2)
    return (
        [("set", s, f.pos, b[g.pos : g.pos + g.size]), ("set", s, g.pos, b[f.pos : f.pos + f.size])],
        f"{kind} of {f.key!r} and {g.key!r} swapped",
    )


_POISON_F32 = [math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e30, 0.0]


def m_data(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """Poison a tensor's data: NaN/inf/huge floats (all of it or a few values), garbage bytes, bad expert ids."""
    s = _pick_shard(rng, seed)
    lay = seed.layouts[s]
    if not lay.data:
        return m_bitflip(rng, seed)
    name, ttype, off, nbytes = rng.choice(lay.data)
    if ttype == 26:  # I32 (tid2eid): expert ids out of range
        v = rng.choice([-1, 4, 8, 1 << 30, -(1 << 31), 0x7FFFFFFF, 2, 3])
        n = nbytes // 4 if rng.random() < 0.3 else 1
        at = off + 4 * rng.randrange(nbytes // 4 - n + 1)
        return [("set", s, at, struct.pack("<i", v) * n)], f"tid2eid {name!r}: {n} id(s) = {v}"
    if ttype == 0:
        v = rng.choice(_POISON_F32)
        n = nbytes // 4 if rng.random() < 0.5 else min(rng.randint(1, 8), nbytes // 4)
        at = off + 4 * rng.randrange(nbytes // 4 - n + 1)
        return [("set", s, at, struct.pack("<f", v) * n)], f"{n} value(s) of {name!r} = {v}"
    if ttype == 1:
        v = rng.choice([0x7E00, 0x7C00, 0xFC00, 0x7BFF])  # NaN, inf, -inf, max
        n = nbytes // 2 if rng.random() < 0.5 else min(rng.randint(1, 8), nbytes // 2)
        at = off + 2 * rng.randrange(nbytes // 2 - n + 1)
        return [("set", s, at, struct.pack("<H", v) * n)], f"{n} f16 value(s) of {name!r} = {v:#x}"
    n = rng.choice([1, 2, 16, 256])  # quantized blocks: garbage (scales become NaN/inf/huge)
    at = off + rng.randrange(max(1, nbytes - n))
    data = bytes(rng.choice([0xFF, 0x7C, 0x7E, 0x00, rng.getrandbits(8)]) for _ in range(n))
    return [("set", s, at, data)], f"{n} byte(s) of quantized {name!r} at {at}"


def m_shards(rng: random.Random, seed: Seed) -> tuple[list[Op], str]:
    """Split sets: a shard missing, two swapped, one copied over another, one from another set, or truncated."""
    if not seed.split:
        return m_field(rng, seed)
    n = len(seed.blobs)
    a, b = rng.sample(range(n), 2)
    choice = rng.randrange(5)
    if choice == 0:
        return [("drop", a)], f"shard {a} missing"
    if choice == 1:
        return [("swap", a, b)], f"shards {a} and {b} swapped"
    if choice == 2:
        return [("copy", a, b)], f"shard {a} copied over shard {b}"
    if choice == 3:
        donor = "split2-other" if seed.name != "split2-other" else "split3"
        k = rng.randrange(2)
        return [("foreign", a, donor, k)], f"shard {a} replaced by shard {k} of {donor}"
    lay = seed.layouts[a]
    cut = rng.randrange(lay.size)
    return [("trunc", a, cut)], f"shard {a} truncated to {cut}"


STRATEGIES: list[tuple[Callable[[random.Random, Seed], tuple[list[Op], str]], float]] = [
    (m_field, 30),
    (m_value, 14),
    (m_string, 7),
    (m_bitflip, 8),
    (m_bytes, 6),
    (m_truncate, 5),
    (m_insdel, 6),
    (m_kv_insert, 6),
    (m_tensor_record, 5),
    (m_data, 8),
    (m_shards, 5),
]


@dataclass
class Case:
    master: int
    index: int
    seed: str
    ops: list[Op]
    open_shard: int
    description: str

    def to_json(self) -> dict[str, Any]:
        ops = [[x.hex() if isinstance(x, (bytes, bytearray)) else x for x in op] for op in self.ops]
        return {
            "master": self.master,
            "index": self.index,
            "seed": self.seed,
            "open_shard": self.open_shard,
            "description": self.description,
            "ops": ops,
        }


def gen_case(seeds: dict[str, Seed], master: int, index: int) -> Case:
    rng = random.Random(f"gguf-fuzz/{master}/{index}")
    name = rng.choices(list(SEED_WEIGHTS), list(SEED_WEIGHTS.values()))[0]
    seed = seeds[name]
    ops: list[Op] = []
    descs = []
    n = rng.choices([1, 2, 3, 4], [60, 25, 10, 5])[0]
    while len(descs) < n:
        fn = rng.choices([f for f, _ in STRATEGIES], [w for _, w in STRATEGIES])[0]
        o, d = fn(rng, seed)
        if all(op[0] == "set" and seed.blobs[op[1]][op[2] : op[2] + len(op[3])] == op[3] for op in o):
            continue  # writes what is there already: draw again
        ops += o
        descs.append(d)
    open_shard = rng.randrange(len(seed.files)) if seed.split else 0
    return Case(master, index, name, ops, open_shard, "; ".join(descs))


def apply_ops(seeds: dict[str, Seed], case: Case) -> list[bytes | None]:
    """The case's file contents, one per shard (None: the shard is missing)."""
    blobs: list[bytearray | None] = [bytearray(x) for x in seeds[case.seed].blobs]
    for op in case.ops:
        kind = op[0]
        if kind in ("set", "ins", "del", "trunc"):
            buf = blobs[op[1]]
            if buf is None:
                continue
            if kind == "set":
                pos, data = op[2], op[3]
                if pos < len(buf):
                    data = data[: len(buf) - pos]
                    buf[pos : pos + len(data)] = data
            elif kind == "ins":
                buf[op[2] : op[2]] = op[3]
            elif kind == "del":
                del buf[op[2] : op[2] + op[3]]
            else:
                del buf[op[2] :]
        elif kind == "drop":
            blobs[op[1]] = None
        elif kind == "swap":
            blobs[op[1]], blobs[op[2]] = blobs[op[2]], blobs[op[1]]
        elif kind == "copy":
            src = blobs[op[1]]
            blobs[op[2]] = None if src is None else bytearray(src)
        elif kind == "foreign":
            donor = seeds[op[2]].blobs
            blobs[op[1]] = bytearray(donor[op[3] % len(donor)])
    return [None if x is None else bytes(x) for x in blobs]


def write_case(seeds: dict[str, Seed], case: Case, directory: str) -> str:
    """Write the case's files into `directory`; returns the path to open."""
    seed = seeds[case.seed]
    for name, data in zip(seed.files, apply_ops(seeds, case), strict=True):
        if data is not None:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    return os.path.join(directory, seed.files[case.open_shard])


# ---------------------------------------------------------------------------------------------- one input


def _rejection(stage: str, e: ValueError, path: str) -> tuple[str, str]:
    msg = str(e).strip()
    if not msg:
        return "error", f"{stage}: {type(e).__name__} without a message"
    if stage == "load" and os.path.basename(path) not in msg and os.path.dirname(path) not in msg:
        return "error", f"{stage}: the message does not name the file: {msg[:300]}"
    return "rejected", f"{stage}: {type(e).__name__}: {msg[:300]}"


def _error(stage: str, e: BaseException) -> tuple[str, str]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    return "error", f"{stage}: {type(e).__name__}: {str(e)[:300]}\n{tb}"


def run_file(path: str, chat: bool = False, n_ctx: int = 64) -> tuple[str, str]:
    """Load `path` and, if that succeeds, decode one step with Llama (n_ctx 0: the model's training context).
    Returns (outcome, detail)."""
    from llama_dsv4 import Llama
    from llama_dsv4.model.loader import load_model

    try:
        m = load_model(path)
    except ValueError as e:
        return _rejection("load", e, path)
    except Exception as e:
        return _error("load", e)
    try:
        m.close()
    except Exception as e:
        return _error("close", e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            llm = Llama(path, n_ctx=n_ctx, n_batch=64, n_ubatch=64, n_threads=1, n_threads_batch=1, verbose=False)
        except ValueError as e:
            return _rejection("init", e, path)
        except Exception as e:
            return _error("init", e)
        stage = "decode"
        try:
            n_vocab = llm.n_vocab()
            if llm._vocab is not None:
                stage = "tokenize"
                toks = llm.tokenize("Hello, world! 12 \u4e2d\u6587 <｜User｜>".encode(), special=True)
                llm.detokenize(toks, special=True)
                toks = [t for t in toks if 0 <= t < n_vocab][:16] or [0]
            else:
                toks = [1, 2, 3]
            stage = "eval"
            llm.eval(toks)
            if llm._vocab is None:  # no text without a vocabulary: sample a token id
                stage = "sample"
                tok = llm.sample(temp=0.0)
                if not 0 <= tok < n_vocab:
                    return "error", f"sampled token {tok} outside [0, {n_vocab})"
            else:
                stage = "completion"
                out = llm.create_completion(toks, max_tokens=2, temperature=0)
                if not isinstance(out["choices"][0]["text"], str):
                    return "error", "completion text is not a string"
            if chat and llm._vocab is not None:
                stage = "chat"
                llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, temperature=0)
        except ValueError as e:
            return _rejection(stage, e, path)
        except Exception as e:
            return _error(stage, e)
        finally:
            llm.close()
    return "ok", ""


# ---------------------------------------------------------------------------------------------- worker


def _limit_resources(mem_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, hard))


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _canary() -> dict[int, str]:
    """LLAMA_DSV4_FUZZ_CANARY="crash=3,flaky=6,hang=9,error=12": cases on which a worker aborts, aborts unless it
    is the worker's first case, sleeps, or reports an error (to test that the driver catches each)."""
    out = {}
    for item in filter(None, os.environ.get("LLAMA_DSV4_FUZZ_CANARY", "").split(",")):
        what, _, index = item.partition("=")
        out[int(index)] = what
    return out


def worker_main(seed_dir: str, work_dir: str, master: int, mem_bytes: int) -> None:
    """Read case indices from stdin, answer `B index` before and `R index outcome detail-json` after each."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray output (ggml, prints) goes to stderr, never into the protocol
    _limit_resources(mem_bytes)
    seeds = load_seeds(seed_dir)
    os.makedirs(work_dir, exist_ok=True)
    # warm up (imports, first graph) on an unmodified seed, so that a case's time is its own
    warm = Case(master, -1, "f32", [], 0, "warm-up")
    path = write_case(seeds, warm, work_dir)
    outcome, detail = run_file(path, chat=True)
    if outcome != "ok":
        print(f"W warm-up failed: {outcome} {detail}", file=proto)
        return
    os.remove(path)
    print("READY", file=proto)
    canary = _canary()
    done = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        index = int(line)
        try:
            case = gen_case(seeds, master, index)
            for f in os.listdir(work_dir):
                os.remove(os.path.join(work_dir, f))
            path = write_case(seeds, case, work_dir)
        except Exception:  # the fuzzer's own bug: stop the run, this is no finding
            print(f"X {index} {json.dumps(traceback.format_exc())}", file=proto)
            return
        print(f"B {index}", file=proto)
        fds = _open_fds()
        done += 1
        if index in canary:  # the harness's own test: misbehave on purpose
            what = canary[index]
            if what == "crash" or (what == "flaky" and done > 1):
                os.abort()
            if what == "hang":
                time.sleep(3600)
            if what == "error":
                print(f"R {index} error {json.dumps('canary error')}", file=proto)
                continue
        try:
            outcome, detail = run_file(path, chat=index % 4 == 0, n_ctx=0 if index % 8 == 1 else 64)
        except BaseException as e:  # a fuzz worker reports everything
            outcome, detail = _error("run", e)
        if outcome == "rejected" and fds >= 0 and _open_fds() > fds:
            gc.collect()
            if _open_fds() > fds:
                outcome, detail = "error", f"file descriptors leaked by a rejected load ({detail})"
        print(f"R {index} {outcome} {json.dumps(detail)}", file=proto)


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class Finding:
    kind: str  # error | crash | hang
    index: int
    description: str
    detail: str
    saved: str = ""


@dataclass
class Report:
    master: int
    tried: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rejections: Counter = field(default_factory=Counter)  # message shapes
    findings: list[Finding] = field(default_factory=list)
    wall: float = 0.0
    restarts: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def summary(self) -> str:
        lines = [
            f"master seed {self.master}: {self.tried} inputs in {self.wall:.1f} s "
            f"({self.tried / max(self.wall, 1e-9):.0f}/s), worker restarts {self.restarts}",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"crashes {self.count('crash')}, hangs {self.count('hang')}, "
            f"non-ValueError or unclear rejections {self.count('error')}",
            f"distinct rejection messages: {len(self.rejections)}",
        ]
        for f in self.findings[:30]:
            lines.append(f"  {f.kind} #{f.index}: {f.description}\n    {f.detail.splitlines()[0] if f.detail else ''}")
            if f.saved:
                lines.append(f"    saved: {f.saved}")
        return "\n".join(lines)


def _shape(detail: str) -> str:
    """A rejection message without paths and numbers, to count distinct kinds of rejection."""
    import re

    msg = detail.split(": ", 2)[-1]
    msg = re.sub(r"/\S+", "<path>", msg)
    msg = re.sub(r"'[^']*'", "'…'", msg)
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    return msg[:80]


class _Worker:
    def __init__(self, seed_dir: str, work_root: str, master: int, wid: int, mem_bytes: int) -> None:
        self.work_dir = os.path.join(work_root, f"w{wid}-{time.monotonic_ns()}")
        self.err_path = self.work_dir + ".stderr"
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
        env.setdefault("LLAMA_DSV4_GGML_LOG", "error")
        here = os.path.dirname(os.path.abspath(__file__))
        env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                seed_dir,
                self.work_dir,
                str(master),
                str(mem_bytes),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.ready = False
        self.current: int | None = None  # the case in flight
        self.deadline = time.monotonic() + 300.0  # start-up (imports, seeds, warm-up) on a loaded machine
        self.history: list[int] = []
        self.tail: str | None = None  # stderr's end, kept when the worker is stopped

    def send(self, index: int, timeout: float) -> None:
        assert self.proc.stdin is not None
        self.current = index
        self.history.append(index)
        self.deadline = time.monotonic() + timeout
        self.proc.stdin.write(f"{index}\n".encode())
        self.proc.stdin.flush()

    def lines(self) -> tuple[list[str], bool]:
        """Complete lines available now, and whether the worker's output has ended."""
        assert self.proc.stdout is not None
        eof = False
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [x.decode(errors="replace") for x in done], eof

    def stderr_tail(self) -> str:
        if self.tail is not None:
            return self.tail
        self.err.flush()
        try:
            with open(self.err_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.err_path) - 2000))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=30)
        for s in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                s.close()  # type: ignore[union-attr]
        self.tail = self.stderr_tail()
        self.err.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(self.err_path)
        return self.proc.returncode


def save_case(seeds: dict[str, Seed], case: Case, out_dir: str, finding: Finding) -> str:
    d = os.path.join(out_dir, f"{finding.kind}-{case.master}-{case.index:07d}")
    os.makedirs(d, exist_ok=True)
    write_case(seeds, case, d)
    with open(os.path.join(d, "case.json"), "w") as f:
        json.dump({**case.to_json(), "kind": finding.kind, "detail": finding.detail}, f, indent=1)
    return os.path.join(d, seeds[case.seed].files[case.open_shard])


def run_fuzz(
    n_cases: int,
    *,
    master: int = 0,
    start: int = 0,
    n_workers: int = 2,
    timeout: float = 30.0,
    out_dir: str | None = None,
    seed_dir: str | None = None,
    time_budget: float | None = None,
    mem_bytes: int = 6 << 30,
    progress: Callable[[Report], None] | None = None,
    progress_every: float = 30.0,
) -> Report:
    """Run cases start..start+n_cases-1 of `master` through `n_workers` worker processes (stopping early when
    `time_budget` seconds have passed). Findings' inputs are saved under `out_dir`."""
    t0 = time.monotonic()
    report = Report(master)
    tmp = tempfile.mkdtemp(prefix="gguf-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        if seed_dir is None:
            seed_dir = os.path.join(tmp, "seeds")
            write_seeds(seed_dir)
        seeds = load_seeds(seed_dir)
        out_dir = out_dir or os.path.join(tmp, "findings")
        pending = list(range(start + n_cases - 1, start - 1, -1))  # a stack: pop() gives the lowest index
        retry: list[int] = []  # crashed cases to run again alone in a fresh worker
        retried: dict[int, Finding] = {}
        workers: list[_Worker | None] = [None] * n_workers
        sel = selectors.DefaultSelector()
        wid = 0
        last_progress = time.monotonic()

        def new_worker(slot: int) -> None:
            nonlocal wid
            wid += 1
            w = _Worker(seed_dir, tmp, master, wid, mem_bytes)
            workers[slot] = w
            assert w.proc.stdout is not None
            sel.register(w.proc.stdout, selectors.EVENT_READ, slot)

        def retire(slot: int) -> int | None:
            w = workers[slot]
            assert w is not None
            assert w.proc.stdout is not None
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(w.proc.stdout)
            workers[slot] = None
            return w.stop()

        def finding(kind: str, index: int, detail: str) -> None:
            case = gen_case(seeds, master, index)
            f = Finding(kind, index, f"[{case.seed}] {case.description}", detail)
            f.saved = save_case(seeds, case, out_dir, f)
            report.findings.append(f)

        def out_of_time() -> bool:
            return time_budget is not None and time.monotonic() - t0 > time_budget

        for slot in range(n_workers):
            new_worker(slot)
        while True:
            # hand out work
            for slot, w in enumerate(workers):
                if w is None:
                    if retry or (pending and not out_of_time()):
                        new_worker(slot)
                    continue
                if w.ready and w.current is None:
                    if retry and len(w.history) == 0:
                        w.send(retry.pop(), timeout)
                    elif pending and not out_of_time() and not retry:
                        w.send(pending.pop(), timeout)
                    elif retry:  # a crash retry needs a fresh worker
                        retire(slot)
            busy = [w for w in workers if w is not None and (w.current is not None or not w.ready)]
            if not busy:
                break
            wait = max(0.05, min(w.deadline for w in busy) - time.monotonic())
            sel.select(timeout=min(wait, 1.0))
            now = time.monotonic()
            for slot, w in enumerate(workers):
                if w is None:
                    continue
                lines, eof = w.lines()
                for line in lines:
                    if line == "READY":
                        w.ready = True
                    elif line.startswith("W "):
                        raise RuntimeError(f"fuzz worker cannot start: {line[2:]}\n{w.stderr_tail()}")
                    elif line.startswith("X "):
                        raise RuntimeError(f"the fuzzer failed to build case {line[2:]}")
                    elif line.startswith("R "):
                        _, idx_s, outcome, detail_json = line.split(" ", 3)
                        idx = int(idx_s)
                        detail = json.loads(detail_json)
                        w.current = None
                        if idx in retried:  # a crash that did not reproduce alone
                            f = retried.pop(idx)
                            f.detail += f"\nalone in a fresh worker it gave {outcome}: it needs the cases before it"
                            continue
                        report.tried += 1
                        report.outcomes[outcome] += 1
                        if outcome == "rejected":
                            report.rejections[_shape(detail)] += 1
                        elif outcome != "ok":
                            finding(outcome, idx, detail)
                if eof or w.proc.poll() is not None:
                    idx = w.current
                    rc = retire(slot)
                    if idx is None:
                        if not w.ready:
                            raise RuntimeError(f"fuzz worker exited at start-up ({rc}): {w.stderr_tail()}")
                        continue
                    tail = w.stderr_tail()
                    if idx in retried:
                        retried.pop(idx).detail += "\nreproduced alone in a fresh worker"
                        continue
                    report.tried += 1
                    report.outcomes["crash"] += 1
                    sig = f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
                    prior = w.history[-30:-1]
                    finding("crash", idx, f"worker died ({sig}); earlier cases in that worker: {prior}\n{tail[-1500:]}")
                    retried[idx] = report.findings[-1]
                    retry.append(idx)
                elif now > w.deadline:
                    idx = w.current
                    retire(slot)
                    if idx is None:
                        raise RuntimeError("fuzz worker did not start in time")
                    if idx in retried:
                        retried.pop(idx).detail += "\nalone in a fresh worker it hung"
                        continue
                    report.tried += 1
                    report.outcomes["hang"] += 1
                    finding("hang", idx, f"no answer in {timeout:.0f} s")
            if progress is not None and time.monotonic() - last_progress > progress_every:
                last_progress = time.monotonic()
                report.wall = time.monotonic() - t0
                progress(report)
        for slot in range(n_workers):
            if workers[slot] is not None:
                retire(slot)
        sel.close()
        report.restarts = wid - n_workers
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.wall = time.monotonic() - t0
    return report


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    if argv[:1] == ["--run-file"]:
        print(*run_file(argv[1], chat=True))
        return 0
    if argv[:1] == ["--replay"]:
        master, index = int(argv[1]), int(argv[2])
        with tempfile.TemporaryDirectory() as d:
            write_seeds(os.path.join(d, "seeds"))
            seeds = load_seeds(os.path.join(d, "seeds"))
            case = gen_case(seeds, master, index)
            print(f"[{case.seed}] {case.description}")
            os.makedirs(os.path.join(d, "case"))
            path = write_case(seeds, case, os.path.join(d, "case"))
            print(*run_file(path, chat=index % 4 == 0, n_ctx=0 if index % 8 == 1 else 64))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "Case",
    "Finding",
    "Report",
    "apply_ops",
    "gen_case",
    "load_seeds",
    "parse_layout",
    "run_file",
    "run_fuzz",
    "write_case",
    "write_seeds",
]
