"""Plot a training's loss curves, over its phases:
`python -m train.plot run1/loss.csv run2/loss.csv --png docs/demo-model-loss.png --csv docs/demo-model-loss.csv`
(the phases' rows one after another, steps, tokens and seconds counted from the start of the first; the CSV gets a
`phase` column; a run that switched its data within itself, `train.train --until/--then`, brings its own phases).
"""

from __future__ import annotations

import argparse
import csv
import itertools
from typing import Any


def merged(paths: list[str]) -> list[dict[str, Any]]:
    """The rows of each phase's loss.csv, their step, tokens and seconds continuing from the previous phase's (and
    the phases of a file that has a `phase` column numbered on from the previous file's)."""
    out: list[dict[str, Any]] = []
    base = {"step": 0, "tokens": 0, "seconds": 0.0}
    phases = 0
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        first = phases
        for r in rows:
            phases = first + int(r.get("phase") or 1)
            out.append({**r, "phase": phases, "step": base["step"] + int(r["step"]),
                        "tokens": base["tokens"] + int(r["tokens"]),
                        "seconds": round(base["seconds"] + float(r["seconds"]), 1)})  # fmt: skip
        if out:
            base = {"step": out[-1]["step"], "tokens": out[-1]["tokens"], "seconds": out[-1]["seconds"]}
    return out


def plot(rows: list[dict[str, Any]], png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [int(r["tokens"]) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("main", "main head (next token)"), ("mtp", "MTP head (next-next token)"),
                       ("indexer", "lightning indexer KL")):  # fmt: skip
        ax.plot(tokens, [float(r[key]) for r in rows], label=label)
    for prev, r in itertools.pairwise(rows):
        if r["phase"] != prev["phase"]:
            ax.axvline(int(prev["tokens"]) / 1e6, color="gray", linestyle="--", linewidth=1)
    phases = len({r["phase"] for r in rows})
    ax.set_xlabel("training tokens (millions)" + ("; dashed: the next phase's data mixture" if phases > 1 else ""))
    ax.set_ylabel("loss on the trained tokens (nats)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("llama-dsv4 demo deepseek4: training loss (train/train.py)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csvs", nargs="+", help="each phase's loss.csv, in order")
    ap.add_argument("--png", required=True)
    ap.add_argument("--csv", help="write the merged rows here")
    a = ap.parse_args()
    rows = merged(a.csvs)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            columns = list(dict.fromkeys(["phase", *(k for r in rows for k in r)]))  # every file's, first seen first
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
    plot(rows, a.png)


if __name__ == "__main__":
    main()
