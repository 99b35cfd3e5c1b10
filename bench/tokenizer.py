"""Tokenizer throughput (MB of text per second) of llama-dsv4 next to llama-cpp-python on the real DeepSeek V4
vocabulary, on the tokenizer test corpus repeated to ~4 MB.

    python bench/tokenizer.py [--oracle-python $(tools/oracle/setup.sh)]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from tokenizer_corpus import texts  # noqa: E402

from llama_dsv4.model.loader import load_model  # noqa: E402
from llama_dsv4.model.params import DSV4Params  # noqa: E402
from llama_dsv4.model.writer import write_model  # noqa: E402
from llama_dsv4.tokenizer import DSV4Tokenizer  # noqa: E402

ORACLE_SNIPPET = """
import sys, time, json, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
docs = [d.encode() for d in json.load(open(sys.argv[2], encoding="utf-8"))]
best = 1e9
for _ in range(3):
    t = time.perf_counter()
    for d in docs:
        llm.tokenize(d, add_bos=False, special=False)
    best = min(best, time.perf_counter() - t)
print(best)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oracle-python")
    a = ap.parse_args()
    corpus = texts()
    doc = "\n".join(corpus)
    docs = [doc[i : i + 4096] for i in range(0, len(doc), 4096)] * 8
    mb = sum(len(d.encode()) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(os.path.join(tmp, "v.gguf"), DSV4Params(n_embd=256), vocab="real", dtype="f16")[0]
        with load_model(path) as m:
            t0 = time.perf_counter()
            tok = DSV4Tokenizer(m.vocab)
            build = time.perf_counter() - t0
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            for d in docs:
                tok.tokenize(d.encode(), add_bos=False)
            best = min(best, time.perf_counter() - t)
        rows = [("llama-dsv4 (HF tokenizers)", mb / best)]
        if a.oracle_python:
            with open(os.path.join(tmp, "docs.json"), "w", encoding="utf-8") as f:
                json.dump(docs, f, ensure_ascii=False)
            r = subprocess.run(
                [a.oracle_python, "-c", ORACLE_SNIPPET, path, os.path.join(tmp, "docs.json")],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(("llama-cpp-python 0.3.36", mb / float(r.stdout.split()[-1])))
    print(
        f"tokenize {mb:.1f} MB of mixed text (corpus of tests/tokenizer_corpus.py), 1 thread, best of 3; "
        f"vocabulary built in {build:.2f} s"
    )
    print(f"{'engine':28s} {'MB/s':>8s} {'ratio':>7s}")
    for name, speed in rows:
        print(f"{name:28s} {speed:8.2f} {speed / rows[0][1]:6.2f}x")


if __name__ == "__main__":
    main()
