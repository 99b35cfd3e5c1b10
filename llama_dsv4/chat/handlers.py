"""`create_chat_completion`: resolve the chat format, render the prompt, complete (constrained where asked), and
shape the answer: reasoning, content and tool calls, whole or streamed.

Resolution as llama-cpp-python: `chat_handler` first, then `chat_format`, looked up in `Llama.chat_formats`
(chat/registry.py: "chat_template.default" and "chat_template.<name>" are the GGUF's own templates) and then in the
process-wide registry ("deepseek-v4" ours, llama-cpp-python's named formats of chat/formats.py, and what user code
registers); by default the GGUF's template, else ours. Templates render in the sandbox of chat/template.py.
Beyond llama-cpp-python (docs/llama-cpp-python-api.md §2): tool calls are parsed out of the model's DSML markup
for tool_choice auto/required/named, a required or named choice and `response_format` constrain decoding
(llguidance), the
thinking text is returned as `reasoning_content`, and thinking mode, effort and other template variables are
reachable as keyword arguments.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..completion import text_tokens
from ..grammar import LlamaGrammar
from ..logprobs import chat_logprobs
from ..sampling import constrained
from ..tokenizer import LlamaTokenizer
from . import dsml
from . import template as tmpl
from .parser import OutputParser
from .registry import ChatFormatRegistry

if TYPE_CHECKING:
    from ..llama import Llama

ROLES = ("system", "user", "assistant", "tool", "developer", "function")


# ---------------------------------------------------------------------------------------------- requests


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
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


def _tool_choice(tools: Any, tool_choice: Any, functions: Any, function_call: Any) -> tuple[Any, Any]:
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


# ---------------------------------------------------------------------------------------------- the handler


class TemplateChatHandler:
    """A chat format made from a Jinja template (the GGUF's or ours) with DeepSeek V4's output conventions.
    Compiled when made (TemplateError if it cannot be), or with `compile_now=False` on first use."""

    def __init__(self, source: str, name: str, compile_now: bool = True) -> None:
        self.source = source
        self.name = name
        if compile_now:
            tmpl.compile_template(source)

    def render(self, llama: Llama, messages: list[dict[str, Any]], variables: dict[str, Any]) -> str:
        """The prompt; rendering stops once it is longer than the context could hold (n_ctx tokens of the
        vocabulary's longest piece), so a template cannot print more than the tokenizer could be asked to read."""
        tok = llama.dsv4_tokenizer
        v = tok.vocab
        limit = llama.n_ctx() * tok.max_token_bytes
        variables = {
            "messages": messages,
            "add_generation_prompt": True,
            "bos_token": v.tokens[v.bos_id] if v.bos_id is not None else "",
            "eos_token": v.tokens[v.eos_id] if v.eos_id is not None else "",
            **variables,
        }
        try:
            return tmpl.render_bounded(self.source, variables, limit)
        except tmpl.OutputTooLong:
            if limit >= tmpl.MAX_OUTPUT:
                raise
            raise ValueError(
                f"the prompt is over {limit} characters: more than a context of {llama.n_ctx()} tokens can hold"
            ) from None

    def __call__(
        self,
        *,
        llama: Llama,
        messages: Any,
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        response_format: Any = None,
        grammar: Any = None,
        stream: bool = False,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        reasoning_format: str = "deepseek",
        chat_template_kwargs: dict[str, Any] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        **completion: Any,
    ) -> Any:
        messages = _normalize_messages(messages)
        if reasoning_format not in ("deepseek", "none"):
            raise ValueError(f"reasoning_format must be 'deepseek' or 'none', got {reasoning_format!r}")
        variables = {**(chat_template_kwargs or {}), **(template_kwargs or {})}
        tools, choice = _tool_choice(tools, tool_choice, functions, function_call)
        constrained_json, schema = schema_of(response_format)
        source = None  # the grammar decoding follows, if any
        if choice in ("none", "auto"):
            pass
        else:  # a required or named call: the answer is a DSML block over these tools
            source = constrained.from_lark(dsml.tools_grammar(tools, None if choice == "required" else choice))
        if constrained_json:
            if source is not None:
                raise ValueError("response_format cannot be combined with a required or named tool_choice")
            source = constrained.from_json_schema(schema if schema is not None else {"type": "object"})
            if schema is not None:
                variables.setdefault("response_format", schema)
        if grammar is not None:
            if source is not None:
                raise ValueError("grammar cannot be combined with response_format or a forced tool_choice")
            source = grammar._llguidance() if isinstance(grammar, LlamaGrammar) else grammar
        if tools and choice != "none":
            variables["tools"] = tools
        thinking = bool(variables.get("thinking", variables.get("enable_thinking", False)))
        if source is not None and thinking:  # constrained output starts right away: no thinking block
            variables["thinking"] = variables["enable_thinking"] = thinking = False
        tokens = prompt_tokens(llama, self.render(llama, messages, variables))
        n_logprobs = (top_logprobs or 0) if logprobs else None
        result = llama.create_completion(
            prompt=tokens, stream=stream, grammar=source, logprobs=n_logprobs, **completion
        )
        parse_tools = choice != "none"
        raw = reasoning_format == "none"
        named = choice not in ("none", "auto", "required")
        single = parallel_tool_calls is False  # OpenAI's parallel_tool_calls: false, at most one call
        if stream:
            return _stream(llama, result, thinking, parse_tools, raw, named, single)
        return _response(llama, result, thinking, parse_tools, raw, named, single)


def prompt_tokens(llama: Llama, prompt: str, add_bos: bool = False) -> list[int]:
    """The tokens of a rendered chat prompt (special tokens parsed), with the BOS first where `add_bos` and the
    vocabulary asks for one; a prompt that cannot fit the context is refused before it is tokenized whole."""
    if not isinstance(llama.tokenizer_, LlamaTokenizer):  # the tokenizer the caller gave the Llama
        return llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    v = llama.dsv4_tokenizer.vocab
    head = [v.bos_id] if add_bos and v.add_bos and v.bos_id is not None else []
    return [*head, *text_tokens(llama, prompt, special=True, n_other=len(head))]


def _call_objects(calls: list[tuple[str, dict[str, Any]]], completion_id: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{i}_{name}_{completion_id}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for i, (name, args) in enumerate(calls)
    ]


def _response(
    llama: Llama, c: dict[str, Any], thinking: bool, tools: bool, raw: bool, named: bool, single: bool
) -> dict[str, Any]:
    choice = c["choices"][0]
    p = OutputParser(thinking, tools, raw)
    events = p.feed(choice["text"]) + p.finish(cut=choice["finish_reason"] == "length")
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"][: 1 if single else None]
    message: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    finish = choice["finish_reason"]
    if calls:
        message["tool_calls"] = _call_objects(calls, c["id"])
        if named:
            message["function_call"] = dict(message["tool_calls"][0]["function"])
        if finish != "length":  # a cut answer stays "length", so that the client sees the cut
            finish = "tool_calls"
    return {
        "id": "chat" + c["id"],
        "object": "chat.completion",
        "created": c["created"],
        "model": c["model"],
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(llama, choice.get("logprobs")),
                "finish_reason": finish,
            }
        ],
        "usage": c["usage"],
    }


