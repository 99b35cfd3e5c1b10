"""The CPUs this process may use, and thread counts fitted to them: the one place that the API (`Llama`), the
CLI, the server and the engine's thread pool (`_ggml.Backends`) ask.

Why a thread count above the CPUs is never honoured: ggml's CPU threads wait for each other at the end of every
graph node by spinning (`ggml_barrier` in the pinned libggml is built without OpenMP and never yields), so a
thread that has no CPU of its own stalls all the others until the scheduler runs it again; 64 threads on 2 CPUs
made a token take seconds, and 10**6 could not even be started."""

from __future__ import annotations

import math
import numbers
import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, within the cgroup's CPU quota if there is one (a
    container given 2.5 CPUs gets 3). At least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def physical_cores() -> int:
    """llama.cpp's default thread count: the physical cores among the usable CPUs (hyperthreads of one core share
    its arithmetic units and do not make ggml faster), within the cgroup quota."""
    try:
        cores = set()
        for cpu in os.sched_getaffinity(0):
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        n = len(cores)
    except (AttributeError, OSError):
        return usable_cpus()
    return max(1, min(n, usable_cpus()))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU bandwidth limit of this process's cgroup and its ancestors, in CPUs (quota / period; the smallest
    along the path), or None where there is none or the system does not say. cgroup v2 (`cpu.max`) and v1
    (`cpu.cfs_quota_us` / `cpu.cfs_period_us`)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    limits: list[float] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # v2: one unified hierarchy
            for d in _dirs(root, path):
                limits += _v2_limit(d)
        elif "cpu" in controllers.split(","):
            for mount in (f"{root}/{controllers}", f"{root}/cpu", f"{root}/cpu,cpuacct"):
                if os.path.isdir(mount):
                    for d in _dirs(mount, path):
                        limits += _v1_limit(d)
                    break
    if not lines:  # no /proc/self/cgroup: the mount's top (a container's own cgroup)
        limits += _v2_limit(root) + _v1_limit(f"{root}/cpu")
    return min(limits) if limits else None


def _dirs(mount: str, path: str) -> list[str]:
    """The cgroup directory of `path` under `mount` and its ancestors up to the mount (inside a container the
    path may not exist under the mount, whose top is then the container's own cgroup)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [os.path.join(mount, *parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(d: str) -> list[float]:
    try:
        with open(os.path.join(d, "cpu.max")) as f:
            quota, period = [*f.read().split(), "100000"][:2]
        if quota != "max" and int(period) > 0 and int(quota) > 0:
            return [int(quota) / int(period)]
    except (OSError, ValueError):
        pass
    return []


def _v1_limit(d: str) -> list[float]:
    try:
        with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(d, "cpu.cfs_period_us")) as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return [quota / period]
    except (OSError, ValueError):
        pass
    return []


def check_count(name: str, value: object) -> int | None:
    """A thread count as given to `Llama` or a flag: None for the default (None, 0 or -1, llama.cpp's "default"),
    the count otherwise; ValueError naming `name` for anything but an integer >= -1 (bools, floats, strings)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer (0, -1 or None: the default), got {value!r}")
    n = int(value)
    if n < -1:
        raise ValueError(f"{name} must be a positive integer (0, -1 or None: the default), got {n}")
    return n if n > 0 else None


def fit_count(
    name: str, value: object, default: int, cpus: int | None = None, slots: int = 1
) -> tuple[int, str | None]:
    """(threads, note) for each of `slots` sequences computed at once (server slots): `value` checked
    (check_count), `default` when it is unset, and at most the slot's share of `cpus` (the usable CPUs unless
    given), so that the slots together never run more threads than CPUs unless there are more slots than CPUs
    (then one each: single-threaded computes do not spin). The note says what was clamped, None if nothing was."""
    n = check_count(name, value)
    cpus = usable_cpus() if cpus is None else max(1, cpus)
    share = max(1, cpus // max(1, slots))
    if n is None:
        return max(1, min(default, share)), None
    if n <= share:
        return n, None
    if slots > 1:
        return share, (
            f"{name}={n} in each of {slots} slots is more than the {cpus} CPUs this process may use: using {share} "
            "per slot"
        )
    return share, (
        f"{name}={n} is more than the {cpus} CPUs this process may use: using {cpus} (ggml's threads wait for "
        "each other spinning, so threads without a CPU of their own slow every token down)"
    )
