"""llama-cpp-python's "chatml-function-calling" chat format: ChatML, with the tools listed in the system message and
the answer written either as `message:` and text, or as calls `functions.<name>:` followed by JSON arguments, one
per line. Decoding is constrained (llguidance) so that the answer is one of those forms and every call's arguments
follow its function's parameter schema.

As llama-cpp-python: without `tool_choice` (or "none") the tools are not shown and the answer is plain text; a
named `tool_choice` calls that function once. Differences: the prompt is not HTML-escaped (llama-cpp-python's template
environment escapes message text), "auto" is decoded in one constrained pass (so a message is free text, several
calls are returned, and the answer streams), "required" forces one or more calls, and tool results (messages of
role "tool") are shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..sampling import constrained
from ..sampling.grammar_bounds import MAX_SCHEMA_CHARS, GrammarError, check_json_schema
from .request import ChatRequest, prompt_tokens, stop_list
from .response import call_object, chat_response, chat_stream, chunk, tool_calls_response

if TYPE_CHECKING:
    from ..llama import Llama

END = "<|im_end|>"
MESSAGE = "message:\n"
INSTRUCTIONS = (
    "\n\nYou can respond to users messages with either a single message or one or more function calls."
    "\n\nTo respond with a message begin the message with 'message:', use the following format:"
    "\n\nmessage:\n<message>"
    "\n\nTo respond with one or more function calls begin the message with 'functions.<function_name>:', use the "
    "following format:"
    '\n\nfunctions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
    '\nfunctions.<function_name>:\n{ "arg1": "value1", "arg2": "value2" }'
)


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _tools_text(tools: list[dict[str, Any]]) -> str:
    listed = "".join(
        f"\nfunctions.{t['function']['name']}:\n{json.dumps(t['function'].get('parameters'), sort_keys=True)}\n"
        for t in tools
    )
    return f"\n\nYou have access to the following functions:\n{listed}{INSTRUCTIONS}"


def _calls_text(calls: list[dict[str, Any]]) -> str:
    out = []
    for c in calls:
        name, args = c["function"].get("name"), c["function"].get("arguments")
        if not isinstance(name, str):
            raise ValueError(f"a tool call of an assistant message has no function name: {c!r:.100}")
        out.append(f"functions.{name}:\n{args if isinstance(args, str) else json.dumps(args)}")
    return "".join(out)


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt: each message in ChatML (the system message followed by the tools and the answer format when
    there are tools; an assistant's calls as `functions.<name>:` lines), then the opening of the assistant's turn."""
    out = []
    for m in messages:
        role, text = m["role"], m.get("content") or ""
        out.append(f"<|im_start|>{role}\n")
        if role == "system":
            out.append(text + (_tools_text(tools) if tools else "") + f"{END}\n")
        elif role != "assistant":  # user, tool and function results
            out.append(f"{text}{END}\n")
        else:
            if text:
                out.append(f"{MESSAGE if tools else ''}{text}{END}\n")
            if "tool_calls" in m:
                out.append(_calls_text(m.get("tool_calls") or []) + f"{END}\n")
    return "".join(out) + "<|im_start|>assistant\n"


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    funcs = {}
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not name or any(c in name for c in ':\n"'):
            raise ValueError(f"invalid tool name {name!r}")
        funcs[name] = f.get("parameters") or {"type": "object"}
    return funcs


def _grammar(funcs: dict[str, dict[str, Any]], choice: str) -> str:
    """A lark grammar (llguidance dialect) for the answer: for "auto" `message:` and free text or one or more
    calls, for "required" one or more calls, for a named choice one call."""
    budget = MAX_SCHEMA_CHARS
    rules = []
    for i, (name, schema) in enumerate(funcs.items()):
        budget -= check_json_schema(schema, f"the parameters of {name!r}")
        if budget < 0:
            raise GrammarError(f"the tools' parameter schemas come to more than {MAX_SCHEMA_CHARS} characters")
        rules.append(f"call{i}: {_lit(f'functions.{name}:' + chr(10))} %json{json.dumps(schema)} {_lit(chr(10))}")
    calls = f"({' | '.join(f'call{i}' for i in range(len(funcs)))})" + ("+" if choice in ("auto", "required") else "")
    start = f"start: {_lit(MESSAGE)} TEXT | {calls}" if choice == "auto" else f"start: {calls}"
    return constrained.from_lark("\n".join([start, *rules, "TEXT: /(.|\\n)*/"]))


