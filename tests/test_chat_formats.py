"""llama-cpp-python's chat-format surface (`llama_cpp.llama_chat_format`) on llama-dsv4: the named formats render
llama-cpp-python's prompts (tests/data/chat_format_ref.json, made by tests/fixtures/make_chat_format_refs.py) and
generate through our engine, the registry object and its decorators, Jinja2ChatFormatter and the hf_* helpers,
chatml-function-calling, and the handlers that cannot apply (functionary, Llava) raising why."""

from __future__ import annotations

import ast
import json
import os
import sys
import time
import types
from typing import Any

import pytest
from llama_cpp_sdist import members
from test_chat import prompt_of, say

from llama_dsv4 import Llama, LlamaGrammar
from llama_dsv4.chat import chatml_tools
from llama_dsv4.chat.formats import NAMED_FORMATS
from llama_dsv4.chat.registry import ChatFormatRegistry
from llama_dsv4.chat.template import TemplateError
from llama_dsv4.compat import chat_format as lcf

REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "chat_format_ref.json")
UNIT_TOOL = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def llm(real_vocab_path: str) -> Llama:
    return Llama(real_vocab_path, n_ctx=1024, verbose=False, n_threads=1, n_threads_batch=1, chat_format="chatml")


@pytest.fixture
def chatml(llm: Llama) -> Llama:
    llm.chat_format = "chatml"
    return llm


# ---------------------------------------------------------------------------------------------- the prompts


def test_named_formats_render_llama_cpp_pythons_prompts() -> None:
    with open(REF, encoding="utf-8") as f:
        ref = json.load(f)
    assert set(ref["registered"]) <= set(lcf.LlamaChatCompletionHandlerRegistry().names())
    assert set(ref["formats"]) == set(NAMED_FORMATS)
    for name, by_conversation in ref["formats"].items():
        for conv, want in by_conversation.items():
            messages = ref["conversations"][conv]
            r = NAMED_FORMATS[name](messages=messages)
            assert (r.stop, r.added_special) == (want["stop"], want["added_special"]), (name, conv)
            assert r.prompt == _upstream_fixed(name, want["prompt"], messages), (name, conv)
    for constant, value in ref["constants"].items():
        assert getattr(lcf, constant) == value
    meta = {"tokenizer.chat_template": lcf.MIXTRAL_INSTRUCT_CHAT_TEMPLATE}
    assert lcf.guess_chat_format_from_gguf_metadata(meta) == "mistral-instruct"
    assert lcf.guess_chat_format_from_gguf_metadata({"tokenizer.chat_template": "{{ x }}"}) is None


