"""The embedded demo model (llama_dsv4/data/demo-q8xq5.gguf, trained by train/, docs/demo-model.md): it loads from
the install with no download, our greedy continuations equal llama.cpp's on it (reference tokens committed in
tests/data/demo_model_ref.json, written by `python -m train.compare_llama_cpp ... --write-reference`), and it has
the skills it was trained for on problems held out of its training data: worked addition and subtraction, tool
calls it chooses itself (tool_choice auto, no grammar), JSON that parses."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import pytest

from llama_dsv4 import Llama
from llama_dsv4.demo import DEMO_NAME_PREFIX, DEMO_TOOLS, demo_model_path

REF = os.path.join(os.path.dirname(__file__), "data", "demo_model_ref.json")

# held out of the training data (train/data.py: `heldout()` of the problem, and cities never named in training);
# test_problems_are_held_out checks it against the recipe
ARITH = [(337, "+", 836), (374, "+", 783), (411, "+", 889), (641, "-", 216), (682, "-", 419), (600, "-", 245)]
TOOL_REQUESTS = [  # held out: currency problems by hash (the held-out real cities it mostly cannot copy: docs)
    ("Convert 390 JPY to AUD.", "convert_currency", {"amount": 390, "from": "JPY", "to": "AUD"}),
    ("How much is 120 GBP in CHF?", "convert_currency", {"amount": 120, "from": "GBP", "to": "CHF"}),
    ("What is 207 JPY in INR?", "convert_currency", {"amount": 207, "from": "JPY", "to": "INR"}),
    ("Please convert 920 SEK into JPY.", "convert_currency", {"amount": 920, "from": "SEK", "to": "JPY"}),
]
# JSON requests in the training phrasings (their slot values are not held out: what is checked is the format)
JSON_REQUESTS = [
    "Give me a JSON object for a person named Olga who is 41 years old and lives in Dublin.",
    "Reply with a JSON object describing a green kettle that costs 37 dollars.",
    'Return JSON with the key "numbers" holding the numbers from 3 to 7.',
]


@pytest.fixture(scope="module")
def demo() -> Any:
    llm = Llama(model_path=demo_model_path(), n_ctx=1024, n_batch=64, n_ubatch=64, n_threads=2, verbose=False)
    yield llm
    llm.close()


def test_the_demo_model_is_shipped_and_loads(demo: Llama) -> None:
    assert demo_model_path().startswith(os.path.dirname(os.path.abspath(__import__("llama_dsv4").__file__)))
    assert demo.metadata["general.name"].startswith(DEMO_NAME_PREFIX)
    assert demo.metadata["general.architecture"] == "deepseek4"
    assert demo.n_vocab() == 2048 and demo.token_eos() != demo.token_bos()
    assert int(demo.metadata["deepseek4.nextn_predict_layers"]) == 1  # the MTP layer is in the file
    assert "<｜Assistant｜>" in demo.metadata["tokenizer.chat_template"] or demo.metadata["tokenizer.chat_template"]


def test_greedy_continuations_equal_llama_cpp(demo: Llama) -> None:
    with open(REF, encoding="utf-8") as f:
        ref = json.load(f)
    with open(demo_model_path(), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert sha == ref["model_sha256"], "the demo model changed: regenerate tests/data/demo_model_ref.json"
    assert len(ref["cases"]) >= 6
    for case in ref["cases"]:
        demo.reset()
        out = []
        for tok in demo.generate(case["prompt"], temp=0.0, reset=True):
            out.append(tok)
            if len(out) == ref["n"] or tok == demo.token_eos():
                break
        assert out == case["llama_cpp_greedy"][: len(out)], case["messages"]
        assert len(out) == len(case["llama_cpp_greedy"]) or out[-1] == demo.token_eos()


def last_int(text: str) -> int | None:
    found = re.findall(r"-?\d+", text)
    return int(found[-1]) if found else None


def test_problems_are_held_out() -> None:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from train import data

    assert all(data.heldout(*p) for p in ARITH)
    for _, name, args in TOOL_REQUESTS:
        if name == "get_weather":
            assert args["city"] in data.HELDOUT_CITIES
        else:
            assert data.tool_is_heldout(("currency", args["amount"], args["from"], args["to"]))


def test_arithmetic(demo: Llama) -> None:
    right = 0
    for a, op, b in ARITH:
        r = demo.create_chat_completion(
            messages=[{"role": "user", "content": f"What is {a} {op} {b}?"}], temperature=0, max_tokens=160
        )
        right += last_int(r["choices"][0]["message"]["content"]) == (a + b if op == "+" else a - b)
    assert right >= len(ARITH) - 1, right


def test_tool_calls_chosen_by_the_model(demo: Llama) -> None:
    right = 0
    for q, name, args in TOOL_REQUESTS:
        r = demo.create_chat_completion(
            messages=[{"role": "user", "content": q}], tools=DEMO_TOOLS, tool_choice="auto", temperature=0
        )
        calls = r["choices"][0]["message"].get("tool_calls") or []
        right += (
            bool(calls)
            and calls[0]["function"]["name"] == name
            and json.loads(calls[0]["function"]["arguments"]) == args
        )
    assert right >= len(TOOL_REQUESTS) - 1, right


def test_json_answers_parse(demo: Llama) -> None:
    for q in JSON_REQUESTS:
        r = demo.create_chat_completion(messages=[{"role": "user", "content": q}], temperature=0, max_tokens=120)
        assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
