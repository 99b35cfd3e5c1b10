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

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..sampling import constrained
from . import dsml
from . import template as tmpl
from .registry import ChatFormatRegistry
from .request import ChatRequest, prompt_tokens
from .response import Reading, chat_response, chat_stream

if TYPE_CHECKING:
    from ..llama import Llama


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

    def __call__(self, *, llama: Llama, messages: Any, **kwargs: Any) -> Any:
        """Answer a chat request: the handler protocol's keyword arguments (chat/request.py), and
        `parallel_tool_calls`, `reasoning_format` ("deepseek" or "none": no reasoning read out of the text),
        `chat_template_kwargs` and `template_kwargs` (template variables)."""
        parallel_tool_calls = kwargs.pop("parallel_tool_calls", None)
        reasoning_format = kwargs.pop("reasoning_format", "deepseek")
        variables = {**(kwargs.pop("chat_template_kwargs", None) or {}), **(kwargs.pop("template_kwargs", None) or {})}
        req = ChatRequest.read(llama, messages, **kwargs)
        if req.extra:
            raise TypeError(f"unexpected keyword arguments {sorted(req.extra)}")
        if reasoning_format not in ("deepseek", "none"):
            raise ValueError(f"reasoning_format must be 'deepseek' or 'none', got {reasoning_format!r}")
        forced = None  # a required or named call: the answer is a DSML block over these tools
        if req.choice not in ("none", "auto"):
            forced = constrained.from_lark(dsml.tools_grammar(req.tools, req.named))
        source = req.decoding_grammar(forced)
        wanted, schema = req.output_schema()
        if wanted and schema is not None:
            variables.setdefault("response_format", schema)
        if req.tools and req.choice != "none":
            variables["tools"] = req.tools
        thinking = bool(variables.get("thinking", variables.get("enable_thinking", False)))
        if source is not None and thinking:  # constrained output starts right away: no thinking block
            variables["thinking"] = variables["enable_thinking"] = thinking = False
        tokens = prompt_tokens(llama, self.render(llama, req.messages, variables))
        result = llama.create_completion(
            prompt=tokens,
            stream=req.stream,
            stop=req.stop,
            grammar=source,
            logprobs=req.n_logprobs,
            **req.sampling,
        )
        reading = Reading(
            raw=reasoning_format == "none",
            thinking=thinking,
            tools=req.choice != "none",
            named=req.named is not None,
            single=parallel_tool_calls is False,  # OpenAI's parallel_tool_calls: false, at most one call
        )
        if req.stream:
            return chat_stream(llama, result, reading)
        return chat_response(llama, result, reading)


def install(llama: Llama, chat_format: str | None, chat_handler: Any) -> None:
    """Register the model's chat templates in `llama.chat_formats` and pick the default chat format."""
    formats: ChatFormatRegistry = llama.chat_formats
    model_template = llama.metadata.get("tokenizer.chat_template")
    choose = chat_format is None and chat_handler is None
    if model_template:  # compiled now only where it may become the default; a file's template that cannot be
        try:  # used (too large, too deep, broken) leaves ours as the default
            default = TemplateChatHandler(model_template, "chat_template.default", compile_now=choose)
            formats.register_chat_completion_handler("chat_template.default", default)
        except tmpl.TemplateError as e:
            warnings.warn(
                f"{llama.model_path}: {e}; using llama-dsv4's DeepSeek V4 template", RuntimeWarning, stacklevel=4
            )
    for key, value in llama.metadata.items():  # named extra templates: compiled when first used
        if key.startswith("tokenizer.chat_template."):
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
    request = dict(locals())  # the parameters as called (the first statement: nothing else is local yet)
    ours = {
        k: request.pop(k)
        for k in ("parallel_tool_calls", "reasoning_format", "chat_template_kwargs", "template_kwargs")
    }
    request["stop"] = stop or []
    handler = resolve_handler(llama)
    if not isinstance(handler, TemplateChatHandler):  # a llama-cpp-python style handler: its protocol exactly,
        variables = {**(chat_template_kwargs or {}), **template_kwargs}  # and the template variables if it takes them
        if not variables or not getattr(handler, "takes_template_kwargs", False):
            return handler(**request)
        clash = sorted(set(variables) & set(request))
        if clash:
            raise ValueError(f"chat_template_kwargs {clash} are request parameters, not template variables")
        return handler(**request, **variables)
    return handler(**request, **ours)


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