def parse_calls(text: str, funcs: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, JSON arguments text) of each complete call in `text` (an unfinished last call is left out)."""
    calls, pos, decoder = [], 0, json.JSONDecoder()
    while text.startswith("functions.", pos):
        head = text.find(":\n", pos)
        name = text[pos + len("functions.") : head] if head >= 0 else None
        if name not in funcs:
            break
        try:
            _, end = decoder.raw_decode(text, head + 2)
        except json.JSONDecodeError:
            break
        calls.append((name, text[head + 2 : end]))
        pos = end + 1
    return calls


def chatml_function_calling(*, llama: Llama, messages: Any, **kwargs: Any) -> Any:
    """The "chatml-function-calling" chat completion handler (see the module's docstring); the handler protocol's
    keyword arguments (chat/request.py)."""
    if kwargs.get("tool_choice") is None and kwargs.get("function_call") is None:  # llama-cpp-python's rule for
        kwargs["tools"] = kwargs["functions"] = None  # this format: no tool_choice, no tools
    req = ChatRequest.read(llama, messages, **kwargs)
    stops = stop_list(END, req.stop)
    if req.choice == "none":
        tokens = prompt_tokens(llama, render(req.messages, None), add_bos=True)
        c = llama.create_completion(
            prompt=tokens,
            stream=req.stream,
            stop=stops,
            grammar=req.decoding_grammar(),
            logprobs=req.n_logprobs,
            **req.sampling,
        )
        return chat_stream(llama, c) if req.stream else chat_response(llama, c)
    funcs = _functions(req.tools or [])
    if req.named is not None:
        funcs = {req.named: funcs[req.named]}
    tokens = prompt_tokens(llama, render(req.messages, req.tools), add_bos=True)
    source = _grammar(funcs, req.choice)
    c = llama.create_completion(
        prompt=tokens, stream=req.stream, stop=stops, grammar=source, logprobs=req.n_logprobs, **req.sampling
    )
    return _stream(c, funcs) if req.stream else _response(llama, c, funcs)


def _response(llama: Llama, c: dict[str, Any], funcs: dict[str, Any]) -> dict[str, Any]:
    choice = c["choices"][0]
    text = choice["text"]
    if text.startswith(MESSAGE) or not text.startswith("functions."):
        choice["text"] = text[len(MESSAGE) :] if text.startswith(MESSAGE) else text
        return chat_response(llama, c)
    return tool_calls_response(llama, c, parse_calls(text, funcs))


def _stream(chunks: Iterator[dict[str, Any]], funcs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A message streams as content once its `message:` prefix is read; calls are sent once complete."""
    text, mode = "", None
    for c in chunks:
        ch = c["choices"][0]
        text += ch["text"]
        if mode is None and (len(text) >= len(MESSAGE) or ch["finish_reason"] is not None):
            mode = "message" if text.startswith(MESSAGE) else "calls"
            yield chunk(c, {"role": "assistant", "content": None if mode == "calls" else ""})
            text = text[len(MESSAGE) :] if mode == "message" else text
        if mode == "message" and text:
            yield chunk(c, {"content": text})
            text = ""
        if ch["finish_reason"] is not None:
            if mode == "calls":
                calls = parse_calls(text, funcs)
                for i, (name, args) in enumerate(calls):
                    yield chunk(c, {"tool_calls": [{"index": i, **call_object(i, name, args, c["id"])}]})
                finish = "length" if ch["finish_reason"] == "length" else "tool_calls"
            else:
                finish = ch["finish_reason"]
            yield chunk(c, {}, finish)
