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

Written to a temporary file `.<name>.<pid>-XXXXXXXX.tmp` in the same directory, fsynced and renamed over the old
one (a kill leaves either the old file or the new one, and a temporary that the next save removes), under an
exclusive lock on `<path>.lock`, merging what other processes added since this one last read the file. Read
fully and validated before anything live changes; any defect is a `StatsFileError` (a ValueError) that the caller
turns into a warning. Only a regular file that is a damaged file of ours (or an EST1 file of this model) is ever
replaced: a symbolic link, a device, a FIFO, a directory, another program's file, another model's file and a file
of a newer format version are left as they are (`StatsFileError.keep`).

EST1 (the llama.cpp fork that introduced `--moe-hot-count`): u32 0x31545345, u32 n_layer, u32 n_expert, then
u64 counts layer-major, nothing else. Read as lifetime (and initial decayed) counts when the shape matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import struct
import tempfile
import time
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
STALE_SECONDS = 600  # a temporary this old is a killed writer's even if its pid is alive again (reused)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC if os.name == "posix" else 0  # a FIFO never blocks


class StatsFileError(ValueError):
    """A statistics file that cannot be used (corrupt, truncated, foreign, another model's, a newer format's).

    keep: not ours to replace (not a regular file, another program's or model's file, a newer format, unreadable);
    otherwise a damaged file of ours, which the next save replaces."""

    def __init__(self, message: str, keep: bool = False) -> None:
        super().__init__(message)
        self.keep = keep


@dataclass
class Stats:
    """The contents of a statistics file: the model's shape and fingerprint, the tokens counted, and the lifetime
    and decayed counts per (layer, expert)."""

    n_layer: int
    n_expert: int
    n_used: int
    fingerprint: bytes
    tokens: int
    half_life: float
    lifetime: np.ndarray  # u64 [n_layer, n_expert]
    decayed: np.ndarray  # f64 [n_layer, n_expert]
    est1: bool = False  # read from the seed's format (lifetime counts only)


