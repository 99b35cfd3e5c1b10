"""MoE expert residency: `moe_hot_count` N | "auto" | per-layer list, with a byte budget and persisted routing
statistics (docs/moe-residency.md).

Data flow: the engine hands every ubatch's routing ([n_layer, n_tokens, k] expert ids, hash layers included) to
`on_routes`; counts (counts.py) grow; every `interval` counted tokens the hot counts are recomputed (policy.py)
and the locked page set follows (memory.py); every `save_every` updates, and at close, the statistics are merged
into the file (statsfile.py). Routing and logits never depend on any of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import policy, statsfile
from .counts import DEFAULT_HALF_LIFE, ExpertCounts, add_tokens, add_u64, clamp_decayed, total_u64
from .memory import EMPTY, PAGE, ExpertTensor, Intervals, Residency, Syscalls, total, union

if TYPE_CHECKING:
    from ..model.loader import ModelFile

log = logging.getLogger("llama_dsv4.moe")
AUTO_START = 64  # hot count of a layer in auto mode before it has statistics (the seed's choice)


def parse_hot_count(value: Any) -> int | str | list[int] | None:
    """`moe_hot_count` as given on Llama(...) or the command line: None/0/"0"/"off" (off), N, "auto", or a
    per-layer list (a list of ints or "a,b,c"). Anything else is a ValueError naming the value."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "0", "off", "none"):
            return None
        if v == "auto":
            return "auto"
        parts = v.split(",")
        try:
            nums = [int(x) for x in parts]
        except ValueError:
            raise ValueError(f"moe_hot_count must be N, 'auto' or a comma list of N per layer, got {value!r}") from None
        value = nums if len(nums) > 1 else nums[0]
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in value):
            raise ValueError(f"a per-layer moe_hot_count must be a non-empty list of integers, got {value!r}")
        if any(x < 0 for x in value):
            raise ValueError(f"per-layer moe_hot_count values must be >= 0, got {list(value)}")
        return [int(x) for x in value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"moe_hot_count must be >= 0 (0: off), 'auto' or a list, got {value}")
        return int(value) or None
    raise ValueError(f"moe_hot_count must be N, 'auto' or a list of N per layer, got {value!r}")


