"""Chat for DeepSeek V4: prompts as the official encoding renders them, reasoning and tool-call parsing (whole and
streamed, malformed markup kept as content), constrained decoding that always parses and validates, the template
sandbox, handler resolution, and LangChain's ChatLlamaCpp with tools and structured output."""

from __future__ import annotations

import json
import os
import random
import time
import warnings

import pytest
from conftest import MICRO, NESTED_IFS_TEMPLATE, WEATHER, forced

from llama_dsv4 import Llama, LlamaGrammar, LogitsProcessorList
from llama_dsv4.chat.parser import OutputParser, parse
from llama_dsv4.chat.registry import LlamaChatCompletionHandlerNotFoundException
from llama_dsv4.chat.template import MAX_SOURCE
from llama_dsv4.model.gguf_write import string
from llama_dsv4.model.writer import write_model

jsonschema = pytest.importorskip("jsonschema")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOOLS = [WEATHER]
CALL_TEXT = (
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


@pytest.fixture(scope="module")
def llm(real_vocab_path: str) -> Llama:
    return Llama(real_vocab_path, n_ctx=2048, verbose=False, n_threads=1, n_threads_batch=1, seed=11)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    """The micro model with the 512-token vocabulary: fast enough for many constrained generations."""
    path = write_model(os.path.join(tmp_path_factory.mktemp("chat"), "small.gguf"), MICRO, dtype="f32", seed=3)[0]
    return Llama(path, n_ctx=4096, verbose=False, n_threads=1, n_threads_batch=1, seed=5)


def prompt_of(llm: Llama, monkeypatch: pytest.MonkeyPatch, **kw: object) -> str:
    """The prompt create_chat_completion renders (its tokens, decoded with special tokens)."""
    seen = {}
    orig = llm.create_completion

    def spy(prompt: list[int], **k: object) -> object:
        seen["prompt"] = llm.detokenize(prompt, special=True).decode()
        return orig(prompt, **{**k, "max_tokens": 1})

    monkeypatch.setattr(llm, "create_completion", spy)
    llm.create_chat_completion(**kw)
    monkeypatch.undo()
    return seen["prompt"]


def say(llm: Llama, text: str) -> LogitsProcessorList:
    """Make greedy decoding write `text`, then stop."""
    return forced([*llm.tokenize(text.encode(), special=False), llm.token_eos()])


# ---------------------------------------------------------------------------------------------- rendering


def test_prompts_follow_the_official_encoding(llm: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    u = [{"role": "user", "content": "Hi"}]
    assert prompt_of(llm, monkeypatch, messages=u) == f"{BOS}<｜User｜>Hi<｜Assistant｜></think>"
    assert prompt_of(llm, monkeypatch, messages=u, thinking=True) == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>"
    assert prompt_of(llm, monkeypatch, messages=u, chat_template_kwargs={"enable_thinking": True}).endswith("<think>")
    sys2 = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."}, *u]
    assert prompt_of(llm, monkeypatch, messages=sys2) == f"{BOS}A.\n\nB.<｜User｜>Hi<｜Assistant｜></think>"
    multi = [
        *u,
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "And?"},
    ]
    assert prompt_of(llm, monkeypatch, messages=multi) == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Hello!{EOS}<｜User｜>And?<｜Assistant｜></think>"
    )
    # thinking on: earlier turns' reasoning is dropped, as the official encoder does by default
    assert prompt_of(llm, monkeypatch, messages=multi, thinking=True) == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Hello!{EOS}<｜User｜>And?<｜Assistant｜><think>"
    )
    effort = prompt_of(llm, monkeypatch, messages=u, thinking=True, reasoning_effort="max")
    assert effort.startswith(f"{BOS}Reasoning Effort: Absolute maximum")


def test_tool_definitions_calls_and_results_render(llm: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                }
            ],
        },  # a JSON string, as OpenAI sends
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    p = prompt_of(llm, monkeypatch, messages=history, tools=TOOLS)
    assert p.startswith(f"{BOS}## Tools\n\n") and json.dumps(TOOLS[0]["function"], ensure_ascii=False) in p
    assert p.endswith(
        f"<｜User｜>Weather in Paris?<｜Assistant｜></think>\n\n{CALL_TEXT}{EOS}"
        "<｜User｜><tool_result>sunny</tool_result><｜Assistant｜></think>"
    )
    none = prompt_of(llm, monkeypatch, messages=history[:1], tools=TOOLS, tool_choice="none")
    assert "## Tools" not in none