def sanitize(name: str) -> str:
    """`name` made safe as part of a file name (anything but letters, digits, '.', '_' and '-' becomes '_')."""
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
    """The file's bytes for `s` in our format: header, counts, then the sha256 of all that."""
    body = (
        _HEAD.pack(MAGIC, VERSION, s.n_layer, s.n_expert, s.n_used, s.fingerprint, s.tokens, s.half_life)
        + np.ascontiguousarray(s.lifetime, "<u8").tobytes()
        + np.ascontiguousarray(s.decayed, "<f8").tobytes()
    )
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, n_layer: int, n_expert: int, n_used: int, fp: bytes) -> Stats:
    """Our format, validated completely against the model (shape and fingerprint)."""
    if data[:8] != MAGIC:
        raise StatsFileError("not a llama-dsv4 statistics file (bad magic): left as it is", keep=True)
    version = struct.unpack_from("<I", data, 8)[0] if len(data) >= 12 else 0
    if version > VERSION:  # whatever its layout: never downgraded
        raise StatsFileError(
            f"written by a newer llama-dsv4 (format version {version}; this one reads {VERSION}): left as it is",
            keep=True,
        )
    if len(data) < _HEAD.size + 32:
        raise StatsFileError(f"too short for a statistics file ({len(data)} bytes)")
    if version != VERSION:
        raise StatsFileError(f"statistics file version {version}; this build reads version {VERSION}")
    _, _, L, E, k, file_fp, tokens, half_life = _HEAD.unpack_from(data)
    want = _HEAD.size + 16 * L * E + 32
    if len(data) != want:
        raise StatsFileError(f"{len(data)} bytes; a {L} x {E} statistics file has {want} (truncated or padded)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise StatsFileError("checksum mismatch (the file is corrupt)")
    if (L, E, k) != (n_layer, n_expert, n_used):
        raise StatsFileError(
            f"statistics for {L} layers x {E} experts top-{k}; the model has {n_layer} x {n_expert} top-{n_used}",
            keep=True,
        )
    if file_fp != fp:
        raise StatsFileError("statistics of another model (fingerprint differs)", keep=True)
    if not (half_life > 0 and np.isfinite(half_life)):
        raise StatsFileError(f"bad decay half-life {half_life}")
    off = _HEAD.size
    lifetime = np.frombuffer(data, "<u8", L * E, off).reshape(L, E).astype(np.uint64)
    decayed = np.frombuffer(data, "<f8", L * E, off + 8 * L * E).reshape(L, E).astype(np.float64)
    if not np.isfinite(decayed).all() or (decayed < 0).any():
        raise StatsFileError("decayed counts are negative or not finite")
    return Stats(L, E, k, file_fp, int(tokens), float(half_life), lifetime, decayed)


def decode_est1(data: bytes, n_layer: int, n_expert: int) -> np.ndarray:
    """The seed fork's counts (u64 [n_layer, n_expert]), validated against the model's shape. Never ours to replace
    unless whole and of this model's shape."""
    if len(data) < _EST1_HEAD.size:
        raise StatsFileError("too short for an EST1 file", keep=True)
    magic, L, E = _EST1_HEAD.unpack_from(data)
    if magic != EST1_MAGIC:
        raise StatsFileError("not an EST1 file (bad magic)", keep=True)
    if (n_layer, n_expert) != (L, E):
        raise StatsFileError(
            f"EST1 statistics for {L} layers x {E} experts; the model has {n_layer} x {n_expert}", keep=True
        )
    want = _EST1_HEAD.size + 8 * L * E
    if len(data) != want:
        raise StatsFileError(f"EST1 file of {len(data)} bytes; {L} x {E} needs {want} (truncated or padded)", keep=True)
    return np.frombuffer(data, "<u8", L * E, _EST1_HEAD.size).reshape(L, E).astype(np.uint64)


def load(path: str, n_layer: int, n_expert: int, n_used: int, fp: bytes, half_life: float) -> Stats | None:
    """The statistics at `path` (our format, or the seed's EST1 of this model's shape), validated; None when there is
    no file or an empty one. StatsFileError otherwise."""
    data = read_bytes(path)
    if not data:
        return None
    if data[:4] == struct.pack("<I", EST1_MAGIC):
        life = decode_est1(data, n_layer, n_expert)
        return Stats(n_layer, n_expert, n_used, fp, 0, half_life, life, life.astype(np.float64), est1=True)
    return decode(data, n_layer, n_expert, n_used, fp)


_KINDS = (
    (stat.S_ISLNK, "a symbolic link (give the file itself)"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int) -> str | None:
    """What a file of this mode is, if it is not a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def check_target(path: str) -> os.stat_result | None:
    """lstat of `path` (None if nothing is there); StatsFileError(keep=True) if it is not a regular file. Called
    before the lock file is created beside it: nothing is created next to a device."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StatsFileError(f"cannot stat {path}: {e.strerror}", keep=True) from None
    what = _not_regular(st.st_mode)
    if what is not None:
        raise StatsFileError(f"{path} is {what}, not a statistics file: left as it is", keep=True)
    return st


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, None if it does not exist. StatsFileError(keep=True) for anything but a readable regular
    file of a sane size: a symbolic link is not followed and a FIFO or device is never opened for long (no block)."""
    st = check_target(path)
    if st is None:
        return None
    if st.st_size > MAX_FILE_BYTES:
        raise StatsFileError(f"{path} is {st.st_size} bytes, far too large for statistics: left as it is", keep=True)
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as e:
        raise StatsFileError(f"cannot open {path}: {e.strerror}", keep=True) from None
    with os.fdopen(fd, "rb") as f:
        fst = os.fstat(f.fileno())
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise StatsFileError(f"{path} changed while it was opened: left as it is", keep=True)
        try:
            return f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise StatsFileError(f"cannot read {path}: {e.strerror}", keep=True) from None


@contextlib.contextmanager
def locked(path: str):  # type: ignore[no-untyped-def]
    """An exclusive advisory lock shared by every process that writes `path`, on the regular file `<path>.lock`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except OSError as e:
        raise StatsFileError(f"cannot open the lock file {path}.lock: {e.strerror}", keep=True) from None
    try:
        what = _not_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise StatsFileError(f"the lock file {path}.lock is {what}", keep=True)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): single-writer semantics
            pass
        yield
    finally:
        os.close(fd)


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)[:64]}."  # the name stays short of NAME_MAX for any file name


_LEGACY_TEMP = re.compile(r"\.expert-[a-z0-9_]{8}\.tmp")  # what earlier versions left (no pid in the name)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or os.name != "posix":  # os.kill(pid, 0) would signal a group, or end the process on Windows
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str, now: float | None = None) -> list[str]:
    """Under the lock: remove the temporaries that killed writers of `path` left in its directory (ours only: our
    naming, a regular file of this user, whose writer's pid is gone or which is older than STALE_SECONDS). Returns
    the names removed; a failure to list or remove is ignored (the next save tries again)."""
    d = os.path.dirname(os.path.abspath(path))
    mine = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)-[a-z0-9_]{8}\.tmp")
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    for e in entries:
        m = mine.fullmatch(e.name)
        if m is None and _LEGACY_TEMP.fullmatch(e.name) is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
                continue
            old = now - st.st_mtime > STALE_SECONDS
            if old or (m is not None and not _pid_alive(int(m.group(1)))):
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            continue
    return removed


def write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory. Call under locked(path)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=".tmp", dir=d)
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
