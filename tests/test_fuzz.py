"""Fuzzed model files (issue 9): thousands of mutated tiny models through load_model and, when they load, Llama and
one decode step, each in a worker process, so that a crash or a hang fails the test with the input saved.

The CI batch runs as many cases as fit in LLAMA_DSV4_FUZZ_SECONDS (default 60) up to LLAMA_DSV4_FUZZ_CASES
(default 20000) from the fixed master seed LLAMA_DSV4_FUZZ_SEED (default 0); set LLAMA_DSV4_FUZZ_OUT to keep the
inputs of findings. `python bench/fuzz_soak.py` runs longer soaks. The machinery is tests/gguf_fuzz.py.
"""

from __future__ import annotations

import os

import gguf_fuzz as gf
import pytest

CASES = int(os.environ.get("LLAMA_DSV4_FUZZ_CASES", "20000"))
SECONDS = float(os.environ.get("LLAMA_DSV4_FUZZ_SECONDS", "60"))
MASTER = int(os.environ.get("LLAMA_DSV4_FUZZ_SEED", "0"))
WORKERS = int(os.environ.get("LLAMA_DSV4_FUZZ_WORKERS", str(min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("fuzz-seeds"))
    gf.write_seeds(d)
    return d


def test_seeds_load_and_decode(seed_dir: str) -> None:
    """Every unmutated seed is a valid model that decodes: rejections of mutants are due to the mutations."""
    seeds = gf.load_seeds(seed_dir)
    assert len(seeds) == 5 and any(s.split for s in seeds.values())
    for name, s in seeds.items():
        for shard in range(len(s.files)):  # any shard opens a split set
            assert gf.run_file(os.path.join(seed_dir, name, s.files[shard]), chat=True) == ("ok", ""), name
        lay = s.layouts[0]
        assert lay.data and lay.tensor_records and lay.header_end < lay.size


def test_mutator_is_deterministic_and_covers_the_container(seed_dir: str) -> None:
    seeds = gf.load_seeds(seed_dir)
    cases = [gf.gen_case(seeds, 11, i) for i in range(600)]
    again = [gf.gen_case(seeds, 11, i) for i in range(600)]
    assert [c.to_json() for c in cases] == [c.to_json() for c in again]
    assert [gf.apply_ops(seeds, c) for c in cases[:50]] == [gf.apply_ops(seeds, c) for c in again[:50]]
    assert {c.seed for c in cases} == set(seeds)
    text = " ".join(c.description for c in cases)
    for what in (
        "str_len",
        "arr_count",
        "n_dims",
        "dim of",
        "ttype",
        "toffset",
        "n_tensors",
        "n_kv",
        "vtype",
        "general.alignment",
        "bit flip",
        "truncated",
        "inserted at",
        "deleted at",
        "tensor info",
        "shard",
        "value of split.",
        "tid2eid",
    ):
        assert what in text, what
    # every mutated case differs from its seed
    for c in cases[:100]:
        assert gf.apply_ops(seeds, c) != list(seeds[c.seed].blobs), c.description


def test_the_harness_catches_crashes_hangs_and_errors(
    seed_dir: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that abort, abort only after other cases, hang, or report an error are each caught, attributed
    to their case, and the case's input is saved."""
    monkeypatch.setenv("LLAMA_DSV4_FUZZ_CANARY", "crash=3,flaky=6,hang=9,error=12")
    r = gf.run_fuzz(16, master=5, n_workers=1, timeout=3, out_dir=str(tmp_path), seed_dir=seed_dir)
    assert r.tried == 16
    found = {f.index: f for f in r.findings}
    assert {i: f.kind for i, f in found.items()} == {3: "crash", 6: "crash", 9: "hang", 12: "error"}
    assert "signal 6" in found[3].detail and "reproduced alone" in found[3].detail
    assert "needs the cases before it" in found[6].detail and "[4, 5]" in found[6].detail
    for f in r.findings:
        assert os.path.isfile(f.saved) and os.path.isfile(os.path.join(os.path.dirname(f.saved), "case.json"))
    assert "crashes 2, hangs 1" in r.summary()


def test_fuzzed_models_are_rejected_cleanly_or_decoded(seed_dir: str, tmp_path: os.PathLike[str]) -> None:
    out = os.environ.get("LLAMA_DSV4_FUZZ_OUT") or str(tmp_path)
    r = gf.run_fuzz(
        CASES, master=MASTER, n_workers=WORKERS, timeout=30, out_dir=out, seed_dir=seed_dir, time_budget=SECONDS
    )
    print("\n" + r.summary())
    assert not r.findings, r.summary()
    assert r.tried >= min(CASES, 1000), r.summary()
    # the mutations must leave enough models loadable to exercise decoding, and reach many different checks
    assert r.outcomes["ok"] >= 0.05 * r.tried, r.summary()
    assert len(r.rejections) >= 60, r.summary()
