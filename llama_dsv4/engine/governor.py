"""How many of a context's pool threads each compute uses: the caller's request, lowered while the CPUs are
contended (docs/design.md, "Threads").

ggml's threads wait for each other at the end of every graph node by spinning, so when the system takes a CPU
away from one of them (another busy process), the others spin until it runs again, node after node: 2 threads on
2 CPUs next to one busy process decode at a fraction of the speed of 1 thread, and next to four a token takes
seconds. The governor watches two things, both cheap to read:

- contention, over windows of at least `window_s` seconds of compute: the run-queue delay of each pool thread in
  use (the time it was runnable but had no CPU; Linux /proc/self/task/<tid>/schedstat), summed and divided by the
  window's compute time. That is the average number of our threads without a CPU: ~0 on an idle machine, 0.67 for
  2 threads on 2 CPUs next to one busy process. Above `high`, the following computes use floor(n - lost) threads
  (at least one fewer).
- idle CPUs, while below the request: every `interval` seconds, the idle time of the CPUs this process may run on
  (/proc/stat; time given to niced tasks counts as idle) since the last look. With at least `idle_min` of a CPU
  idle, or blindly once the count has been held `blind` intervals, it tries one more thread for a window (a
  probe): a probe that finds contention doubles the interval (up to `max_interval`), one that does not keeps the
  thread, so an idle machine gets every requested thread back within a few intervals, and a busy one is probed
  rarely (a probe there costs one slow compute: a second next to four busy processes on 2 CPUs).
- before the first compute, the CPUs idle since the context was made set the starting count (a context made on
  a busy machine does not start with one slow compute at the full count).

The thread count never changes results: each output element of a graph is computed by one thread whatever their
number. `LLAMA_DSV4_GOVERNOR=off` turns the governor off (each compute then uses the requested threads); it is off
by itself where the scheduler statistics cannot be read (not Linux, or a kernel without schedstat)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Sensors:
    """What the governor reads; tests inject their own.

    compute(): seconds of graph compute so far (the context's t_compute).
    delays(n): (the calling thread's id, the summed run-queue delay in seconds of the first n pool threads, task 0
    being the calling thread), or None when they cannot be read.
    idle(): idle CPU-seconds of the CPUs this process may use, so far, or None when the system does not say.
    wall(): a monotonic clock in seconds.
    """

    compute: Callable[[], float]
    delays: Callable[[int], tuple[int, float] | None]
    idle: Callable[[], float | None]
    wall: Callable[[], float] = field(default=time.monotonic)


class Governor:
    """Per context: `before(requested)` returns (and sets, through set_threads) the threads of the next compute,
    `after()` follows each compute. sensors=None: no governor, every compute uses the requested threads.
    since: (wall, idle) readings of the sensors from when loading began (default: now), for the first count."""

    def __init__(
        self,
        pool: int,
        set_threads: Callable[[int], None],
        sensors: Sensors | None,
        *,
        window_s: float = 0.03,
        high: float = 0.25,
        idle_min: float = 0.75,
        interval: float = 0.25,
        max_interval: float = 8.0,
        first_look_s: float = 0.1,
        blind: float = 8.0,
        since: tuple[float, float | None] | None = None,
    ) -> None:
        self.pool = max(1, pool)
        self.cap = self.pool  # the most threads a compute may use now
        self.enabled = sensors is not None and self.pool > 1
        self.window_s, self.high, self.idle_min = window_s, high, idle_min
        self.min_interval, self.max_interval, self.first_look_s = interval, max_interval, first_look_s
        self.blind = blind
        self._held_since = 0.0  # when the cap was last lowered or raised
        self.probes = self.reductions = 0  # counters, for tests and benchmarks
        self._set = set_threads
        self._s = sensors
        self._current = 0  # what set_threads was last given
        self._interval = interval
        self._probing = False
        self._window: tuple[int, float, tuple[int, float] | None] | None = None  # threads, compute, delays at start
        self._look: tuple[float, float | None] | None = None  # (wall, idle) when the idle CPUs were last read
        self._started = False
        if self.enabled and sensors is not None:
            self._look = since if since is not None else (sensors.wall(), sensors.idle())

    def before(self, requested: int) -> int:
        """The threads the next compute uses: `requested` (>= 1), at most the pool and the governor's cap."""
        if not self._started:
            self._started = True
            self._first_cap()
        n = max(1, min(requested, self.cap if self.enabled else self.pool))
        if n != self._current:
            self._set(n)
            self._current = n
        if self._s is not None and self.enabled and (self._window is None or self._window[0] != n):
            self._window = (n, self._s.compute(), self._s.delays(n) if n > 1 else None)
        return n

    def after(self) -> None:
        """Call after each compute: closes the window once it holds window_s seconds of compute."""
        s = self._s
        if s is None or not self.enabled or self._window is None:
            return
        n, c0, d0 = self._window
        elapsed = s.compute() - c0
        if elapsed < self.window_s:
            return
        d1 = s.delays(n) if n > 1 else None
        self._window = (n, c0 + elapsed, d1)
        if n == 1:
            self.observe(1, 0.0)
        elif d0 is not None and d1 is not None and d0[0] == d1[0]:  # else another thread called: nothing learned
            self.observe(n, (d1[1] - d0[1]) / elapsed)

    def observe(self, n: int, lost: float) -> None:
        """The policy, after a window of compute at n threads in which `lost` of them had no CPU on average."""
        if n > 1 and lost > self.high:
            if self._probing:
                self._interval = min(2 * self._interval, self.max_interval)
            self.cap = max(1, min(n - 1, math.floor(n - lost)))
            self.reductions += 1
            self._probing = False
            self._look = None
            return
        if self._probing and n == self.cap:  # the probe found a free CPU: keep it, look for the next one soon
            self._probing = False
            self._interval = self.min_interval
            self._look = None
        if not self._probing and n == self.cap < self.pool and self._should_probe():
            self.cap += 1
            self.probes += 1
            self._probing = True

    def _first_cap(self) -> None:
        """Before the first compute: as many threads as CPUs were free since loading began (`since`: the CPUs
        idle, plus the one this process was busy on while loading), when that was long enough to tell; the
        first window corrects what this gets wrong. Saves one compute at the full count on a busy machine,
        where it can take a second."""
        if self._s is None or not self.enabled or self._look is None:
            return
        t0, idle0 = self._look
        now = self._s.wall()
        if now - t0 < self.first_look_s:
            return
        idle1 = self._s.idle()
        self._look = (now, idle1)
        if idle0 is not None and idle1 is not None:
            self.cap = max(1, min(self.pool, math.floor((idle1 - idle0) / (now - t0) + 1.25)))

    def _should_probe(self) -> bool:
        """At most every `interval` seconds: whether to try one more thread. Yes if the usable CPUs had idle_min
        of a CPU idle since the last look (or the system does not say), or, blindly, once the count has been held
        `blind` intervals (CPUs busy with work of lower priority look busy and are not)."""
        assert self._s is not None
        now = self._s.wall()
        if self._look is None:
            self._look = (now, self._s.idle())
            self._held_since = now
            return False
        t0, idle0 = self._look
        if now - t0 < self._interval:
            return False
        idle1 = self._s.idle()
        self._look = (now, idle1)
        if idle0 is None or idle1 is None or (idle1 - idle0) / (now - t0) >= self.idle_min:
            return True
        return now - self._held_since >= self.blind * self._interval


def schedstat_delays(worker_ids: Sequence[int]) -> Callable[[int], tuple[int, float] | None] | None:
    """Sensors.delays for a pool whose threads 1.. are `worker_ids` (Backends.worker_ids), from the scheduler's
    per-thread statistics; None where they cannot be read (not Linux, no schedstat, no thread ids)."""
    ids = list(worker_ids)

    def read(n: int) -> tuple[int, float] | None:
        me = threading.get_native_id()
        total = 0
        try:
            for tid in (me, *ids[: n - 1]):
                with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return me, total * 1e-9

    return read if ids and read(len(ids) + 1) is not None else None


def proc_stat_idle(cpus: Sequence[int] | None = None) -> Callable[[], float | None]:
    """Sensors.idle from /proc/stat: idle and iowait time of `cpus` (default: this process's affinity), and the
    time they ran niced tasks when this process is not niced itself."""
    try:
        mine = set(os.sched_getaffinity(0) if cpus is None else cpus)
        tick = float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, OSError, ValueError):
        return lambda: None

    try:  # tasks of lower priority (nice > 0, /proc/stat's "nice" time) give their CPU to a process that is not
        yielding = os.getpriority(os.PRIO_PROCESS, 0) <= 0
    except (AttributeError, OSError):
        yielding = False

    def read() -> float | None:
        total = 0
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if not line.startswith(b"cpu") or not line[3:4].isdigit():
                        continue
                    fields = line.split()
                    if int(fields[0][3:]) in mine:
                        total += int(fields[4]) + int(fields[5]) + (int(fields[2]) if yielding else 0)
        except (OSError, ValueError, IndexError):
            return None
        return total / tick

    return read


def governor_enabled() -> bool:
    """LLAMA_DSV4_GOVERNOR: on (default) or off; ValueError naming the variable for anything else."""
    raw = os.environ.get("LLAMA_DSV4_GOVERNOR", "on")
    v = raw.strip().lower()
    if v in ("on", "1", "true", "yes", ""):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"LLAMA_DSV4_GOVERNOR must be on or off, got {raw!r}")