def test_response_format_is_announced_in_the_prompt(llm: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    p = prompt_of(
        llm,
        monkeypatch,
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert "## Response Format:" in p and json.dumps(schema) in p


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("step", [1, 2, 5, 11, 10_000])
def test_parser_splits_reasoning_content_and_calls_in_any_chunking(step: int) -> None:
    text = "Let me see.</think>Checking.\n\n" + CALL_TEXT
    p = OutputParser(thinking=True, tools=True)
    events = []
    for i in range(0, len(text), step):
        events += p.feed(text[i : i + step])
    events += p.finish()
    assert "".join(v for k, v in events if k == "reasoning") == "Let me see."
    assert "".join(v for k, v in events if k == "content") == "Checking."
    assert [v for k, v in events if k == "tool_call"] == [("get_weather", {"city": "Paris", "days": 2})]


@pytest.mark.parametrize(
    "bad",
    [
        CALL_TEXT.replace('string="false">2', 'string="false">{2'),  # invalid JSON value
        CALL_TEXT.replace("</｜DSML｜invoke>", ""),  # unterminated invoke
        CALL_TEXT[:60],  # cut off
        CALL_TEXT.replace('string="true"', 'string="maybe"'),  # unknown attribute value
        "<｜DSML｜tool_calls>\nnot markup\n</｜DSML｜tool_calls>",
    ],
)
def test_malformed_markup_is_content(bad: str) -> None:
    reasoning, content, calls = parse("Answer: " + bad, thinking=False, tools=True)
    assert calls == [] and content == "Answer: " + bad and reasoning is None


TWO_CALLS = CALL_TEXT.replace("</｜DSML｜tool_calls>", CALL_TEXT.split("\n", 1)[1])  # one block, two invokes


@pytest.mark.parametrize("at", [3, 40, 120, len(CALL_TEXT) - 25, len(CALL_TEXT) + 60, len(TWO_CALLS) - 5])
def test_markup_cut_by_max_tokens_is_dropped(at: int) -> None:
    """An answer cut inside the tool-calls block (or its opening marker) keeps the calls completed before the cut
    and shows none of the unfinished markup as content."""
    text = "Answer. " + TWO_CALLS[:at]
    for step in (1, 7, len(text)):
        p = OutputParser(thinking=False, tools=True)
        events = [e for i in range(0, len(text), step) for e in p.feed(text[i : i + step])] + p.finish(cut=True)
        content = "".join(v for k, v in events if k == "content")
        calls = [v for k, v in events if k == "tool_call"]
        assert content == "Answer.", (at, step, content)
        assert len(calls) == TWO_CALLS[:at].count("</｜DSML｜invoke>"), (at, calls)


def test_cut_tool_calls_finish_with_length_and_parallel_false_keeps_one(llm: Llama) -> None:
    """OpenAI's contract: a tool call cut by max_tokens is finish_reason "length" with no markup in content (whole
    and streamed); parallel_tool_calls=False returns one call of a model that wrote two."""
    text = "Sure.\n\n" + TWO_CALLS
    cut = TWO_CALLS.index('<｜DSML｜parameter name="days"', len(CALL_TEXT))  # inside the second invoke
    n_cut = len(llm.tokenize(("Sure.\n\n" + TWO_CALLS[:cut]).encode(), add_bos=False, special=False))
    ask = dict(messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, temperature=0.0)
    r = llm.create_chat_completion(**ask, logits_processor=say(llm, text), max_tokens=n_cut)
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "Sure.", choice
    assert len(choice["message"]["tool_calls"]) == 1  # the call completed before the cut
    chunks = list(llm.create_chat_completion(**ask, logits_processor=say(llm, text), max_tokens=n_cut, stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == "Sure." and chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = llm.create_chat_completion(**ask, logits_processor=say(llm, text))
    assert (
        whole["choices"][0]["finish_reason"] == "tool_calls" and len(whole["choices"][0]["message"]["tool_calls"]) == 2
    )
    for stream in (False, True):
        one = llm.create_chat_completion(
            **ask, logits_processor=say(llm, text), parallel_tool_calls=False, stream=stream
        )
        if stream:
            calls = [t for c in one for t in c["choices"][0]["delta"].get("tool_calls") or []]
        else:
            calls = one["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather"], calls


def test_reasoning_format_none_keeps_raw_text() -> None:
    assert parse("why</think>because", thinking=True, tools=False, raw=True) == (None, "why</think>because", [])
    assert parse("<think>why</think>because", thinking=False, tools=False) == ("why", "because", [])


def test_tool_calls_from_model_text(llm: Llama) -> None:
    text = "Thinking hard.</think>Sure.\n\n" + CALL_TEXT
    r = llm.create_chat_completion(
        [{"role": "user", "content": "Weather?"}],
        tools=TOOLS,
        thinking=True,
        logits_processor=say(llm, text),
        temperature=0.0,
    )
    (choice,) = r["choices"]
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and msg["content"] == "Sure."
    assert msg["reasoning_content"] == "Thinking hard."
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris",
        "days": 2,
    }
    chunks = list(
        llm.create_chat_completion(
            [{"role": "user", "content": "Weather?"}],
            tools=TOOLS,
            thinking=True,
            logits_processor=say(llm, text),
            temperature=0.0,
            stream=True,
        )
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Thinking hard."
    assert "".join(d.get("content", "") or "" for d in deltas) == "Sure."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0] and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)


def test_plain_chat_shapes(llm: Llama) -> None:
    r = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert set(r["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert r["choices"][0]["message"]["role"] == "assistant" and isinstance(r["choices"][0]["message"]["content"], str)
    assert r["usage"]["completion_tokens"] <= 4


# ---------------------------------------------------------------------------------------------- constrained


def test_required_and_named_tool_choice_always_parse(small: Llama) -> None:
    """As OpenAI spells a forced choice, and as LangChain's bind_tools does: "any" for required, a bare name."""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}, "any", "get_weather"):
        tools = [WEATHER]
        for seed in range(3):
            r = small.create_chat_completion(
                [{"role": "user", "content": "?"}], tools=tools, tool_choice=choice, temperature=1.0, seed=seed
            )
            msg = r["choices"][0]["message"]
            assert r["choices"][0]["finish_reason"] == "tool_calls", msg
            for call in msg["tool_calls"]:
                assert call["function"]["name"] == "get_weather"
                jsonschema.validate(json.loads(call["function"]["arguments"]), tools[0]["function"]["parameters"])
    with pytest.raises(ValueError, match=r"the name of one of the tools \['get_weather'\], got 'multiply'"):
        small.create_chat_completion([{"role": "user", "content": "?"}], tools=tools, tool_choice="multiply")


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema as clients write them: objects mostly without additionalProperties, integers and numbers mostly
    without bounds, arrays without maxItems; strings bounded (maxLength, pattern, format or enum), as a free
    string is as long as the model makes it (sampling/json_limits.py)."""
    kinds = ["integer", "number", "boolean", "enum", "string", "nullable", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer"} if rng.random() < 0.6 else {"type": "integer", "minimum": lo, "maximum": lo + 99}
    if kind == "number":
        return {"type": "number"} if rng.random() < 0.8 else {"type": "number", "minimum": 0, "maximum": 1}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x y", "ünï", "Ω"], rng.randint(1, 4))}
    if kind == "string":
        return [
            {"type": "string", "maxLength": rng.randint(0, 6)},
            {"type": "string", "pattern": "^[a-z]{1,8}$"},
            {"type": "string", "format": "date"},
        ][rng.randint(0, 2)]
    if kind == "nullable":
        return {"anyOf": [random_schema(rng, depth + 1), {"type": "null"}]}
    if kind == "array":
        items = {"type": "array", "items": random_schema(rng, depth + 1)}
        return items if rng.random() < 0.6 else {**items, "maxItems": rng.randint(0, 3)}
    n = rng.randint(1, 4)
    props = {f"k{i}_{rng.choice('abcxyz')}": random_schema(rng, depth + 1) for i in range(n)}
    obj = {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, n))}
    return obj if rng.random() < 0.75 else {**obj, "additionalProperties": False}


def fifty_random_schemas() -> list[dict]:
    rng = random.Random(2026)
    out = []
    for _ in range(50):
        schema = random_schema(rng)
        wrapped = {"type": "object", "properties": {"v": schema}, "required": ["v"]}
        out.append(schema if schema.get("type") == "object" else wrapped)
    return out


@pytest.mark.parametrize("model", ["small", "llm"])
def test_fifty_random_schemas_end_and_validate(model: str, request: pytest.FixtureRequest) -> None:
    """Issue 14 item 5: undeclared keys and runaway digits kept a random model writing until max_tokens: before
    sampling/json_limits.py, 38 of these 50 closed on `small` and 16 of 50 with the real vocabulary."""
    llama = request.getfixturevalue(model)
    for i, schema in enumerate(fifty_random_schemas()):
        fmt = (
            {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
            if i % 2
            else {"type": "json_object", "schema": schema}
        )
        r = llama.create_chat_completion(
            [{"role": "user", "content": "Answer in JSON."}],
            response_format=fmt,
            temperature=1.0,
            seed=i,
            max_tokens=200,
        )
        assert r["choices"][0]["finish_reason"] == "stop", (schema, r)
        jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)


def test_json_object_and_grammars(small: Llama) -> None:
    r = small.create_chat_completion(
        [{"role": "user", "content": "{}"}],
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1,
        max_tokens=None,
    )
    assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
    g = LlamaGrammar.from_string('root ::= "yes" | "no" | "maybe"')
    out = small("Answer:", grammar=g, temperature=1.0, max_tokens=10)
    assert out["choices"][0]["text"] in ("yes", "no", "maybe")
    js = LlamaGrammar.from_json_schema(
        json.dumps({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "maxItems": 4})
    )
    out = small("List:", grammar=js, temperature=1.0, max_tokens=50)
    arr = json.loads(out["choices"][0]["text"])
    assert isinstance(arr, list) and len(arr) <= 4 and all(0 <= x <= 3 for x in arr)
    with pytest.raises(ValueError, match="invalid GBNF"):
        LlamaGrammar.from_string("root ::= (")
    with pytest.raises(ValueError, match="json_schema needs"):
        small.create_chat_completion([{"role": "user", "content": "x"}], response_format={"type": "json_schema"})


# ---------------------------------------------------------------------------------------------- sandbox, handlers


PAYLOADS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__['os'] }}",
    "{{ lipsum.__globals__['os'].system('touch /tmp/pwned') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__ }}",
    "{% for x in range(10**9) %}{% endfor %}",
    "{{ 'a' * 10**10 }}",
    "{% set l = [] %}{{ l.append(1) }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_template_injection_cannot_reach_python(payload: str, tmp_path: os.PathLike[str]) -> None:
    path = write_model(os.path.join(tmp_path, "evil.gguf"), MICRO, chat_template=payload + "{{ messages[0].content }}")[
        0
    ]
    with pytest.warns(RuntimeWarning) if False else open(os.devnull) as _:
        evil = Llama(path, n_ctx=64, verbose=False, n_threads=1, n_threads_batch=1)
    with pytest.raises(ValueError, match="chat template"):
        evil.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)
    assert not os.path.exists("/tmp/pwned")


UNUSABLE_TEMPLATES = {
    "4 MB": "{% if messages %}a{% endif %}" * 140_000 + "{{ messages[0].content }}",  # took 40 s and 2.3 GB
    "99 nested ifs": NESTED_IFS_TEMPLATE,  # raised IndentationError out of Llama(), even with chat_format
    "broken": "{% for %}",
}


@pytest.mark.parametrize("name", UNUSABLE_TEMPLATES)
def test_a_files_unusable_template_is_replaced_by_ours(name: str, tmp_path: os.PathLike[str]) -> None:
    path = write_model(os.path.join(tmp_path, "m.gguf"), MICRO, dtype="f32", chat_template=UNUSABLE_TEMPLATES[name])[0]
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="chat template.*using llama-dsv4's DeepSeek V4 template"):
        llm = Llama(path, n_ctx=256, verbose=False)
    assert time.perf_counter() - t0 < 10 and llm.chat_format == "deepseek-v4"
    assert llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)["choices"]
    # asked for ours: the file's template is not even compiled, so nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = Llama(path, n_ctx=256, verbose=False, chat_format="deepseek-v4")
    assert ours.chat_format == "deepseek-v4"
    # asked for the file's: its failure is the call's, a ValueError
    theirs = Llama(path, n_ctx=256, verbose=False, chat_format="chat_template.default")
    with pytest.raises(ValueError, match="chat template"):
        theirs.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)


def test_the_files_templates_come_whole_from_its_metadata(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's templates are read from Llama.metadata (GGUF string metadata): the default one and the named ones
    (tokenizer.chat_template.NAME), whole however long (llama-cpp-python reads metadata through a 1 KiB buffer
    first); a named one beyond the template bound is registered and refused when used."""
    default = "{#" + "d" * 100_000 + "#}[{{ messages[0].content }}]"
    too_long = "{#" + "n" * MAX_SOURCE + "#}"
    named = [string("tokenizer.chat_template.tool_use", "<{{ messages[0].content }}>")]
    named.append(string("tokenizer.chat_template.rag", too_long))
    path = write_model(os.path.join(tmp_path, "m.gguf"), MICRO, dtype="f32", chat_template=default, extra_kv=named)
    llm = Llama(path[0], n_ctx=256, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == default
    assert llm.metadata["tokenizer.chat_template.rag"] == too_long
    hi = [{"role": "user", "content": "hi"}]
    assert llm.chat_format == "chat_template.default" and prompt_of(llm, monkeypatch, messages=hi) == "[hi]"
    llm.chat_format = "chat_template.tool_use"
    assert prompt_of(llm, monkeypatch, messages=hi) == "<hi>"
    llm.chat_format = "chat_template.rag"
    with pytest.raises(ValueError, match=f"{len(too_long)} characters long; at most {MAX_SOURCE}"):
        llm.create_chat_completion(hi, max_tokens=1)


def test_rendering_stops_at_what_the_context_can_hold(tmp_path: os.PathLike[str]) -> None:
    """A tiny template that prints 60 MB cost 61 s and 5.4 GB per chat call (mostly tokenizing it): rendering now
    stops once the text is longer than n_ctx tokens of the vocabulary's longest piece could be."""
    printer = "{% for i in range(60) %}{{ 'a' * 1000000 }}{% endfor %}{{ messages[0].content }}"
    path = write_model(os.path.join(tmp_path, "m.gguf"), MICRO, dtype="f32", chat_template=printer)[0]
    llm = Llama(path, n_ctx=256, verbose=False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="more than a context of 256 tokens can hold"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1)
    assert time.perf_counter() - t0 < 5  # it stops at 256 x the longest piece (29 bytes here)
    tok = llm.dsv4_tokenizer
    assert tok.max_token_bytes == max(len(tok.piece(i, special=True)) for i in range(tok.n_tokens))


def test_handler_resolution(llm: Llama, real_vocab_path: str) -> None:
    seen = {}

    def handler(**kw: object) -> dict:
        seen.update(kw)
        return {"ok": True}

    custom = Llama(real_vocab_path, n_ctx=64, verbose=False, n_threads=1, n_threads_batch=1, chat_handler=handler)
    assert custom.create_chat_completion([{"role": "user", "content": "x"}]) == {"ok": True}
    for key in (
        "llama",
        "messages",
        "functions",
        "function_call",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "stream",
        "stop",
        "seed",
        "response_format",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
        "tfs_z",
        "mirostat_mode",
        "mirostat_tau",
        "mirostat_eta",
        "model",
        "logits_processor",
        "grammar",
        "logit_bias",
        "logprobs",
        "top_logprobs",
    ):
        assert key in seen
    assert llm.chat_format == "chat_template.default" and "deepseek-v4" in llm.chat_formats
    wrong = Llama(real_vocab_path, n_ctx=64, verbose=False, n_threads=1, n_threads_batch=1, chat_format="llama-9")
    with pytest.raises(LlamaChatCompletionHandlerNotFoundException, match="Invalid chat handler: llama-9"):
        wrong.create_chat_completion([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="unknown role"):
        llm.create_chat_completion([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="tool call arguments are not JSON"):
        llm.create_chat_completion(
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
        )


# ---------------------------------------------------------------------------------------------- LangChain


def test_langchain_bind_tools_and_structured_output(small: Llama) -> None:
    pytest.importorskip("langchain_community")
    from langchain_community.chat_models import ChatLlamaCpp
    from pydantic import BaseModel, Field

    from llama_dsv4 import compat

    compat.install()
    try:
        chat = ChatLlamaCpp(
            model_path=small.model_path, n_ctx=4096, temperature=1.0, max_tokens=512, verbose=False, seed=3
        )

        class Weather(BaseModel):
            """Weather in a city."""

            city: str = Field(max_length=8)
            days: int = Field(ge=1, le=7)

        for choice in ({"type": "function", "function": {"name": "Weather"}}, "Weather"):  # LangChain passes a name
            msg = chat.bind_tools([Weather], tool_choice=choice).invoke("Weather in Paris for 2 days?")
            (call,) = msg.tool_calls
            assert call["name"] == "Weather" and 1 <= call["args"]["days"] <= 7
        structured = chat.with_structured_output(Weather)
        w = structured.invoke("Weather in Oslo?")
        assert isinstance(w, Weather) and len(w.city) <= 8
    finally:
        compat.uninstall()


def test_openai_message_format_with_content_parts(llm: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert prompt_of(llm, monkeypatch, messages=msgs) == f"{BOS}<｜User｜>Hi there<｜Assistant｜></think>"
