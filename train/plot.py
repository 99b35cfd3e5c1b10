"""Plot a run's loss curves: `python -m train.plot RUN/loss.csv docs/demo-model-loss.png`."""

from __future__ import annotations

import csv
import sys


def plot(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = [int(r["tokens"]) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("main", "main head (next token)"), ("mtp", "MTP head (next-next token)"),
                       ("indexer", "lightning indexer KL")):  # fmt: skip
        ax.plot(tokens, [float(r[key]) for r in rows], label=label)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("llama-dsv4 demo deepseek4: training loss (train/train.py)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