def parse_prefetch(value: Any) -> bool | str:
    """`moe_prefetch` as given on Llama(...) or the command line: True / "on" / "true", False / None / "off" /
    "false", or "auto". Anything else is a ValueError naming the value."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("on", "true", "1"):
            return True
        if v in ("off", "false", "0"):
            return False
        if v == "auto":
            return "auto"
    raise ValueError(f"moe_prefetch must be True, False or 'auto' (or on/off), got {value!r}")


@dataclass
class MoEConfig:
    """The settings of MoE expert residency (Llama's moe_* keywords): `hot_count` as parse_hot_count returns it,
    the byte budget in MiB, the statistics file, and the cadence of updates and saves. ValueError for a value
    that cannot be used."""

    hot_count: int | str | list[int]
    budget_mib: float | None = None  # cap on locked expert bytes (any mode)
    stats_path: str | None = None  # default ~/.llama/expert_<name>.dsv4.bin
    coverage: float = policy.DEFAULT_COVERAGE
    interval: int = 1024  # counted tokens between hot-set updates
    save_every: int = 10  # updates between saves (and at close)
    half_life: float = DEFAULT_HALF_LIFE
    release_cold: bool = False  # drop cold experts' pages at each update (else the kernel evicts them first)
    lock: bool = True  # False: count and rank only (the hot experts on a device follow the ranking: moe/device.py)

    def __post_init__(self) -> None:
        if self.budget_mib is not None and (not np.isfinite(self.budget_mib) or self.budget_mib < 0):
            raise ValueError(f"moe_hot_budget_mib must be a non-negative number, got {self.budget_mib}")
        if not 0 < self.coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.interval <= 0 or self.save_every <= 0:
            raise ValueError("interval and save_every must be positive")


class ExpertResidency:
    """The MoE expert residency of one Llama (docs/moe-residency.md): counts the routing the engine reports
    (on_routes), keeps the hot experts' pages locked and updates them as the counts change, persists the
    statistics (save, close) and reports its figures (stats, which Llama.moe_stats returns). Needs a model mapped
    with use_mmap=True."""

    def __init__(
        self,
        model: ModelFile,
        weight_range: Any,  # name -> (address, nbytes) | None (Context.weight_range)
        config: MoEConfig,
        use_mlock: bool = False,
        syscalls: Syscalls | None = None,
    ) -> None:
        if config.lock and not model.use_mmap:
            raise ValueError("MoE expert residency manages pages of the mapped model file: it needs use_mmap=True")
        p = model.params
        self.model, self.config = model, config
        self.L, self.E, self.k = p.n_layer, p.n_expert, p.n_expert_used
        tensors: list[ExpertTensor] = []
        for li in range(self.L):
            for kind in ("gate", "up", "down"):
                r = weight_range(f"blk.{li}.ffn_{kind}_exps.weight")
                if r is None:
                    raise ValueError("MoE expert residency needs the expert weights in host memory (mapped file)")
                tensors.append(ExpertTensor(li, int(r[0]), int(r[1]), self.E))
        self.bytes_per_expert = np.zeros(self.L, np.int64)
        for t in tensors:
            self.bytes_per_expert[t.layer] += t.slice_bytes
        pinned = EMPTY
        if use_mlock:  # --mlock: every other weight stays locked too
            other = [weight_range(n) for n in model.tensors if not n.endswith("_exps.weight")]
            other = [r for r in other if r is not None]
            pinned = union(
                np.array([a // PAGE for a, _ in other], np.int64),
                np.array([(a + n + PAGE - 1) // PAGE for a, n in other], np.int64),
            )
        self._fds: list[int] = []
        files = []
        for shard, path in enumerate(model.paths):  # where each shard is mapped, for dropping cached pages
            # an expert tensor (always in the mapping; tid2eid, for one, is a private copy) locates the shard
            name = next((n for n, t in model.tensors.items() if t.shard == shard and n.endswith("_exps.weight")), None)
            r = weight_range(name) if name is not None else None
            if r is not None:
                fd = os.open(path, os.O_RDONLY)
                self._fds.append(fd)
                files.append((int(r[0]) - model.tensors[name].offset, os.fstat(fd).st_size, fd))
        self.memory = Residency(tensors, pinned, syscalls, files)
        self.counts = ExpertCounts(self.L, self.E, self.k, config.half_life)
        self.fingerprint = statsfile.fingerprint(model)
        ours, seed = statsfile.default_paths(model)
        self.path = os.path.expanduser(config.stats_path) if config.stats_path else ours
        self.seed_path = seed
        self.budget = int(config.budget_mib * 2**20) if config.budget_mib else None
        self.backoff: int | None = None  # lock failures cap the budget; only ever shrinks
        self.auto = config.hot_count == "auto"
        self.updates = 0
        self.update_seconds = 0.0
        self.since = 0
        self.released_bytes = 0
        self.warnings: list[str] = []
        self._sync_lifetime = np.zeros((self.L, self.E), np.uint64)
        self._sync_decayed = np.zeros((self.L, self.E), np.float64)
        self._sync_tokens = 0
        self.loaded_from: str | None = None
        self.listeners: list[Callable[[np.ndarray], None]] = []  # called with the ranking after each update
        self._load()
        if self.auto:
            start = np.full(self.L, min(AUTO_START, self.E), np.int64)
            self.hot = policy.auto_counts(self.counts.decayed, start, config.coverage, self.k)
        elif isinstance(config.hot_count, list):
            v = [min(int(x), self.E) for x in config.hot_count[: self.L]]
            self.hot = np.array(v + [max(v)] * (self.L - len(v)), np.int64)
        else:
            self.hot = np.full(self.L, min(int(config.hot_count), self.E), np.int64)
        self.requested = self.hot.copy()
        self._update(first=True)
        if config.release_cold and config.lock:
            self.released_bytes += self.memory.release_cold(self.hot_sets)
        log.info(
            "MoE hot experts: per-layer counts %d..%d, %.1f MiB locked, statistics %s",
            int(self.hot.min()),
            int(self.hot.max()),
            self.memory.locked_bytes / 2**20,
            self.path,
        )

    # ------------------------------------------------------------------------------------------ statistics
    def _warn(self, msg: str) -> None:
        if msg in self.warnings:  # each save would repeat it
            return
        self.warnings.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _read(self) -> statsfile.Stats | None:
        """The statistics file, validated; None when absent or empty. StatsFileError when unusable."""
        return statsfile.load(self.path, self.L, self.E, self.k, self.fingerprint, self.counts.half_life)

    def _load(self) -> None:
        try:
            s = self._read()
        except statsfile.StatsFileError as e:
            kept = "; statistics are not saved there (set moe_stats_path)" if e.keep else ""
            self._warn(f"ignoring MoE statistics {self.path}: {e}{kept}")
            return
        if s is not None:
            self.counts.load(s.lifetime, s.decayed, s.tokens)
            if not s.est1:  # an EST1 file: the sync point stays at zero, the first save writes all in our format
                self._sync()
            self.loaded_from = self.path
            return
        if self.config.stats_path is None:  # first start with our format: import the seed's file if present
            try:
                data = statsfile.read_bytes(self.seed_path)
                if data is not None:
                    life = statsfile.decode_est1(data, self.L, self.E)
                    self.counts.load(life, life.astype(np.float64), 0)
                    self.loaded_from = self.seed_path
            except statsfile.StatsFileError as e:
                self._warn(f"ignoring EST1 statistics {self.seed_path}: {e}")

    def _sync(self) -> None:
        self._sync_lifetime = self.counts.lifetime.copy()
        self._sync_decayed = self.counts.decayed.copy()
        self._sync_tokens = self.counts.tokens

    def save(self) -> bool:
        """Merge what this process counted since its last sync into the file (atomically, under a lock). Never
        raises: the statistics only steer residency, so any failure is a warning and the file stays as it was."""
        try:
            return self._save()
        except Exception as e:  # a save runs inside eval() and close(): it must not fail them
            self._warn(f"could not save MoE statistics to {self.path}: {type(e).__name__}: {e}")
            return False

    def _save(self) -> bool:
        c = self.counts
        d_tok = max(c.tokens - self._sync_tokens, 0)
        f = 0.5 ** (d_tok / c.half_life)
        d_life = np.maximum(c.lifetime, self._sync_lifetime) - self._sync_lifetime
        d_dec = np.maximum(c.decayed - self._sync_decayed * f, 0.0)
        try:
            statsfile.check_target(self.path)  # before a lock file is created beside it
            with statsfile.locked(self.path):
                statsfile.remove_stale_temporaries(self.path)
                try:
                    cur = self._read()
                except statsfile.StatsFileError as e:
                    if e.keep:
                        raise
                    self._warn(f"replacing unusable MoE statistics {self.path}: {e}")
                    cur = None
                if cur is None or cur.est1:  # this process's statistics, all of them (an EST1 file's were loaded)
                    life, dec, tok = c.lifetime.copy(), c.decayed.copy(), c.tokens
                else:
                    life = add_u64(cur.lifetime, d_life)
                    dec = clamp_decayed(cur.decayed * f + d_dec)
                    tok = add_tokens(cur.tokens, d_tok)
                s = statsfile.Stats(self.L, self.E, self.k, self.fingerprint, tok, c.half_life, life, dec)
                statsfile.write_atomic(self.path, statsfile.encode(s))
        except statsfile.StatsFileError as e:  # keep: not ours to replace
            self._warn(f"not saving MoE statistics to {self.path}: {e}; set moe_stats_path")
            return False
        c.load(life, dec, tok)
        self._sync()
        return True

    # ------------------------------------------------------------------------------------------ the hot set
    @property
    def hot_sets(self) -> list[np.ndarray]:
        """Per layer, the hot expert ids, hottest first."""
        return self._hot_sets

    def _update(self, first: bool = False) -> None:
        t0 = time.perf_counter()
        if self.auto and not first:
            self.requested = policy.auto_counts(self.counts.decayed, self.requested, self.config.coverage, self.k)
        for _ in range(8):  # a lock failure lowers the budget and tries again with fewer experts
            hot = self.requested
            cap = self._effective_budget()
            if cap is not None:
                hot, warning = policy.trim_to_budget(self.counts.decayed, hot, self.bytes_per_expert, cap, self.k)
                if warning and warning not in self.warnings:
                    self._warn(warning)
            self.hot = hot
            self.order = policy.ranking(self.counts.decayed, self.counts.lifetime)
            self._hot_sets = [self.order[li, : hot[li]] for li in range(self.L)]
            self.mask = np.zeros((self.L, self.E), bool)
            for li in range(self.L):
                self.mask[li, self._hot_sets[li]] = True
            if not self.config.lock:
                break
            _, released = self.memory.apply(self._hot_sets, release=self.config.release_cold)
            self.released_bytes += released
            if not self.memory.lock_failed_bytes:
                break
            new_cap = max(PAGE, int(0.95 * max(self.memory.locked_bytes - total(self.memory.pinned) * PAGE, 0)))
            self._warn(
                f"MoE hot residency: locking failed ({os.strerror(self.memory.lock_errno)}) after "
                f"{self.memory.locked_bytes / 2**20:.1f} MiB; capping the hot budget at {new_cap / 2**20:.1f} MiB"
            )
            if self.backoff is not None and new_cap >= self.backoff:
                break
            self.backoff = new_cap
        for listener in self.listeners:
            listener(self.order)
        self.update_seconds += time.perf_counter() - t0
        if not first:
            self.updates += 1

    def _effective_budget(self) -> int | None:
        caps = [c for c in (self.budget, self.backoff) if c is not None]
        return min(caps) if caps else None

    def on_routes(self, routes: np.ndarray, tokens: Any = None) -> None:
        """The engine's sink: one ubatch's routing [n_layer, n, k]."""
        self.counts.add(routes, self.mask)
        self.since += routes.shape[1]
        if self.since >= self.config.interval:
            self.since = 0
            self._update()
            if self.updates % self.config.save_every == 0:
                self.save()

    def close(self) -> None:
        """Save the statistics (a failure is a warning), then unlock the pages and close the files, always."""
        try:
            self.save()
        finally:
            fds, self._fds = self._fds, []
            try:
                self.memory.unlock_all()
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    # ------------------------------------------------------------------------------------------ metrics
    def stats(self) -> dict[str, Any]:
        """The residency figures: locked, resident and released bytes, the budget, the hit rate, the per-layer hot
        counts, updates and their time (keys listed in docs/moe-residency.md)."""
        c = self.counts
        hot_bytes = int((self.hot * self.bytes_per_expert).sum())
        return {
            "enabled": True,
            "mode": "auto" if self.auto else "fixed",
            "locked_bytes": self.memory.locked_bytes,
            "kernel_locked_bytes": Syscalls.locked_bytes(),
            "lock_failed_bytes": self.memory.lock_failed_bytes,
            "resident_bytes": self.memory.resident_bytes(),
            "expert_bytes": int(self.bytes_per_expert.sum()) * self.E,
            "hot_bytes": hot_bytes,
            "released_bytes": self.released_bytes,
            "budget_configured_bytes": self.budget or 0,
            "budget_effective_bytes": self._effective_budget() or 0,
            "hit_rate": c.hit_rate(),
            "hits": total_u64(c.hits),
            "routed": total_u64(c.routed),
            "hit_rate_per_layer": [(int(h) / int(r) if r else None) for h, r in zip(c.hits, c.routed, strict=True)],
            "tokens_counted": c.tokens,
            "reclassify_total": self.updates,
            "reclassify_seconds_total": self.update_seconds,
            "hot_per_layer": [int(x) for x in self.hot],
            "stats_path": self.path,
            "loaded_from": self.loaded_from,
        }


def lock_all(weight_range: Any, names: list[str], syscalls: Syscalls | None = None) -> Residency:
    """use_mlock without MoE residency: every weight's pages locked (a failure warns, never raises)."""
    ranges = [r for r in (weight_range(n) for n in names) if r is not None]
    pinned: Intervals = union(
        np.array([a // PAGE for a, _ in ranges], np.int64),
        np.array([(a + n + PAGE - 1) // PAGE for a, n in ranges], np.int64),
    )
    res = Residency([], pinned, syscalls)
    res.apply([], release=False)
    if res.lock_failed_bytes:
        warnings.warn(
            f"use_mlock: locked {res.locked_bytes / 2**20:.1f} MiB of the weights, "
            f"{res.lock_failed_bytes / 2**20:.1f} MiB failed ({os.strerror(res.lock_errno)}); raise RLIMIT_MEMLOCK "
            "(ulimit -li) to lock them all",
            RuntimeWarning,
            stacklevel=2,
        )
    return res
