"""A chat completion request as every chat handler reads it (the DeepSeek V4 templates of chat/handlers.py, the
formatters of chat/formatter.py, chatml-function-calling): the messages checked and normalized, the tools and
tool_choice resolved (with the legacy functions/function_call), response_format read as a JSON schema, the grammar
decoding follows, the keywords that go on to create_completion, and the rendered prompt's tokens.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..completion import text_tokens
from ..sampling import constrained
from ..tokenizer import LlamaTokenizer

if TYPE_CHECKING:
    from ..llama import Llama

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
# create_completion's keywords that a handler sets itself rather than passing on as the request gives them
_SET_BY_HANDLER = frozenset({"prompt", "suffix", "echo", "stream", "stop", "stopping_criteria", "grammar", "logprobs"})


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI-format messages; text parts joined; tool-call arguments given as JSON strings (as OpenAI
    clients and LangChain send them) turned into objects, as llama.cpp does, so every template can render them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be an object with a 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has an unknown role {m['role']!r}")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, a list of parts or null")
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise ValueError(f"message {i}: tool_calls must be a list")
            fixed = []
            for c in calls:
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                    raise ValueError(f"message {i}: every tool call needs a 'function' object")
                f = dict(c["function"])
                args = f.get("arguments")
                if isinstance(args, str):
                    try:
                        f["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        raise ValueError(f"message {i}: tool call arguments are not JSON: {args[:80]!r}") from None
                fixed.append({**c, "function": f})
            m["tool_calls"] = fixed
        out.append(m)
    return out


def resolve_tools(tools: Any, tool_choice: Any, functions: Any, function_call: Any) -> tuple[Any, str]:
    """Legacy `functions`/`function_call` as tools; returns (tools, choice) with choice "none" | "auto" |
    "required" | a function name."""
    if functions and not tools:
        tools = [{"type": "function", "function": f} for f in functions]
    if tool_choice is None and function_call is not None:
        tool_choice = (
            function_call if isinstance(function_call, str) else {"type": "function", "function": function_call}
        )
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required", "any"):
        names = [(t.get("function") or {}).get("name") for t in tools or () if isinstance(t, dict)]
        if tool_choice not in names:  # a bare function name, as LangChain's bind_tools passes it, must be a tool's
            raise ValueError(
                f"tool_choice must be 'none', 'auto', 'required' ('any'), a function or the name of one of the "
                f"tools {names}, got {tool_choice!r}"
            )
    if not tools:
        return None, "none"
    if tool_choice is None:
        return tools, "auto"
    if isinstance(tool_choice, str):
        return tools, "required" if tool_choice == "any" else tool_choice  # "any": LangChain's word for required
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if "function" in tool_choice else tool_choice.get("name")
        if isinstance(name, str):
            return tools, name
    raise ValueError(f"invalid tool_choice {tool_choice!r}")


def schema_of(response_format: Any) -> tuple[bool, Any]:
    """(constrained?, schema or None) of an OpenAI response_format."""
    if not response_format:
        return False, None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError("response_format must be an object with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, response_format.get("schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return True, spec["schema"]
    raise ValueError(f"unknown response_format type {kind!r}")


def json_grammar(schema: Any) -> str:
    """The grammar of an answer that is JSON following `schema` (any JSON object where `schema` is None)."""
    return constrained.from_json_schema(schema if schema is not None else {"type": "object"})


def stop_list(*stops: str | list[str] | None) -> list[str]:
    """The stop strings of each argument (a string, a list of them, or None), in order, as one list."""
    out: list[str] = []
    for s in stops:
        if s:
            out += [s] if isinstance(s, str) else list(s)
    return out


@functools.cache
def sampling_params(create_completion: Callable[..., Any]) -> frozenset[str]:
    """The keywords of `create_completion` (a Llama class's method) that a chat handler passes on as the request
    gives them (temperature, top_p, ..., max_tokens, seed, logits_processor, logit_bias): all but the prompt and
    what a handler sets itself (stream, stop, stopping_criteria, grammar, logprobs)."""
    params = inspect.signature(create_completion).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named - _SET_BY_HANDLER - {"self"})


@dataclass
class ChatRequest:
    """A chat completion request as a handler is called with it (llama-cpp-python's handler protocol, keyword
    arguments), read: the messages normalized, the tools and the tool choice resolved. The request's own values are
    kept as given (`given_tools`: functions, function_call, tools, tool_choice, as a formatter receives them);
    `sampling` holds the keywords that go on to create_completion unchanged, `extra` every other keyword (template
    variables, options of one handler)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # after the legacy functions; None with tool_choice "none"
    choice: str  # "none" | "auto" | "required" | a function name
    given_tools: dict[str, Any]
    stream: bool
    stop: Any
    response_format: Any
    grammar: Any
    logprobs: bool | None
    top_logprobs: int | None
    sampling: dict[str, Any]
    extra: dict[str, Any]

    @classmethod
    def read(
        cls,
        llama: Llama,
        messages: Any,
        *,
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        stream: bool = False,
        stop: str | list[str] | None = None,
        response_format: Any = None,
        grammar: Any = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        **kwargs: Any,
    ) -> ChatRequest:
        """The request of a handler's keyword arguments, for `llama` (whose create_completion's keywords are the
        sampling ones); ValueError where the messages or the tool
        choice are wrong (response_format is read when used: `output_schema`)."""
        normalized = normalize_messages(messages)
        resolved, choice = resolve_tools(tools, tool_choice, functions, function_call)
        known = sampling_params(type(llama).create_completion)
        return cls(
            messages=normalized,
            tools=resolved,
            choice=choice,
            given_tools={
                "functions": functions,
                "function_call": function_call,
                "tools": tools,
                "tool_choice": tool_choice,
            },
            stream=stream,
            stop=stop,
            response_format=response_format,
            grammar=grammar,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            sampling={k: v for k, v in kwargs.items() if k in known},
            extra={k: v for k, v in kwargs.items() if k not in known},
        )

    @property
    def named(self) -> str | None:
        """The function a named tool_choice calls, or None."""
        return None if self.choice in ("none", "auto", "required") else self.choice

    @property
    def n_logprobs(self) -> int | None:
        """create_completion's `logprobs`: how many top log probabilities each token gets, None for none."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_schema(self) -> tuple[bool, Any]:
        """schema_of the request's response_format."""
        return schema_of(self.response_format)

    def decoding_grammar(self, forced: str | None = None) -> Any:
        """What decoding follows: `forced` (the grammar of a forced tool choice), the JSON of response_format, or
        the request's `grammar` (a LlamaGrammar or a compiled grammar), at most one of them (ValueError where two
        are asked for); None for free text."""
        source = forced
        wanted, schema = self.output_schema()
        if wanted:
            if source is not None:
                raise ValueError("response_format cannot be combined with a forced (required or named) tool_choice")
            source = json_grammar(schema)
        if self.grammar is not None:
            if source is not None:
                raise ValueError("grammar cannot be combined with response_format or a forced tool_choice")
            source = self.grammar
        return source


def prompt_tokens(llama: Llama, prompt: str, add_bos: bool = False) -> list[int]:
    """The tokens of a rendered chat prompt (special tokens parsed), with the BOS first where `add_bos` and the
    vocabulary asks for one; a prompt that cannot fit the context is refused before it is tokenized whole."""
    if not isinstance(llama.tokenizer_, LlamaTokenizer):  # the tokenizer the caller gave the Llama
        return llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    v = llama.dsv4_tokenizer.vocab
    head = [v.bos_id] if add_bos and v.add_bos and v.bos_id is not None else []
    return [*head, *text_tokens(llama, prompt, special=True, n_other=len(head))]
