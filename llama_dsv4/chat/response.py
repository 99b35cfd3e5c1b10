"""Completions as chat completions: a completion response, or a stream of completion chunks, turned into OpenAI's
chat completion (a message with content, reasoning_content and tool calls) or its chunks (deltas), with the
completion's id, model, creation time, usage and log probabilities.

How the completion's text is read is a `Reading`: plain text (the default: all of it is the content), or DeepSeek
V4's output read by chat/parser.py (reasoning, content and DSML tool calls). Answers that are tool calls already
(chatml-function-calling, a named tool choice of a formatter) are shaped by `tool_calls_response` and
`call_stream`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..logprobs import chat_logprobs
from .parser import OutputParser

if TYPE_CHECKING:
    from ..llama import Llama


@dataclass(frozen=True)
class Reading:
    """How an answer's text is read; the defaults read it as plain text, all content."""

    raw: bool = True  # no markup is read: the text is the content
    thinking: bool = False  # the prompt opened a thinking block: the text up to </think> is reasoning
    tools: bool = False  # DSML tool-call blocks are parsed into tool calls
    named: bool = False  # a named tool_choice: the call is also the legacy `function_call`
    single: bool = False  # OpenAI's parallel_tool_calls=false: at most one call

    def parser(self) -> OutputParser:
        return OutputParser(self.thinking, self.tools, self.raw)


PLAIN = Reading()


def call_object(i: int, name: str, arguments: str, completion_id: str) -> dict[str, Any]:
    """The `i`th tool call of a chat completion (its arguments as JSON text)."""
    return {
        "id": f"call_{i}_{name}_{completion_id}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _chat_completion(llama: Llama, c: dict[str, Any], message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chat" + c["id"],
        "object": "chat.completion",
        "created": c["created"],
        "model": c["model"],
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(llama, c["choices"][0].get("logprobs")),
                "finish_reason": finish,
            }
        ],
        "usage": c["usage"],
    }


def chunk(c: dict[str, Any], delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    """A chat completion chunk with `delta` (and the log probabilities of its tokens), for the completion chunk
    `c`."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {
        "id": "chat" + c["id"],
        "object": "chat.completion.chunk",
        "created": c["created"],
        "model": c["model"],
        "choices": [choice],
    }


def chat_response(llama: Llama, c: dict[str, Any], reading: Reading = PLAIN) -> dict[str, Any]:
    """The completion response `c` as a chat completion, its text read as `reading` says. With tool calls the
    finish reason is "tool_calls", unless the answer was cut ("length", so that the client sees the cut)."""
    choice = c["choices"][0]
    p = reading.parser()
    events = p.feed(choice["text"]) + p.finish(cut=choice["finish_reason"] == "length")
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"][: 1 if reading.single else None]
    message: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    finish = choice["finish_reason"]
    if calls:
        message["tool_calls"] = [
            call_object(i, name, json.dumps(args, ensure_ascii=False), c["id"]) for i, (name, args) in enumerate(calls)
        ]
        if reading.named:
            message["function_call"] = dict(message["tool_calls"][0]["function"])
        if finish != "length":
            finish = "tool_calls"
    return _chat_completion(llama, c, message, finish)


def chat_stream(llama: Llama, chunks: Iterator[dict[str, Any]], reading: Reading = PLAIN) -> Iterator[dict[str, Any]]:
    """The completion chunks as chat completion chunks: the role first, then reasoning, content and tool calls as
    they are read, each chunk with the log probabilities of the tokens generated since the previous one."""
    p = reading.parser()
    n_calls = 0
    first: dict[str, Any] | None = None  # the first completion chunk: the id, model and time of every chat chunk
    pending: list[Any] = []  # logprobs of tokens whose text has not reached a chunk yet (the parser holds it)

    def delta_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        assert first is not None
        lp = None
        if pending:  # a chunk carries the logprobs of the tokens generated since the previous chunk
            lp = {"content": [e for part in pending for e in part["content"]], "refusal": None}
            pending.clear()
        return chunk(first, delta, finish, lp)

    def deltas(events: list[tuple[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal n_calls
        assert first is not None
        for kind, value in events:
            if kind == "tool_call":
                if reading.single and n_calls:  # parallel_tool_calls=False: the first call only
                    continue
                name, args = value
                call = {
                    "index": n_calls,
                    **call_object(n_calls, name, json.dumps(args, ensure_ascii=False), first["id"]),
                }
                n_calls += 1
                yield delta_chunk({"tool_calls": [call]})
            elif value:
                yield delta_chunk({"reasoning_content" if kind == "reasoning" else "content": value})

    for c in chunks:
        if first is None:
            first = c
            yield delta_chunk({"role": "assistant"})
        ch = c["choices"][0]
        lp = chat_logprobs(llama, ch.get("logprobs"))
        if lp is not None:
            pending.append(lp)
        if ch["finish_reason"] is not None:
            cut = ch["finish_reason"] == "length"
            yield from deltas(p.finish(cut=cut))
            yield delta_chunk({}, "tool_calls" if n_calls and not cut else ch["finish_reason"])
        elif ch["text"]:
            yield from deltas(p.feed(ch["text"]))


def tool_calls_response(llama: Llama, c: dict[str, Any], calls: list[tuple[str, str]]) -> dict[str, Any]:
    """Completion `c` as a chat completion whose answer is `calls` ((name, JSON arguments text) each; with one call
    also as the legacy `function_call`): finish_reason "tool_calls", or "length" where the completion was cut."""
    objects = [call_object(i, name, args, c["id"]) for i, (name, args) in enumerate(calls)]
    message: dict[str, Any] = {"role": "assistant", "content": None if objects else ""}
    if objects:  # none where the answer was cut before its first call was complete
        message["tool_calls"] = objects
    if len(objects) == 1:
        message["function_call"] = dict(objects[0]["function"])
    return _chat_completion(
        llama, c, message, "length" if c["choices"][0]["finish_reason"] == "length" else "tool_calls"
    )


def call_stream(chunks: Iterator[dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """The streamed form of tool_calls_response for one call of `name` whose arguments are the completion's text:
    its id and name first, then its arguments as they come."""
    started = False
    for c in chunks:
        ch = c["choices"][0]
        if not started:
            started = True
            call = {"index": 0, **call_object(0, name, "", c["id"])}
            yield chunk(c, {"role": "assistant", "content": None, "tool_calls": [call]})
        if ch["text"]:
            yield chunk(c, {"tool_calls": [{"index": 0, "function": {"arguments": ch["text"]}}]})
        if ch["finish_reason"] is not None:
            yield chunk(c, {}, "length" if ch["finish_reason"] == "length" else "tool_calls")
