"""Chat formatters: llama-cpp-python's second way to define a chat format, as a function from messages to a prompt.

A chat formatter returns a `ChatFormatterResponse` (the prompt text, its stop strings, whether the prompt already
holds the BOS); `chat_formatter_to_chat_completion_handler` makes a chat completion handler of it, which tokenizes
the prompt with the Llama's tokenizer and generates through its engine:

- `stop` is the request's stop strings plus the formatter's; the answer is the text, as content;
- `response_format` (json_object, json_schema) and `grammar` constrain decoding as in the DeepSeek V4 path;
- a named `tool_choice` (an object or a function's name) constrains the answer to that function's parameters and
  returns it as a tool call (finish_reason "tool_calls", or "length" when cut);
- `tool_choice` "auto" gives the formatter the tools (a template may show them) and returns the text as content:
  a named format has no tool-call markup to read calls from; "required" is refused for that reason.

Request keyword arguments the handler does not know (and `chat_template_kwargs`) reach the formatter, as template
variables for `Jinja2ChatFormatter`. Templates render in the sandbox of chat/template.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Protocol

from ..sampling import StoppingCriteriaList, constrained
from . import template as tmpl
from .registry import LlamaChatCompletionHandler
from .request import ChatRequest, prompt_tokens, stop_list
from .response import call_stream, chat_response, chat_stream, tool_calls_response

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ..llama import Llama

IGNORED_PARAMS = frozenset({"parallel_tool_calls", "reasoning_format"})  # DeepSeek V4 path options


@dataclasses.dataclass
class ChatFormatterResponse:
    """A formatted prompt: its text, the stop string(s) of its format, an optional stopping criteria list, and
    whether the text already holds the special tokens that start a prompt (otherwise the BOS is added)."""

    prompt: str
    stop: str | list[str] | None = None
    stopping_criteria: StoppingCriteriaList | None = None
    added_special: bool = False


class ChatFormatter(Protocol):
    """`formatter(messages=[...], **kwargs)` -> ChatFormatterResponse."""

    def __call__(self, *, messages: list[dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse: ...


class Jinja2ChatFormatter:
    """A chat formatter from a Jinja chat template (Hugging Face conventions: `messages`, `bos_token`,
    `eos_token`, `add_generation_prompt`, `tools`, `raise_exception`, `strftime_now`), rendered in llama-dsv4's
    bounded sandbox. The template is compiled when the formatter is made (TemplateError, a ValueError, if it
    cannot be); a prompt stops at `eos_token`, and at any of `stop_token_ids` when given."""

    def __init__(
        self,
        template: str,
        eos_token: str,
        bos_token: str,
        add_generation_prompt: bool = True,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.template = template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.add_generation_prompt = add_generation_prompt
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
        tmpl.compile_template(template)

    def __call__(
        self,
        *,
        messages: list[dict[str, Any]],
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> ChatFormatterResponse:
        variables = {
            "messages": messages,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "add_generation_prompt": self.add_generation_prompt,
            "functions": functions,
            "function_call": function_call,
            "tools": tools,
            "tool_choice": tool_choice,
            **kwargs,
        }
        prompt = tmpl.render_bounded(self.template, variables, tmpl.MAX_OUTPUT)
        criteria = None
        if self.stop_token_ids is not None:
            stop_ids = self.stop_token_ids

            def stop_on_token(tokens: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
                return len(tokens) > 0 and int(tokens[-1]) in stop_ids

            criteria = StoppingCriteriaList([stop_on_token])
        return ChatFormatterResponse(
            prompt=prompt, stop=[self.eos_token], stopping_criteria=criteria, added_special=True
        )

    def to_chat_handler(self) -> LlamaChatCompletionHandler:
        """This formatter as a chat completion handler."""
        return chat_formatter_to_chat_completion_handler(self)


def _named_tool(tools: Any, name: str) -> dict[str, Any]:
    for t in tools or ():
        f = t.get("function") if isinstance(t, dict) else None
        if isinstance(f, dict) and f.get("name") == name:
            return f
    raise ValueError(f"Tool choice '{name}' not found in tools.")


class FormatterChatHandler:
    """A chat completion handler that formats the prompt with a chat formatter and completes it on the Llama (see
    the module's docstring for what it does with each request parameter)."""

    takes_template_kwargs = True  # create_chat_completion passes template variables on to it

    def __init__(self, formatter: ChatFormatter) -> None:
        self.formatter = formatter

    def __call__(self, *, llama: Llama, messages: Any, **kwargs: Any) -> Any:
        """Answer a chat request (the handler protocol's keyword arguments, chat/request.py)."""
        req = ChatRequest.read(llama, messages, **kwargs)
        variables = {k: v for k, v in req.extra.items() if k not in IGNORED_PARAMS}
        result = self.formatter(messages=req.messages, **req.given_tools, **variables)
        if not isinstance(getattr(result, "prompt", None), str):
            raise TypeError(f"a chat formatter returns a ChatFormatterResponse, got {type(result).__name__}")
        if req.choice == "required":
            raise ValueError(
                "tool_choice 'required': this chat format has no tool-call markup to read calls from; name the "
                "function (tool_choice={'type': 'function', 'function': {'name': ...}}) or use the model's own "
                "chat format (chat_format='deepseek-v4'), which parses tool calls"
            )
        named = req.named
        forced = None
        if named is not None:
            forced = constrained.from_json_schema(_named_tool(req.tools, named).get("parameters") or {"type": "object"})
        completion = llama.create_completion(
            prompt=prompt_tokens(llama, result.prompt, add_bos=not result.added_special),
            stream=req.stream,
            stop=stop_list(req.stop, result.stop),
            stopping_criteria=result.stopping_criteria,
            grammar=req.decoding_grammar(forced),
            logprobs=req.n_logprobs,
            **req.sampling,
        )
        if named is not None:
            if req.stream:
                return call_stream(completion, named)
            return tool_calls_response(llama, completion, [(named, completion["choices"][0]["text"])])
        if req.stream:
            return chat_stream(llama, completion)
        return chat_response(llama, completion)


def chat_formatter_to_chat_completion_handler(chat_formatter: ChatFormatter) -> LlamaChatCompletionHandler:
    """A chat completion handler that formats with `chat_formatter` and generates on the Llama it is called with."""
    return FormatterChatHandler(chat_formatter)


def _token_text(config: dict[str, Any], key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json writes it
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"tokenizer_config: {key!r} must be a string (or an object with 'content'), got {value!r}")
    return value


def hf_tokenizer_config_to_chat_formatter(
    tokenizer_config: dict[str, Any], add_generation_prompt: bool = True
) -> ChatFormatter:
    """A chat formatter from a Hugging Face tokenizer_config.json (as a dict): its `chat_template`, `bos_token`
    and `eos_token`. As llama-cpp-python, the generation prompt is an empty assistant message appended to the
    conversation, and the prompt stops at the EOS or BOS text."""
    if not isinstance(tokenizer_config, dict):
        raise ValueError(f"tokenizer_config must be a dict, got {type(tokenizer_config).__name__}")
    template = tokenizer_config.get("chat_template")
    if not isinstance(template, str):
        raise ValueError("tokenizer_config has no 'chat_template' string")
    bos, eos = _token_text(tokenizer_config, "bos_token"), _token_text(tokenizer_config, "eos_token")
    jinja = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=False)

    def format_tokenizer_config(messages: list[dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
        if add_generation_prompt:
            messages = [*messages, {"role": "assistant", "content": ""}]
        return ChatFormatterResponse(jinja(messages=messages, **kwargs).prompt, stop=[eos, bos], added_special=True)

    return format_tokenizer_config


def hf_tokenizer_config_to_chat_completion_handler(
    tokenizer_config: dict[str, Any], add_generation_prompt: bool = True
) -> LlamaChatCompletionHandler:
    """hf_tokenizer_config_to_chat_formatter's formatter as a chat completion handler."""
    formatter = hf_tokenizer_config_to_chat_formatter(tokenizer_config, add_generation_prompt=add_generation_prompt)
    return chat_formatter_to_chat_completion_handler(formatter)


def hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path: str | os.PathLike[str]) -> ChatFormatter:
    """A chat formatter from a Hugging Face tokenizer (`transformers.AutoTokenizer.from_pretrained`, which needs
    the `transformers` package): its chat template, rendered in llama-dsv4's sandbox as `apply_chat_template`
    would (no generation prompt unless `add_generation_prompt=True` is passed), stopping at its EOS."""
    try:
        from transformers import AutoTokenizer  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("hf_autotokenizer_to_chat_formatter needs transformers (pip install transformers)") from e
    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not isinstance(template, str):
        raise ValueError(f"the tokenizer of {os.fspath(pretrained_model_name_or_path)!r} has no chat template")
    eos = tokenizer.eos_token or ""
    jinja = Jinja2ChatFormatter(
        template, eos_token=eos, bos_token=tokenizer.bos_token or "", add_generation_prompt=False
    )

    def format_autotokenizer(messages: list[dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
        return ChatFormatterResponse(jinja(messages=messages, **kwargs).prompt, stop=eos or None, added_special=True)

    return format_autotokenizer


def hf_autotokenizer_to_chat_completion_handler(
    pretrained_model_name_or_path: str | os.PathLike[str],
) -> LlamaChatCompletionHandler:
    """hf_autotokenizer_to_chat_formatter's formatter as a chat completion handler."""
    return chat_formatter_to_chat_completion_handler(hf_autotokenizer_to_chat_formatter(pretrained_model_name_or_path))
