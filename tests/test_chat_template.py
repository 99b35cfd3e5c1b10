"""The DeepSeek V4 chat template our writer embeds renders the encoding of docs/architecture.md §14.3, and the
same prompts as llama.cpp's DeepSeek V4 template (read from llama-cpp-python's sdist, tests/llama_cpp_sdist.py)."""

from __future__ import annotations

import json

import pytest
from llama_cpp_sdist import DSV4_TEMPLATE, members

from llama_dsv4.chat.templates import default_chat_template

jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

BOS = "<｜begin▁of▁sentence｜>"


def render(template: str, **kw: object) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["from_json"] = json.loads
    env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env.from_string(template).render(bos_token=BOS, **kw)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CONVERSATIONS = {
    "chat": dict(
        messages=[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    ),
    "thinking": dict(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True, thinking=True),
    "history": dict(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        add_generation_prompt=True,
    ),
    "history-thinking": dict(
        messages=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "simple sum"},
            {"role": "user", "content": "and 3+3?"},
        ],
        add_generation_prompt=True,
        enable_thinking=True,
    ),
    "tools": dict(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny"},
        ],
        tools=TOOLS,
        add_generation_prompt=True,
    ),
    "max-effort": dict(
        messages=[{"role": "user", "content": "Prove it."}],
        thinking=True,
        reasoning_effort="max",
        add_generation_prompt=True,
    ),
    "response-format": dict(
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "object", "properties": {"a": {"type": "integer"}}},
        add_generation_prompt=True,
    ),
}


def test_spec_examples() -> None:
    t = default_chat_template()
    assert render(t, **CONVERSATIONS["chat"]) == f"{BOS}You are helpful.<｜User｜>Hi<｜Assistant｜></think>"
    assert render(t, **CONVERSATIONS["thinking"]) == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>"
    assert render(t, **CONVERSATIONS["history"]) == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜>"
        "<｜User｜>How are you?<｜Assistant｜></think>"
    )


def test_tool_calls_render_as_dsml() -> None:
    out = render(default_chat_template(), **CONVERSATIONS["tools"])
    assert out.startswith(f"{BOS}Be brief.\n\n## Tools\n\n")
    assert json.dumps(TOOLS[0]["function"], ensure_ascii=False) + "\n" in out
    assert out.endswith(
        "<｜User｜>Weather in Paris?<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>sunny</tool_result><｜Assistant｜></think>"
    )


def test_earlier_reasoning_is_dropped_by_default() -> None:
    out = render(default_chat_template(), **CONVERSATIONS["history-thinking"])
    assert "simple sum" not in out and out.endswith("<｜Assistant｜><think>")
    kept = render(default_chat_template(), drop_thinking=False, **CONVERSATIONS["history-thinking"])
    assert "<think>simple sum</think>4" in kept


@pytest.fixture(scope="module")
def llama_cpp_template(llama_cpp_sdist_path: str) -> str:
    """llama.cpp's DeepSeek V4 template, read from llama-cpp-python's sdist (tests/llama_cpp_sdist.py)."""
    return members(llama_cpp_sdist_path, [DSV4_TEMPLATE])[DSV4_TEMPLATE].decode("utf-8")


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_same_prompts_as_llama_cpp_template(llama_cpp_template: str, conv: str) -> None:
    """llama.cpp's V4 template renders the same prompts as ours."""
    assert render(default_chat_template(), **CONVERSATIONS[conv]) == render(llama_cpp_template, **CONVERSATIONS[conv])
