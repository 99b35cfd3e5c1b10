"""Threads (robustness issue, items 2 and 3): counts checked and clamped to the CPUs this process may use in
Llama, the CLI and the server (with a warning or a note), never an OverflowError or thousands of threads; one
ggml pool per context, made once; the slots of a server share the CPUs; the contention governor (engine/
governor.py) with injected clocks, and for real next to busy processes; thread counts never change results."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from llama_dsv4 import Llama, _ggml
from llama_dsv4.engine import cpus, governor
from llama_dsv4.engine.governor import Governor, Sensors


def tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


# ---------------------------------------------------------------------------------------------- counts


def test_counts_are_checked() -> None:
    for v in (None, 0, -1):
        assert cpus.check_count("n_threads", v) is None  # llama.cpp's "default"
    assert cpus.check_count("n_threads", np.int64(3)) == 3
    assert cpus.check_count("n_threads", 2**40) == 2**40
    for bad in (True, 1.5, "2", -2, -(2**40), [2]):
        with pytest.raises(ValueError, match="n_threads must be"):
            cpus.check_count("n_threads", bad)


def test_counts_are_clamped_to_the_cpus_and_shared_by_slots() -> None:
    assert cpus.fit_count("n_threads", None, 4, cpus=8) == (4, None)
    assert cpus.fit_count("n_threads", None, 64, cpus=8) == (8, None)  # a default is clamped silently
    assert cpus.fit_count("n_threads", 8, 1, cpus=8) == (8, None)
    n, note = cpus.fit_count("n_threads", 2**40, 1, cpus=8)
    assert n == 8 and note is not None and f"n_threads={2**40}" in note and "using 8" in note
    # four slots share 8 CPUs: 2 each by default, and an explicit count is lowered to the share
    assert cpus.fit_count("--threads", None, 8, cpus=8, slots=4) == (2, None)
    n, note = cpus.fit_count("--threads", 3, 8, cpus=8, slots=4)
    assert n == 2 and note is not None and "4 slots" in note and "using 2 per slot" in note
    # more slots than CPUs: one thread each (single-threaded computes do not wait for each other)
    assert cpus.fit_count("--threads", 5, 8, cpus=2, slots=4)[0] == 1


def test_usable_cpus_follow_affinity_and_the_cgroup_quota(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    root = os.fspath(tmp_path)  # type: ignore[call-overload]
    os.makedirs(f"{root}/v2/slice/app")
    with open(f"{root}/v2/slice/cpu.max", "w") as f:
        f.write("250000 100000\n")  # 2.5 CPUs for the parent
    with open(f"{root}/v2/slice/app/cpu.max", "w") as f:
        f.write("max 100000\n")
    with open(f"{root}/cg2", "w") as f:
        f.write("0::/slice/app\n")
    assert cpus.cgroup_cpu_quota(f"{root}/v2", f"{root}/cg2") == 2.5
    os.makedirs(f"{root}/v1/cpu,cpuacct/docker")
    for name, v in (("cpu.cfs_quota_us", "150000"), ("cpu.cfs_period_us", "100000")):
        with open(f"{root}/v1/cpu,cpuacct/docker/{name}", "w") as f:
            f.write(v)
    with open(f"{root}/cg1", "w") as f:
        f.write("4:memory:/docker\n3:cpu,cpuacct:/docker\n")
    assert cpus.cgroup_cpu_quota(f"{root}/v1", f"{root}/cg1") == 1.5
    assert cpus.cgroup_cpu_quota(f"{root}/none", f"{root}/missing") is None
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 1.5)
    assert cpus.usable_cpus() == min(2, len(os.sched_getaffinity(0)))  # a quota of 1.5 CPUs: 2 threads
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: None)
    assert cpus.usable_cpus() == len(os.sched_getaffinity(0))
    assert 1 <= cpus.physical_cores() <= cpus.usable_cpus()


def test_llama_clamps_huge_counts_with_a_warning_and_bounded_threads(micro_path: str) -> None:
    usable = cpus.usable_cpus()
    before = tasks()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        llm = Llama(micro_path, n_ctx=64, n_threads=2**40, n_threads_batch=10**6, verbose=False)
    assert time.perf_counter() - t0 < 60  # was: > 3,000 threads started and no return
    try:
        assert (llm.n_threads, llm.n_threads_batch) == (usable, usable)
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert any(f"n_threads={2**40}" in m and f"using {usable}" in m for m in msgs), msgs
        assert any("n_threads_batch=1000000" in m for m in msgs), msgs
        # the pool: the usable CPUs, the calling thread being one of them
        assert len(tasks() - before) <= usable - 1
        llm.eval([1, 2, 3])
        llm.eval([4])
        assert len(tasks() - before) <= usable - 1
    finally:
        llm.close()
    assert not (tasks() - before)  # close() ends the pool's threads
    for bad in (1.5, True, "4", -3):
        with pytest.raises(ValueError, match="n_threads must be"):
            Llama(micro_path, n_ctx=64, n_threads=bad, verbose=False)  # type: ignore[arg-type]
    with Llama(micro_path, n_ctx=64, n_threads=-1, n_threads_batch=0, verbose=False) as m:
        assert (m.n_threads, m.n_threads_batch) == (max(usable // 2, 1), usable)  # llama-cpp-python's defaults


def test_backends_make_one_pool_and_never_more_threads_than_cpus() -> None:
    usable = cpus.usable_cpus()
    before = tasks()
    b = _ggml.Backends("cpu", 10**6)
    assert b.pool_threads == b.threads == usable
    made = tasks() - before
    assert len(made) == usable - 1 and set(b.worker_ids) == made  # ggml's own threads, each known by id
    for n in range(1, usable + 1):
        b.set_threads(n)
        assert b.threads == n
    assert tasks() - before == made  # setting the count does not make threads
    with pytest.raises(ValueError, match="at most the pool"):
        b.set_threads(usable + 1)
    with pytest.raises(ValueError, match=r"poll must be in \[0, 100\]"):
        _ggml.Backends("cpu", 1, 101)
    with pytest.raises(TypeError):
        _ggml.Backends("cpu", 1.5)  # type: ignore[arg-type]
    del b
    assert not (tasks() - before)  # the pool's threads end with it


def test_prefill_and_decode_share_one_pool(micro_path: str) -> None:
    if cpus.usable_cpus() < 2:
        pytest.skip("one usable CPU: a pool of one thread has nothing to share")
    with Llama(micro_path, n_ctx=128, n_threads=1, n_threads_batch=2, verbose=False) as m:
        m._runner.governor.enabled = False  # the counts asked for, whatever the machine's load
        be = m._ctx.backends
        ids = be.worker_ids
        assert be.pool_threads == 2 and len(ids) == 1
        for i in range(4):
            m.eval([5, 6, 7, 8])
            assert be.threads == 2
            m.eval([9 + i])
            assert be.threads == 1
        assert be.worker_ids == ids and set(ids) <= tasks()


def test_thread_counts_never_change_results(tiny_paths: dict[str, str]) -> None:
    """Greedy tokens and every logit bit are the same with 1 and 2 threads, and when the count changes from one
    compute to the next (as the governor changes it), f32 and quantized (our product kernels in the prefill)."""
    prompt = list(range(5, 45))
    for dtype in ("f32", "q8xq5"):
        runs = []
        for threads, switch in ((1, False), (2, False), (2, True)):
            with Llama(tiny_paths[dtype], n_ctx=128, n_threads=threads, n_threads_batch=threads, logits_all=True,
                       verbose=False) as m:  # fmt: skip
                gov = m._runner.governor
                gov.enabled = False  # the counts below are ours, not the governor's
                m.eval(prompt)
                for i in range(8):
                    if switch:
                        gov.cap = 1 + i % 2
                    m.eval([int(np.argmax(m.scores[m.n_tokens - 1]))])
                runs.append((m.input_ids[: m.n_tokens].tolist(), m.scores[: m.n_tokens].copy()))
        for toks, scores in runs[1:]:
            assert toks == runs[0][0]
            np.testing.assert_array_equal(scores, runs[0][1])


# ---------------------------------------------------------------------------------------------- governor


class FakeSystem:
    """Injected clocks: compute seconds, per-thread run-queue delays, idle CPU-seconds, wall seconds."""

    def __init__(self) -> None:
        self.compute = 0.0
        self.delay = 0.0
        self.idle = 0.0
        self.wall = 0.0
        self.caller = 1
        self.counts: list[int] = []

    def sensors(self) -> Sensors:
        return Sensors(
            lambda: self.compute, lambda n: (self.caller, self.delay), lambda: self.idle, wall=lambda: self.wall
        )

    def run(self, gov: Governor, requested: int, seconds: float, lost: float, idle_cpus: float) -> int:
        """One compute of `seconds` in which `lost` of the threads used had no CPU, `idle_cpus` CPUs were idle."""
        n = gov.before(requested)
        self.compute += seconds
        self.wall += seconds
        self.delay += lost * seconds
        self.idle += idle_cpus * seconds
        gov.after()
        return n


def make(pool: int, fake: FakeSystem, **kw: float) -> Governor:
    counts = fake.counts
    return Governor(pool, counts.append, fake.sensors(), **kw)  # type: ignore[arg-type]


def test_governor_keeps_every_thread_on_an_idle_machine() -> None:
    fake = FakeSystem()
    gov = make(4, fake)
    fake.wall, fake.idle = 1.0, 3.0  # three CPUs idle while the context loaded (on the fourth): all four threads
    assert {fake.run(gov, 4, 0.004, 0.0, 0.0) for _ in range(200)} == {4}
    assert gov.reductions == 0 and fake.counts == [4]  # set once, not per compute
    assert fake.run(gov, 1, 0.004, 0.0, 0.0) == 1  # a smaller request is honoured
    assert fake.run(gov, 10**6, 0.004, 0.0, 0.0) == 4  # a larger one is the pool
    assert fake.counts == [4, 1, 4]


def run_until(fake: FakeSystem, gov: Governor, done: Callable[[], bool], lost: float, idle: float) -> float:
    """Computes of 10 ms at 2 threads requested until `done`; the wall seconds that took."""
    t0 = fake.wall
    while not done():
        assert fake.wall - t0 < 30, "the governor never got there"
        fake.run(gov, 2, 0.01, lost, idle)
    return fake.wall - t0


def test_governor_lowers_the_count_under_contention_and_probes_back() -> None:
    fake = FakeSystem()
    gov = make(2, fake, window_s=0.03, interval=0.25, blind=8)
    # 2 threads next to one busy process on 2 CPUs: 0.67 of our threads without a CPU on average
    used = [fake.run(gov, 2, 0.01, 0.67, 0.0) for _ in range(5)]
    assert used == [2, 2, 2, 1, 1] and gov.cap == 1 and gov.reductions == 1
    # still busy, no CPU idle: one blind probe once the count was held `blind` intervals (8 x 0.25 s)
    waited = run_until(fake, gov, lambda: gov.probes == 1, 0.0, 0.0)
    assert 2.0 <= waited <= 2.0 + 0.25 + 0.1
    # the probe finds contention: back to one thread, and the interval doubles
    run_until(fake, gov, lambda: gov.cap == 1, 0.67, 0.0)
    assert gov._interval == 0.5 and gov.reductions == 2
    waited = run_until(fake, gov, lambda: gov.probes == 2, 0.0, 0.0)
    assert 4.0 <= waited <= 4.0 + 0.5 + 0.1
    run_until(fake, gov, lambda: gov.cap == 1, 0.67, 0.0)
    assert gov._interval == 1.0
    # the busy process ends: a CPU is idle, the next look (one interval) probes, and the probe keeps the thread
    waited = run_until(fake, gov, lambda: gov.cap == 2 and not gov._probing, 0.0, 1.0)
    assert waited <= 1.0 + 0.2 and gov._interval == 0.25 and gov.probes == 3
    assert {fake.run(gov, 2, 0.01, 0.0, 0.0) for _ in range(100)} == {2}


def test_governor_reduction_follows_the_lost_threads() -> None:
    fake = FakeSystem()
    gov = make(16, fake)
    fake.run(gov, 16, 0.05, 0.94, 0.0)  # 16 threads on 16 CPUs next to one busy process
    assert gov.cap == 15
    fake.run(gov, 16, 0.05, 3.5, 0.0)
    assert gov.cap == 11
    fake.run(gov, 16, 0.05, 40.0, 0.0)  # nonsense readings never go below one thread
    assert gov.cap == 1
    fake.run(gov, 16, 0.05, 0.9, 0.0)  # one thread: nothing to lower
    assert gov.cap == 1


def test_governor_starts_from_the_cpus_free_since_it_was_made() -> None:
    fake = FakeSystem()
    gov = make(2, fake)
    fake.wall = 0.5  # 0.5 s of loading on a machine with no idle CPU: start with one thread
    assert fake.run(gov, 2, 0.01, 0.0, 0.0) == 1
    fake = FakeSystem()
    gov = make(2, fake)
    fake.wall = 0.01  # too soon to tell: start with what was asked
    assert fake.run(gov, 2, 0.01, 0.0, 0.0) == 2
    fake = FakeSystem()
    fake.wall, fake.idle = 5.0, 3.0
    gov = Governor(2, fake.counts.append, fake.sensors(), since=(4.0, 3.0))  # loading began 1 s ago, none idle
    assert fake.run(gov, 2, 0.01, 0.0, 0.0) == 1


def test_governor_ignores_windows_split_between_threads() -> None:
    fake = FakeSystem()
    gov = make(2, fake)
    gov.before(2)
    fake.caller = 2  # the next compute comes from another thread: its delays are not comparable
    fake.compute += 0.05
    fake.delay += 1.0
    gov.after()
    assert gov.cap == 2 and gov.reductions == 0


def test_governor_off(micro_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    gov = Governor(4, calls.append, None)
    assert [gov.before(r) for r in (4, 4, 1, 9)] == [4, 4, 1, 4] and calls == [4, 1, 4]
    gov.after()
    assert not gov.enabled
    monkeypatch.setenv("LLAMA_DSV4_GOVERNOR", "off")
    with Llama(micro_path, n_ctx=64, verbose=False) as m:
        assert not m._runner.governor.enabled
    monkeypatch.setenv("LLAMA_DSV4_GOVERNOR", "sometimes")
    with pytest.raises(ValueError, match="LLAMA_DSV4_GOVERNOR must be on or off, got 'sometimes'"):
        Llama(micro_path, n_ctx=64, verbose=False)


def test_sensors_read_this_process() -> None:
    b = _ggml.Backends("cpu", 0)
    delays = governor.schedstat_delays(b.worker_ids)
    if b.pool_threads < 2 or not os.path.exists("/proc/self/schedstat"):
        assert delays is None
        return
    assert delays is not None
    me, d = delays(b.pool_threads)  # type: ignore[misc]
    assert me == __import__("threading").get_native_id() and d >= 0.0
    idle = governor.proc_stat_idle()
    assert (idle() or 0.0) >= 0.0


@pytest.fixture
def busy() -> Iterator[Callable[[int], None]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> None:
        procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n))

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def two_cpus() -> Iterator[None]:
    """This process (and what it starts) on two of its CPUs, whatever the machine."""
    mask = os.sched_getaffinity(0)
    if len(mask) < 2:
        pytest.skip("one usable CPU: there is no thread count to lower")
    os.sched_setaffinity(0, sorted(mask)[:2])
    yield
    os.sched_setaffinity(0, mask)


def test_governor_lowers_threads_next_to_busy_processes(
    micro_path: str, two_cpus: None, busy: Callable[[int], None]
) -> None:
    if not os.path.exists("/proc/self/schedstat"):
        pytest.skip("no scheduler statistics: the governor is off")
    busy(2)  # one busy process per CPU: our two threads cannot both have one
    time.sleep(0.2)
    with Llama(micro_path, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False) as m:
        gov = m._runner.governor
        assert gov.enabled and gov.pool == 2
        time.sleep(0.2)
        t0 = time.perf_counter()
        m.eval([1, 2, 3, 4])
        while gov.cap == 2 and time.perf_counter() - t0 < 60 and m.n_tokens < 500:
            m.eval([5])
        assert gov.cap == 1, (gov.reductions, m.n_tokens)


# ---------------------------------------------------------------------------------------------- server and CLI


def test_server_slots_share_the_cpus(micro_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_dsv4 import flags
    from llama_dsv4.server.settings import parse_args
    from llama_dsv4.server.slots import load_slots

    monkeypatch.setattr(flags, "usable_cpus", lambda: 8)
    monkeypatch.setattr(flags, "physical_cores", lambda: 8)
    s = parse_args(["-m", micro_path, "-np", "4"], env={})  # continuous batching: one context computes for all
    assert (s.n_threads, s.n_threads_batch) == (8, 8) and not any("--threads" in n for n in s.notes)
    s = parse_args(["-m", micro_path, "-np", "4", "-nocb"], env={})  # a context per slot: they share the CPUs
    assert (s.n_threads, s.n_threads_batch) == (2, 2) and not any("--threads" in n for n in s.notes)
    s = parse_args(["-m", micro_path, "-np", "2", "-nocb", "-t", "6", "-tb", "3"], env={})
    assert (s.n_threads, s.n_threads_batch) == (4, 3)
    assert any("--threads=6 in each of 2 slots" in n and "using 4 per slot" in n for n in s.notes), s.notes
    s = parse_args(["-m", micro_path, "-t", "1000000"], env={})
    assert s.n_threads == 8 and any("--threads=1000000 is more than the 8 CPUs" in n for n in s.notes)
    monkeypatch.undo()

    # the real thing: four slots never start more compute threads than this process has CPUs
    usable = cpus.usable_cpus()
    before = tasks()
    s = parse_args(["-m", micro_path, "-np", "4", "-nocb", "-c", "256", "-t", "64", "-tb", "64"], env={})
    slots, _ = load_slots(s)
    try:
        pools = [llm._ctx.backends.pool_threads for llm, _ in slots]
        assert pools == [max(1, usable // 4)] * 4
        assert sum(pools) <= max(usable, 4)  # one each when there are more slots than CPUs
        assert len(tasks() - before) <= usable  # ggml's threads (each slot's own thread is the pool's first)
    finally:
        for llm, _ in slots:
            llm.close()
    # with continuous batching the four slots are the sequences of one context, which has the CPUs' threads
    s = parse_args(["-m", micro_path, "-np", "4", "-c", "256", "-t", "64", "-tb", "64"], env={})
    slots, _ = load_slots(s)
    try:
        assert len({id(llm._ctx) for llm, _ in slots}) == 1 and slots[0][0].n_seq_max == 4
        assert slots[0][0]._ctx.backends.pool_threads == usable
        assert len(tasks() - before) <= usable
    finally:
        for llm, _ in reversed(slots):
            llm.close()


def test_cli_clamps_threads_with_a_note(micro_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llama_dsv4.cli import main as cli_main

    usable = cpus.usable_cpus()
    args = ["-m", micro_path, "-p", "1 2 3", "-n", "2", "-t", str(2**40), "-tb", "-5", "--no-preload", "--temp", "0"]
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert f"--threads={2**40} is more than the {usable} CPUs this process may use: using {usable}" in err, err
    assert f"threads {usable}" in err
