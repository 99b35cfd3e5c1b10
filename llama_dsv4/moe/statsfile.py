"""The routing-statistics file: our versioned, checksummed format, and the seed fork's EST1 files.

Ours (little-endian):
    magic   8  b"DSV4MOE\\0"
    version u32 = 1
    n_layer, n_expert, n_used  u32 x 3
    fingerprint 32 bytes (sha256 of what decides routing: see fingerprint())
    tokens  u64   tokens counted, all writers together
    half_life f64
    lifetime  u64 [n_layer * n_expert], layer-major
    decayed   f64 [n_layer * n_expert]
    sha256 of everything above, 32 bytes

Written to a temporary file in the same directory, fsynced and renamed over the old one (a kill leaves either
the old file or the new one), under an exclusive lock on `<path>.lock`, merging what other processes added since
this one last read the file. Read fully and validated before anything live changes; any defect is a
`StatsFileError` (a ValueError) that the caller turns into a warning.

EST1 (the llama.cpp fork that introduced `--moe-hot-count`): u32 0x31545345, u32 n_layer, u32 n_expert, then
u64 counts layer-major, nothing else. Read as lifetime (and initial decayed) counts when the shape matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..model.loader import ModelFile

MAGIC = b"DSV4MOE\0"
VERSION = 1
_HEAD = struct.Struct("<8sIIII32sQd")
EST1_MAGIC = 0x31545345
_EST1_HEAD = struct.Struct("<III")
MAX_FILE_BYTES = 1 << 30  # far above any real model's statistics (43 x 256 experts: 176 KiB)


class StatsFileError(ValueError):
    """A statistics file that cannot be used (corrupt, truncated, foreign or another model's)."""

    def __init__(self, message: str, foreign: bool = False) -> None:
        super().__init__(message)
        self.foreign = foreign  # a whole, valid file of another model: never overwritten


@dataclass
class Stats:
    n_layer: int
    n_expert: int
    n_used: int
    fingerprint: bytes
    tokens: int
    half_life: float
    lifetime: np.ndarray  # u64 [n_layer, n_expert]
    decayed: np.ndarray  # f64 [n_layer, n_expert]


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def default_paths(model: ModelFile) -> tuple[str, str]:
    """(our file, the seed's EST1 file) in ~/.llama, named after general.name (else the architecture)."""
    name = str(model.metadata.get("general.name") or model.metadata.get("general.architecture") or "deepseek4")
    home = os.environ.get("HOME") or "."
    base = os.path.join(home, ".llama", f"expert_{sanitize(name)}")
    return base + ".dsv4.bin", base + ".bin"


def fingerprint(model: ModelFile) -> bytes:
    """sha256 over the things that decide routing and its shape: general.name, the shapes and types of the router
    and expert tensors, the router biases and the hash tables (tid2eid). Not the expert weights themselves."""
    h = hashlib.sha256(b"llama-dsv4 moe stats v1\0")
    h.update(str(model.metadata.get("general.name", "")).encode())
    p = model.params
    h.update(struct.pack("<IIII", p.n_layer, p.n_expert, p.n_expert_used, p.hash_layer_count))
    for name in sorted(model.tensors):
        if not name.startswith("blk.") or int(name.split(".")[1]) >= p.n_layer:
            continue
        if any(s in name for s in ("ffn_gate_inp", "_exps", "exp_probs_b", "tid2eid")):
            t = model.tensors[name]
            h.update(f"{name}:{t.type}:{t.ne}\0".encode())
            if "exp_probs_b" in name or "tid2eid" in name:
                h.update(model.array(name).tobytes())
    return h.digest()


def encode(s: Stats) -> bytes:
    body = (
        _HEAD.pack(MAGIC, VERSION, s.n_layer, s.n_expert, s.n_used, s.fingerprint, s.tokens, s.half_life)
        + np.ascontiguousarray(s.lifetime, "<u8").tobytes()
        + np.ascontiguousarray(s.decayed, "<f8").tobytes()
    )
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, n_layer: int, n_expert: int, n_used: int, fp: bytes) -> Stats:
    """Our format, validated completely against the model (shape and fingerprint)."""
    if len(data) < _HEAD.size + 32:
        raise StatsFileError(f"too short for a statistics file ({len(data)} bytes)")
    magic, version, L, E, k, file_fp, tokens, half_life = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StatsFileError("not a llama-dsv4 statistics file (bad magic)")
    if version != VERSION:
        raise StatsFileError(f"statistics file version {version}; this build reads version {VERSION}")
    want = _HEAD.size + 16 * L * E + 32
    if len(data) != want:
        raise StatsFileError(f"{len(data)} bytes; a {L} x {E} statistics file has {want} (truncated or padded)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise StatsFileError("checksum mismatch (the file is corrupt)")
    if (L, E, k) != (n_layer, n_expert, n_used):
        raise StatsFileError(
            f"statistics for {L} layers x {E} experts top-{k}; the model has {n_layer} x {n_expert} top-{n_used}",
            foreign=True,
        )
    if file_fp != fp:
        raise StatsFileError("statistics of another model (fingerprint differs)", foreign=True)
    if not (half_life > 0 and np.isfinite(half_life)):
        raise StatsFileError(f"bad decay half-life {half_life}")
    off = _HEAD.size
    lifetime = np.frombuffer(data, "<u8", L * E, off).reshape(L, E).astype(np.uint64)
    decayed = np.frombuffer(data, "<f8", L * E, off + 8 * L * E).reshape(L, E).astype(np.float64)
    if not np.isfinite(decayed).all() or (decayed < 0).any():
        raise StatsFileError("decayed counts are negative or not finite")
    return Stats(L, E, k, file_fp, int(tokens), float(half_life), lifetime, decayed)


def decode_est1(data: bytes, n_layer: int, n_expert: int) -> np.ndarray:
    """The seed fork's counts (u64 [n_layer, n_expert]), validated against the model's shape."""
    if len(data) < _EST1_HEAD.size:
        raise StatsFileError("too short for an EST1 file")
    magic, L, E = _EST1_HEAD.unpack_from(data)
    if magic != EST1_MAGIC:
        raise StatsFileError("not an EST1 file (bad magic)")
    if (n_layer, n_expert) != (L, E):
        raise StatsFileError(f"EST1 statistics for {L} layers x {E} experts; the model has {n_layer} x {n_expert}")
    want = _EST1_HEAD.size + 8 * L * E
    if len(data) != want:
        raise StatsFileError(f"EST1 file of {len(data)} bytes; {L} x {E} needs {want} (truncated or padded)")
    return np.frombuffer(data, "<u8", L * E, _EST1_HEAD.size).reshape(L, E).astype(np.uint64)


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, None if it does not exist; StatsFileError for something that is not a regular file
    or is absurdly large."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StatsFileError(f"cannot stat {path}: {e.strerror}") from None
    if not os.path.isfile(path):
        raise StatsFileError(f"{path} is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise StatsFileError(f"{path} is {st.st_size} bytes, far too large for statistics")
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise StatsFileError(f"cannot read {path}: {e.strerror}") from None


@contextlib.contextmanager
def locked(path: str):  # type: ignore[no-untyped-def]
    """An exclusive advisory lock shared by every process that writes `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): single-writer semantics
            pass
        yield
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".expert-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
