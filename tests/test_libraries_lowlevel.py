"""Libraries that drive llama-cpp-python's low-level API, run unchanged on llama-dsv4 through the `llama_cpp` alias
(installed from PyPI at test time, pinned; tests/pypi_packages.py): guidance's llama.cpp engine (llama_batch_init,
llama_decode, llama_get_logits, llama_get_memory / llama_memory_seq_rm, and llguidance's tokenizer built with
llama_token_to_piece, llama_token_get_attr and the C function `_lib.llama_tokenize`) and outlines' llamacpp model
(llama_model_get_vocab and llama_token_to_piece for its vocabulary; generation through Llama with its logits
processor). Each runs the library's own usage: free text, and regex-, choice- and JSON-constrained generation that
must come out matching on a random-weight model."""

from __future__ import annotations

import json

from pypi_packages import run_python, site_dir

GUIDANCE = ("guidance==0.3.1",)  # pins llguidance 1.5.0, installed beside it
OUTLINES = ("outlines==1.3.3", "numba==0.68.1")  # outlines' llamacpp extra: its numpy kernels need numba

GUIDANCE_CODE = """
import json, re, sys
import llama_dsv4.compat; llama_dsv4.compat.install()
import llama_cpp
from guidance import models, gen, select

lm0 = models.LlamaCpp(sys.argv[1], n_ctx=256, echo=False)
engine = lm0._interpreter.engine
assert engine.model_obj.__class__ is llama_cpp.Llama
out = {}
lm = lm0 + "The answer is " + gen("num", regex=r"[0-9]{1,3}", max_tokens=5)
out["num"] = lm["num"]
lm = lm0 + "Pick a fruit: " + select(["apple", "banana", "cherry"], name="fruit")
out["fruit"] = lm["fruit"]
lm = lm0 + "Say something: " + gen("free", max_tokens=8)
out["free"] = lm["free"]
# a second turn on the same prefix: guidance reuses its cached tokens and cuts the rest (llama_memory_seq_rm)
lm = lm + " and then " + gen("more", regex=r"(yes|no)")
out["more"] = lm["more"]
out["n_tokens"] = engine.model_obj.n_tokens
print(json.dumps(out))
"""


def test_guidance_llamacpp_engine(real_vocab_path: str) -> None:
    r = run_python(GUIDANCE_CODE.replace("sys.argv[1]", repr(real_vocab_path)), site_dir(*GUIDANCE), timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["num"].isdigit() and 1 <= len(out["num"]) <= 3
    assert out["fruit"] in ("apple", "banana", "cherry")
    assert isinstance(out["free"], str) and out["free"]
    assert out["more"] in ("yes", "no")
    assert out["n_tokens"] > 0  # the engine decoded through Llama.ctx, which moved the Llama's own sequence


OUTLINES_CODE = """
import json, re, sys
from typing import Literal
import llama_dsv4.compat; llama_dsv4.compat.install()
import outlines
from llama_cpp import Llama
from outlines.types import Regex
from pydantic import BaseModel

llm = Llama(sys.argv[1], n_ctx=512, verbose=False)
model = outlines.from_llamacpp(llm, chat_mode=False)
vocab = model.tokenizer.vocabulary
assert len(vocab) > 120000 and model.tokenizer.eos_token_id == llm.token_eos(), (len(vocab), model.tokenizer.eos_token)
out = {"free": model("Hello", max_tokens=8)}
out["number"] = model("Number: ", Regex(r"[0-9]{2,4}"), max_tokens=8)
class Pick(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool
out["json"] = model("A JSON object: ", Pick, max_tokens=40)
Pick.model_validate_json(out["json"])
out["choice"] = model("Yes or no? ", Literal["yes", "no"], max_tokens=5)
out["stream"] = "".join(model.stream("Number: ", Regex(r"[0-9]{3}"), max_tokens=8))
chat = outlines.from_llamacpp(llm)  # chat mode: create_chat_completion with outlines' logits processor
out["chat"] = chat("Give me a number", Regex(r"[0-9]{2}"), max_tokens=6)
print(json.dumps(out))
"""


def test_outlines_llamacpp_model(real_vocab_path: str) -> None:
    r = run_python(OUTLINES_CODE.replace("sys.argv[1]", repr(real_vocab_path)), site_dir(*OUTLINES), timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out["free"], str) and out["free"]
    assert out["number"].isdigit() and 2 <= len(out["number"]) <= 4
    parsed = json.loads(out["json"])
    assert parsed["color"] in ("red", "green", "blue") and isinstance(parsed["ok"], bool) and len(parsed) == 2
    assert out["choice"] in ("yes", "no")
    assert out["stream"].isdigit() and len(out["stream"]) == 3
    assert out["chat"].isdigit() and len(out["chat"]) == 2
