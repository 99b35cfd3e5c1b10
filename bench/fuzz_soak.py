"""Soak the GGUF fuzzer (issue 9): N mutated tiny models through load_model and, where they load, Llama and one
decode step, in crash-isolating worker processes (tests/gguf_fuzz.py). Prints the inputs tried, outcomes, crashes,
hangs, non-ValueError rejections and the wall time; each finding's input is saved under --out.

    python bench/fuzz_soak.py                      # 20,000 cases from a fresh master seed
    python bench/fuzz_soak.py -n 100000 --seed 7 --workers 2 --out fuzz-findings
    python tests/gguf_fuzz.py --replay SEED INDEX  # rerun one case in-process

Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import gguf_fuzz as gf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--cases", type=int, default=20000, help="inputs to try (default 20000)")
    ap.add_argument("--seed", type=int, default=None, help="master seed (default: from the clock, printed)")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take before it is a hang")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--out", default="fuzz-findings", help="where findings' inputs are saved")
    args = ap.parse_args()
    master = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    print(f"fuzzing {args.cases} cases from master seed {master} with {args.workers} workers", flush=True)

    def progress(r: gf.Report) -> None:
        print(
            f"  {r.tried} tried in {r.wall:.0f} s: crashes {r.count('crash')}, hangs {r.count('hang')}, "
            f"errors {r.count('error')}",
            flush=True,
        )

    report = gf.run_fuzz(
        args.cases,
        master=master,
        start=args.start,
        n_workers=args.workers,
        timeout=args.timeout,
        out_dir=os.path.abspath(args.out),
        time_budget=args.seconds,
        progress=progress,
        progress_every=60.0,
    )
    print(report.summary())
    print(f"inputs tried: {report.tried}")
    print(f"crashes: {report.count('crash')}")
    print(f"hangs: {report.count('hang')}")
    print(f"non-ValueError (or unclear) rejections: {report.count('error')}")
    print(f"wall time: {report.wall:.1f} s")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