def _stream(
    llama: Llama, chunks: Iterator[dict[str, Any]], thinking: bool, tools: bool, raw: bool, named: bool, single: bool
) -> Iterator[dict[str, Any]]:
    p = OutputParser(thinking, tools, raw)
    n_calls = 0
    started = False
    base: dict[str, Any] = {}
    pending: list[Any] = []  # logprobs of tokens whose text has not reached a chunk yet (the parser holds it)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        lp = None
        if pending:  # a chunk carries the logprobs of the tokens generated since the previous chunk
            lp = {"content": [e for part in pending for e in part["content"]], "refusal": None}
            pending.clear()
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    def deltas(events: list[tuple[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal n_calls
        for kind, value in events:
            if kind == "tool_call":
                if single and n_calls:  # parallel_tool_calls=False: the first call only
                    continue
                name, args = value
                call = {
                    "index": n_calls,
                    "id": f"call_{n_calls}_{name}_{base['id'][4:]}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
                }
                n_calls += 1
                yield chunk({"tool_calls": [call]})
            elif value:
                yield chunk({"reasoning_content" if kind == "reasoning" else "content": value})

    for c in chunks:
        if not started:
            base = {
                "id": "chat" + c["id"],
                "model": c["model"],
                "created": c["created"],
                "object": "chat.completion.chunk",
            }
            yield chunk({"role": "assistant"})
            started = True
        ch = c["choices"][0]
        lp = chat_logprobs(llama, ch.get("logprobs"))
        if lp is not None:
            pending.append(lp)
        if ch["finish_reason"] is not None:
            cut = ch["finish_reason"] == "length"
            yield from deltas(p.finish(cut=cut))
            yield chunk({}, "tool_calls" if n_calls and not cut else ch["finish_reason"])
        elif ch["text"]:
            yield from deltas(p.feed(ch["text"]))


# ---------------------------------------------------------------------------------------------- registry


def install(llama: Llama, chat_format: str | None, chat_handler: Any) -> None:
    """Register the model's chat templates in `llama.chat_formats` and pick the default chat format."""
    formats: ChatFormatRegistry = llama.chat_formats
    model_template = llama._model.chat_template
    choose = chat_format is None and chat_handler is None
    if model_template:  # compiled now only where it may become the default; a file's template that cannot be
        try:  # used (too large, too deep, broken) leaves ours as the default
            default = TemplateChatHandler(model_template, "chat_template.default", compile_now=choose)
            formats.register_chat_completion_handler("chat_template.default", default)
        except tmpl.TemplateError as e:
            warnings.warn(
                f"{llama.model_path}: {e}; using llama-dsv4's DeepSeek V4 template", RuntimeWarning, stacklevel=4
            )
    for key, value in llama._model.metadata.items():  # named extra templates: compiled when first used
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            name = "chat_template." + key[len("tokenizer.chat_template.") :]
            formats.register_chat_completion_handler(
                name, TemplateChatHandler(value, name, compile_now=False), overwrite=True
            )
    if choose:  # "deepseek-v4": ours, registered process-wide (chat/formats.py)
        llama.chat_format = "chat_template.default" if "chat_template.default" in formats else "deepseek-v4"


def template_from_file(llama: Llama, path: str) -> None:
    """Use a Jinja template file (llama-server's --chat-template-file) as this Llama's chat format."""
    with open(path, encoding="utf-8") as f:
        source = f.read(tmpl.MAX_SOURCE + 1)  # one more than allowed: compile_template refuses it
    handler = TemplateChatHandler(source, "chat_template.file")
    llama.chat_formats.register_chat_completion_handler("chat_template.file", handler, overwrite=True)
    llama.chat_format = "chat_template.file"


def resolve_handler(llama: Llama) -> Callable[..., Any]:
    if llama.chat_handler is not None:
        return llama.chat_handler
    return llama.chat_formats.get_chat_completion_handler_by_name(llama.chat_format)


def create_chat_completion(
    llama: Llama,
    messages: list[dict[str, Any]],
    functions: Any = None,
    function_call: Any = None,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    stream: bool = False,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    response_format: Any = None,
    max_tokens: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    tfs_z: float = 1.0,
    mirostat_mode: int = 0,
    mirostat_tau: float = 5.0,
    mirostat_eta: float = 0.1,
    model: str | None = None,
    logits_processor: Any = None,
    grammar: Any = None,
    logit_bias: dict[int, float] | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    reasoning_format: str = "deepseek",
    chat_template_kwargs: dict[str, Any] | None = None,
    **template_kwargs: Any,
) -> Any:
    """llama-cpp-python's create_chat_completion; extra keyword arguments (thinking=True, reasoning_effort="max",
    drop_thinking=False, ...) and `chat_template_kwargs` become template variables. parallel_tool_calls=False
    (OpenAI's) returns at most one tool call. An answer cut by max_tokens inside a tool call ends with
    finish_reason "length", its unfinished markup dropped (the calls completed before the cut are kept)."""
    handler = resolve_handler(llama)
    common = dict(
        llama=llama,
        messages=messages,
        functions=functions,
        function_call=function_call,
        tools=tools,
        tool_choice=tool_choice,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        typical_p=typical_p,
        stream=stream,
        stop=stop or [],
        seed=seed,
        response_format=response_format,
        max_tokens=max_tokens,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repeat_penalty=repeat_penalty,
        tfs_z=tfs_z,
        mirostat_mode=mirostat_mode,
        mirostat_tau=mirostat_tau,
        mirostat_eta=mirostat_eta,
        model=model,
        logits_processor=logits_processor,
        grammar=grammar,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if not isinstance(handler, TemplateChatHandler):  # a llama-cpp-python style handler: its protocol exactly,
        variables = {**(chat_template_kwargs or {}), **template_kwargs}  # and the template variables if it takes them
        if not variables or not getattr(handler, "takes_template_kwargs", False):
            return handler(**common)
        clash = sorted(set(variables) & set(common))
        if clash:
            raise ValueError(f"chat_template_kwargs {clash} are request parameters, not template variables")
        return handler(**common, **variables)
    return handler(
        **common,
        parallel_tool_calls=parallel_tool_calls,
        reasoning_format=reasoning_format,
        chat_template_kwargs=chat_template_kwargs,
        template_kwargs=template_kwargs,
    )


def create_chat_completion_openai_v1(llama: Llama, *args: Any, **kwargs: Any) -> Any:
    """`create_chat_completion` answered as the OpenAI SDK's objects (a `ChatCompletion`, or an iterator of
    `ChatCompletionChunk` when streaming), as llama-cpp-python's: what instructor patches."""
    try:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk
    except ImportError as e:
        raise ImportError("create_chat_completion_openai_v1 needs the openai package") from e
    result = create_chat_completion(llama, *args, **kwargs)
    if kwargs.get("stream"):
        return (ChatCompletionChunk(**c) for c in result)
    return ChatCompletion(**result)