def _upstream_fixed(name: str, prompt: str, messages: list[dict[str, Any]]) -> str:
    """llama-cpp-python's prompt with the three fixes of chat/formats.py: "intel" fills in the system message,
    "open-orca" keeps the user and assistant messages, "saiga" the assistant messages."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    if name == "intel":
        return prompt.replace("{system_message}", system)
    if name == "open-orca":
        turns = "".join(
            f"{m['role'].title()}: {m['content']}<|end_of_turn|>\n" for m in messages if m["role"] != "system"
        )
        head, tail = prompt.rsplit("Assistant: ", 1)
        return head + turns + "Assistant: " + tail
    if name == "saiga":
        for i, m in enumerate(messages):
            if m["role"] == "assistant":  # upstream left it out between the messages around it
                before = f"<s>user\n{messages[i - 1]['content']}</s>"
                prompt = prompt.replace(before, before + f"<s>bot\n{m['content']}</s>", 1)
    return prompt


def test_the_surface_is_upstreams(llama_cpp_sdist_path: str) -> None:
    """Every public name llama-cpp-python 0.3.36's llama_chat_format.py defines is in the alias's module."""
    path = "llama_cpp/llama_chat_format.py"
    tree = ast.parse(members(llama_cpp_sdist_path, wanted=[path])[path])
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    public = {n for n in names if not n.startswith("_")}
    assert len(public) >= 55
    import llama_dsv4.compat

    llama_dsv4.compat.install()
    try:
        import llama_cpp.llama_chat_format as alias

        assert alias is lcf
        assert sorted(n for n in public if not hasattr(alias, n)) == []
    finally:
        llama_dsv4.compat.uninstall()


# ---------------------------------------------------------------------------------------------- generation


def test_chatml_generates_through_the_engine(chatml: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *HI]
    want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # tokenized by our tokenizer: the markers are text; no BOS, as the vocabulary asks for none (llama.cpp's rule)
    assert prompt_of(chatml, monkeypatch, messages=messages) == want
    r = chatml.create_chat_completion(HI, logits_processor=say(chatml, "Hello<|im_end|>more"), max_tokens=30)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert r["choices"][0]["finish_reason"] == "stop" and r["object"] == "chat.completion"
    chunks = list(
        chatml.create_chat_completion(HI, logits_processor=say(chatml, "Hello<|im_end|>"), max_tokens=30, stream=True)
    )
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = chatml.create_chat_completion(HI, max_tokens=5, seed=3)  # random weights: any text, well-formed
    assert isinstance(r["choices"][0]["message"]["content"], str) and r["usage"]["completion_tokens"] <= 5


def test_named_formats_use_the_formats_stop_and_the_requests(chatml: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    orig = chatml.create_completion

    def spy(**kw: Any) -> Any:
        seen.update(kw)
        return orig(**{**kw, "max_tokens": 1})

    monkeypatch.setattr(chatml, "create_completion", spy)
    chatml.chat_format = "llama-3"
    chatml.create_chat_completion(HI, stop="END", temperature=0.0, top_k=7)
    assert seen["stop"] == ["END", "<|eot_id|>"] and seen["temperature"] == 0.0 and seen["top_k"] == 7
    chatml.chat_format = "llama-2"  # no stop of its own
    chatml.create_chat_completion(HI)
    assert seen["stop"] == []


def test_named_tool_choice_and_response_format(chatml: Llama) -> None:
    named = {"type": "function", "function": {"name": "set_unit"}}
    r = chatml.create_chat_completion(HI, tools=[UNIT_TOOL], tool_choice=named, max_tokens=20)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "set_unit" and json.loads(call["function"]["arguments"])["unit"] in "cf"
    assert choice["message"]["function_call"] == call["function"]
    chunks = list(chatml.create_chat_completion(HI, tools=[UNIT_TOOL], tool_choice="set_unit", stream=True))
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[:-1])
    assert json.loads(args)["unit"] in "cf" and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    with pytest.raises(ValueError, match="no tool-call markup"):
        chatml.create_chat_completion(HI, tools=[UNIT_TOOL], tool_choice="required")
    with pytest.raises(ValueError, match=r"not found in tools|tool_choice must be"):
        chatml.create_chat_completion(
            HI, tools=[UNIT_TOOL], tool_choice={"type": "function", "function": {"name": "x"}}
        )
    schema = UNIT_TOOL["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": schema}}
    r = chatml.create_chat_completion(HI, response_format=fmt, max_tokens=20)
    assert json.loads(r["choices"][0]["message"]["content"])["unit"] in "cf"


def test_chatml_function_calling(llm: Llama, monkeypatch: pytest.MonkeyPatch) -> None:
    llm.chat_format = "chatml-function-calling"
    messages = [{"role": "system", "content": "S."}, *HI]
    prompt = prompt_of(llm, monkeypatch, messages=messages, tools=[UNIT_TOOL], tool_choice="auto")
    assert prompt.startswith("<|im_start|>system\nS.\n\nYou have access to the following functions:\n")
    assert "\nfunctions.set_unit:\n" + json.dumps(UNIT_TOOL["function"]["parameters"], sort_keys=True) in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # without a tool_choice the tools are not shown (llama-cpp-python's rule for this format)
    plain = prompt_of(llm, monkeypatch, messages=messages, tools=[UNIT_TOOL])
    assert plain == "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    calls = 'functions.set_unit:\n{"unit":"f"}\nfunctions.set_unit:\n{"unit":"c"}\n'
    r = llm.create_chat_completion(messages, tools=[UNIT_TOOL], tool_choice="auto", logits_processor=say(llm, calls))
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in r["choices"][0]["message"]["tool_calls"]
    ]
    assert got == [("set_unit", {"unit": "f"}), ("set_unit", {"unit": "c"})]
    r = llm.create_chat_completion(
        messages, tools=[UNIT_TOOL], tool_choice="auto", logits_processor=say(llm, "message:\nok")
    )
    assert r["choices"][0]["message"]["content"] == "ok" and r["choices"][0]["finish_reason"] == "stop"
    chunks = list(
        llm.create_chat_completion(
            messages, tools=[UNIT_TOOL], tool_choice="auto", logits_processor=say(llm, "message:\nok"), stream=True
        )
    )
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "ok"
    chunks = list(llm.create_chat_completion(messages, tools=[UNIT_TOOL], tool_choice="set_unit", stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert json.loads(deltas[1]["tool_calls"][0]["function"]["arguments"])["unit"] in "cf"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    history = [
        *messages,
        {"role": "assistant", "tool_calls": [{"function": {"name": "set_unit", "arguments": {"unit": "c"}}}]},
    ]
    history.append({"role": "tool", "content": "done"})
    text = chatml_tools.render(history, [UNIT_TOOL])
    assert 'functions.set_unit:\n{"unit": "c"}<|im_end|>\n<|im_start|>tool\ndone<|im_end|>\n' in text
    nameless = [*messages, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]
    with pytest.raises(ValueError, match="no function name"):
        llm.create_chat_completion(nameless, tools=[UNIT_TOOL], tool_choice="auto")
    bad_tool = {"type": "function", "function": {"name": "a:b"}}
    with pytest.raises(ValueError, match="invalid tool name 'a:b'"):
        llm.create_chat_completion(messages, tools=[bad_tool], tool_choice="auto")
    assert chatml_tools.parse_calls(
        'functions.set_unit:\n{"unit":"c"}\nfunctions.set_unit:\n{"un', {"set_unit": {}}
    ) == [("set_unit", '{"unit":"c"}')]


def test_chatml_function_calling_refuses_a_grammar_with_a_response_format(llm: Llama) -> None:
    """Both at once are refused, as the other chat formats refuse them (the grammar used to be dropped silently)."""
    llm.chat_format = "chatml-function-calling"
    grammar = LlamaGrammar.from_string('root ::= "x"')
    with pytest.raises(ValueError, match="grammar cannot be combined with response_format"):
        llm.create_chat_completion(HI, response_format={"type": "json_object"}, grammar=grammar, max_tokens=1)
    r = llm.create_chat_completion(HI, grammar=grammar, max_tokens=4)
    assert r["choices"][0]["message"]["content"] == "x"


# ---------------------------------------------------------------------------------------------- the registry


def test_register_and_get_round_trip(llm: Llama) -> None:
    registry = lcf.LlamaChatCompletionHandlerRegistry()
    assert registry is lcf.LlamaChatCompletionHandlerRegistry()  # one process-wide object

    @lcf.register_chat_format("test-arrows")
    def arrows(messages: list[dict[str, Any]], **kwargs: Any) -> lcf.ChatFormatterResponse:
        return lcf.ChatFormatterResponse(prompt="".join(f">> {m['content']}\n" for m in messages) + "<<", stop="\n")

    try:
        assert arrows(messages=HI).prompt == ">> Hi\n<<"
        handler = lcf.get_chat_completion_handler("test-arrows")
        assert "test-arrows" in llm.chat_formats and handler is registry.get_chat_completion_handler_by_name(
            "test-arrows"
        )
        with pytest.raises(ValueError, match="already registered"):
            lcf.register_chat_format("test-arrows")(arrows)
        llm.chat_format = "test-arrows"
        r = llm.create_chat_completion(HI, logits_processor=say(llm, "yes\nno"), max_tokens=10)
        assert r["choices"][0]["message"]["content"] == "yes"
        own = lambda **kw: {"mine": True}  # noqa: E731
        llm.chat_formats.register_chat_completion_handler("test-arrows", own)  # this model only
        assert llm.create_chat_completion(HI) == {"mine": True}
        assert registry.get_chat_completion_handler_by_name("test-arrows") is handler
        llm.chat_formats.unregister_chat_handler("test-arrows")
        lcf.register_chat_completion_handler("test-raw")(own)
        assert lcf.get_chat_completion_handler("test-raw") is own
    finally:
        registry.unregister_chat_handler("test-arrows")
        registry.unregister_chat_handler("test-raw")
    with pytest.raises(lcf.LlamaChatCompletionHandlerNotFoundException, match=r"valid formats: .*'chatml'"):
        lcf.get_chat_completion_handler("test-arrows")
    with pytest.raises(ValueError, match="No formatter registered"):
        registry.unregister_chat_handler("test-arrows")
    with pytest.raises(TypeError, match="must be callable"):
        ChatFormatRegistry().register_chat_completion_handler("x", "not a handler")  # type: ignore[arg-type]


def test_handlers_that_cannot_apply_say_why(llm: Llama) -> None:
    for cls in (lcf.Llava15ChatHandler, lcf.Llava16ChatHandler, lcf.MTMDChatHandler, lcf.Qwen25VLChatHandler):
        with pytest.raises(lcf.ChatFormatUnavailable, match="no vision input"):
            cls(clip_model_path="mmproj.gguf")
        with pytest.raises(lcf.ChatFormatUnavailable, match=cls.__name__):
            cls.from_pretrained("some/repo", "*mmproj*")
    assert issubclass(lcf.ChatFormatUnavailable, NotImplementedError)
    for name in ("functionary", "functionary-v1", "functionary-v2"):
        llm.chat_format = name
        with pytest.raises(lcf.ChatFormatUnavailable, match=r"functionary model.*DSML"):
            llm.create_chat_completion(HI)


# ---------------------------------------------------------------------------------------------- formatters


def test_jinja2_chat_formatter_with_a_custom_template(llm: Llama) -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if tools %}(tools: {{ tools | map(attribute='function.name') | join(',') }}){% endif %}"
        "{% if add_generation_prompt %}[assistant] {{ style | default('plain') }}:{% endif %}"
        "{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}"
    )
    f = lcf.Jinja2ChatFormatter(source, eos_token="</e>", bos_token="<b>", stop_token_ids=[5])
    r = f(messages=HI, tools=[UNIT_TOOL], style="terse")
    assert r.prompt == "<b>[user] Hi</e>(tools: set_unit)[assistant] terse:"
    assert r.stop == ["</e>"] and r.added_special and r.stopping_criteria is not None
    assert r.stopping_criteria([1, 5], None) and not r.stopping_criteria([5, 1], None)
    with pytest.raises(ValueError, match="too long"):
        f(messages=HI * 4)
    with pytest.raises(TemplateError, match="does not compile"):
        lcf.Jinja2ChatFormatter("{{ broken", eos_token="", bos_token="")
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    slow = lcf.Jinja2ChatFormatter(loops, eos_token="", bos_token="")
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="more than 1048576 steps"):  # the sandbox's bounds hold here too
        slow(messages=HI)
    assert time.perf_counter() - t0 < 15  # 0.4 s on the 2-core machine
    llm.chat_format, llm.chat_handler = "chatml", f.to_chat_handler()
    try:
        out = llm.create_chat_completion(HI, logits_processor=say(llm, "fine</e>x"), style="x", max_tokens=10)
        assert out["choices"][0]["message"]["content"] == "fine"
    finally:
        llm.chat_handler = None


def test_hf_tokenizer_config_and_autotokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ eos_token }}"
    config = {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    r = lcf.hf_tokenizer_config_to_chat_formatter(config)(messages=HI)
    assert r.prompt == "<s><user>Hi<assistant></s>" and r.stop == ["</s>", "<s>"]  # an empty assistant turn
    assert lcf.hf_tokenizer_config_to_chat_formatter(config, add_generation_prompt=False)(messages=HI).prompt == (
        "<s><user>Hi</s>"
    )
    with pytest.raises(ValueError, match="no 'chat_template'"):
        lcf.hf_tokenizer_config_to_chat_formatter({"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ValueError, match="'eos_token' must be a string"):
        lcf.hf_tokenizer_config_to_chat_formatter({"chat_template": template, "bos_token": "<s>"})

    class FakeTokenizer:  # what AutoTokenizer.from_pretrained returns, as far as the formatter reads it
        chat_template = template
        bos_token, eos_token = "<s>", "</s>"

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda path: FakeTokenizer())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)
    f = lcf.hf_autotokenizer_to_chat_formatter("some/model")
    r = f(messages=HI)
    assert r.prompt == "<s><user>Hi</s>" and r.stop == "</s>" and r.added_special
    handler = lcf.hf_autotokenizer_to_chat_completion_handler("some/model")
    assert handler.formatter(messages=HI).prompt == "<s><user>Hi</s>"  # type: ignore[attr-defined]
