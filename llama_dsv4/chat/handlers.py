"""`create_chat_completion`: resolve the chat format, render the prompt, complete, shape the answer.

Resolution as llama-cpp-python: `chat_handler` first, then `chat_format` ("chat_template.default" and
"chat_template.<name>" are the GGUF's own templates, "deepseek-v4" ours); by default the GGUF's template, else
ours. Templates render in the sandbox of chat/template.py.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..model.writer import default_chat_template
from . import template as tmpl

if TYPE_CHECKING:
    from ..llama import Llama


class LlamaChatCompletionHandlerNotFoundException(Exception):
    pass


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be an object with a 'role'")
        if m["role"] not in ("system", "user", "assistant", "tool", "developer", "function"):
            raise ValueError(f"message {i} has an unknown role {m['role']!r}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            m = dict(m)
            m["content"] = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
            messages[i] = m
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, a list of parts or null")
    return messages


class TemplateChatHandler:
    """A chat format made from a Jinja template (the GGUF's or ours)."""

    def __init__(self, source: str, name: str) -> None:
        self.source = source
        self.name = name
        tmpl.compile_template(source)

    def render(
        self,
        llama: Llama,
        messages: list[dict[str, Any]],
        tools: Any,
        response_format: Any,
        template_kwargs: dict[str, Any],
    ) -> str:
        v = llama._require_vocab().vocab
        variables: dict[str, Any] = dict(
            messages=messages,
            add_generation_prompt=True,
            bos_token=v.tokens[v.bos_id] if v.bos_id is not None else "",
            eos_token=v.tokens[v.eos_id] if v.eos_id is not None else "",
        )
        if tools:
            variables["tools"] = tools
        if response_format and response_format.get("type") == "json_object" and response_format.get("schema"):
            variables["response_format"] = response_format["schema"]
        variables.update(template_kwargs)
        return tmpl.render(self.source, **variables)

    def __call__(
        self,
        *,
        llama: Llama,
        messages: list[dict[str, Any]],
        tools: Any = None,
        response_format: Any = None,
        stream: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        **completion: Any,
    ) -> Any:
        prompt = self.render(llama, messages, tools, response_format, template_kwargs or {})
        tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        result = llama.create_completion(prompt=tokens, stream=stream, **completion)
        if stream:
            return _chat_chunks(result)
        return _chat_response(result)


def _chat_response(c: dict[str, Any]) -> dict[str, Any]:
    choice = c["choices"][0]
    return {
        "id": "chat" + c["id"],
        "object": "chat.completion",
        "created": c["created"],
        "model": c["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": None,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": c["usage"],
    }


def _chat_chunks(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    first = True
    for c in chunks:
        choice = c["choices"][0]
        base = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if first:
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
            }
            first = False
        if choice["finish_reason"] is not None:
            yield {
                **base,
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}],
            }
        elif choice["text"]:
            yield {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": choice["text"]}, "logprobs": None, "finish_reason": None}
                ],
            }


def install(llama: Llama, chat_format: str | None, chat_handler: Any) -> None:
    """Register the model's chat templates on `llama` and pick the default chat format."""
    handlers: dict[str, Any] = {}
    model_template = llama._model.chat_template
    if model_template:
        try:
            handlers["chat_template.default"] = TemplateChatHandler(model_template, "chat_template.default")
        except tmpl.TemplateError as e:
            warnings.warn(
                f"{llama.model_path}: {e}; using llama-dsv4's DeepSeek V4 template", RuntimeWarning, stacklevel=4
            )
    for key, value in llama._model.metadata.items():
        if key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            name = "chat_template." + key[len("tokenizer.chat_template.") :]
            with contextlib.suppress(tmpl.TemplateError):  # a broken extra template is simply not offered
                handlers[name] = TemplateChatHandler(value, name)
    handlers["deepseek-v4"] = TemplateChatHandler(default_chat_template(), "deepseek-v4")
    llama._chat_handlers = handlers
    if chat_format is None and chat_handler is None:
        llama.chat_format = "chat_template.default" if "chat_template.default" in handlers else "deepseek-v4"


def _resolve(llama: Llama) -> Callable[..., Any]:
    if llama.chat_handler is not None:
        return llama.chat_handler
    handler = llama._chat_handlers.get(llama.chat_format)
    if handler is None:
        raise LlamaChatCompletionHandlerNotFoundException(
            f"Invalid chat handler: {llama.chat_format} (this model offers {sorted(llama._chat_handlers)})"
        )
    return handler


def create_chat_completion(
    llama: Llama,
    messages: list[dict[str, Any]],
    functions: Any = None,
    function_call: Any = None,
    tools: Any = None,
    tool_choice: Any = None,
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
    **template_kwargs: Any,
) -> Any:
    messages = _check_messages(list(messages) if isinstance(messages, (list, tuple)) else messages)
    handler = _resolve(llama)
    if not isinstance(handler, TemplateChatHandler):  # a llama-cpp-python style handler
        return handler(
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
    return handler(
        llama=llama,
        messages=messages,
        tools=tools,
        response_format=response_format,
        stream=stream,
        template_kwargs=template_kwargs,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        typical_p=typical_p,
        stop=stop or [],
        seed=seed,
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
    )


def create_chat_completion_openai_v1(llama: Llama, *args: Any, **kwargs: Any) -> Any:
    try:
        from openai.types.chat import ChatCompletion, ChatCompletionChunk
    except ImportError as e:
        raise ImportError("create_chat_completion_openai_v1 needs the openai package") from e
    result = create_chat_completion(llama, *args, **kwargs)
    if kwargs.get("stream"):
        return (ChatCompletionChunk(**c) for c in result)
    return ChatCompletion(**result)
