"""Shared fixtures: tiny deepseek4 files written once per session by our own writer."""

from __future__ import annotations

import os

import llama_cpp_sdist
import numpy as np
import pytest

from llama_dsv4 import LogitsProcessorList
from llama_dsv4.model.params import DSV4Params
from llama_dsv4.model.writer import write_model

# A model smaller than the tiny one of docs/architecture.md §15.1 (every layer kind, hash and biased routing,
# G = 2), for tests that only need a valid file quickly.
MICRO = DSV4Params(
    n_embd=64,
    n_head=2,
    head_dim=64,
    rope_dim=16,
    q_lora_rank=32,
    o_group_count=2,
    o_lora_rank=16,
    indexer_n_head=1,
    indexer_head_dim=64,
    n_expert=4,
    n_expert_used=2,
    expert_ff=64,
)

# A tool whose arguments constrained decoding can fill in completely (an enum and a bounded integer, both required).
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}


def forced(ids: list[int]) -> LogitsProcessorList:
    """A logits processor that makes greedy decoding produce `ids` (then keeps repeating the last)."""
    state = {"i": 0}

    def proc(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.full_like(scores, -1e9)
        out[ids[min(state["i"], len(ids) - 1)]] = 0
        state["i"] += 1
        return out

    return LogitsProcessorList([proc])


# Child Python processes must import the installed package, not the source tree (which has no compiled
# extension in a fresh clone): never put the working directory first on their sys.path (Python 3.11+) ...
os.environ["PYTHONSAFEPATH"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _cwd_outside_the_source_tree(tmp_path_factory: pytest.TempPathFactory) -> None:
    """... and run the whole session from a scratch directory (children inherit it; Python 3.10 too)."""
    os.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def micro_path(model_dir: str) -> str:
    return write_model(os.path.join(model_dir, "micro-f32.gguf"), MICRO, dtype="f32")[0]


@pytest.fixture(scope="session")
def tiny_paths(model_dir: str) -> dict[str, str]:
    """The tiny model (docs/architecture.md §15.1) in each dtype variant, small vocabulary."""
    return {dt: write_model(os.path.join(model_dir, f"tiny-{dt}.gguf"), dtype=dt)[0] for dt in ("f32", "f16", "q8xq5")}


@pytest.fixture(scope="session")
def real_vocab_path(model_dir: str) -> str:
    """The micro model with the real DeepSeek V4 vocabulary (129280 tokens) and our chat template."""
    return write_model(os.path.join(model_dir, "micro-realvocab.gguf"), MICRO, vocab="real", dtype="f16")[0]


@pytest.fixture(scope="session")
def llama_cpp_sdist_path() -> str:
    """llama-cpp-python 0.3.36's sdist (tests/llama_cpp_sdist.py): downloaded once per machine; the tests that use it
    are skipped, with the reason, where the package registry cannot be reached (tried once per session)."""
    return llama_cpp_sdist.sdist_path()


# A chat template Python cannot compile (99 nested ifs: "too many levels of indentation"), which once made
# Llama(), the server and the CLI fail with a traceback; now the file's template is refused and ours used.
NESTED_IFS_TEMPLATE = "{% if messages %}" * 99 + "{{ messages[0].content }}" + "{% endif %}" * 99


@pytest.fixture(scope="session")
def hostile_template_path(model_dir: str) -> str:
    """The micro model with a chat template that cannot be used (NESTED_IFS_TEMPLATE)."""
    path = os.path.join(model_dir, "micro-hostile-template.gguf")
    return write_model(path, MICRO, dtype="f32", chat_template=NESTED_IFS_TEMPLATE)[0]
