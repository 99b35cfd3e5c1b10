"""The process-wide chat-format registry (`LlamaChatCompletionHandlerRegistry()`, llama-cpp-python's) and the
built-in formats registered in it when this module is first imported:

- "deepseek-v4": llama-dsv4's DeepSeek V4 template (the default where a model file has no template of its own);
  reasoning, DSML tool calls and constrained output as chat/handlers.py describes.
- llama-cpp-python's named formats ("chatml", "llama-2", "llama-3", "mistral-instruct", "gemma", ...): each renders
  the prompt llama-cpp-python 0.3.36 renders for it (tests/data/chat_format_ref.json holds its prompts), which is
  tokenized with the Llama's own tokenizer (for a DeepSeek V4 model, markers such as `<|im_start|>` are text, not
  special tokens) and completed on the Llama, stopping at the format's stop strings (chat/formatter.py). Two
  upstream renderings lose the conversation and are fixed here: "open-orca" kept no user or assistant message
  (it looked for roles spelled "User" and "Assistant") and "saiga" no assistant message (it looked for "bot");
  "intel" printed a literal "{system_message}" where the system message belongs.
- "chatml-function-calling": ChatML with tools in the system message and constrained calls (chat/chatml_tools.py).
- "functionary", "functionary-v1", "functionary-v2": names only; they need a functionary model's own tokenizer and
  trained markup, so using them raises ChatFormatUnavailable (chat/unavailable.py) saying so. DeepSeek V4 calls
  tools in its own markup: the default format parses those calls.
"""

from __future__ import annotations

from typing import Any

from .chatml_tools import chatml_function_calling
from .formatter import ChatFormatter, ChatFormatterResponse, chat_formatter_to_chat_completion_handler
from .handlers import TemplateChatHandler
from .registry import ChatFormatRegistry, LlamaChatCompletionHandler
from .templates import default_chat_template
from .unavailable import FUNCTIONARY, UnavailableChatHandler

Messages = list[dict[str, Any]]
Turn = tuple[str, str | None]  # (role marker, text; None where the turn is open for the model to write)


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return None


def _system(messages: Messages) -> str:
    """The first system message's text, or ""."""
    return next((_text(m.get("content")) or "" for m in messages if m.get("role") == "system"), "")


def _turns(messages: Messages, roles: dict[str, str], open_role: str | None = None) -> list[Turn]:
    """The messages whose role `roles` maps, as (marker, text); then an open turn for `open_role` if given."""
    out: list[Turn] = [(roles[m["role"]], _text(m.get("content"))) for m in messages if m.get("role") in roles]
    return [*out, (roles[open_role], None)] if open_role else out


def _join(head: str, turns: list[Turn], between: str, seps: tuple[str, ...], open_end: str, start: int = 0) -> str:
    """head, then each turn as marker + between + text + the next separator (round robin), or, for a turn with no
    text, marker + open_end."""
    out = [head]
    for i, (role, text) in enumerate(turns, start):
        out.append(role + between + text + seps[i % len(seps)] if text else role + open_end)
    return "".join(out)


def _colon(system: str, turns: list[Turn], seps: tuple[str, ...], open_end: str = ":") -> str:
    """`system<sep>Role: text<sep>...Role:` (llama-cpp-python's add-colon styles)."""
    return _join(system + seps[0], turns, ": ", seps, open_end)


def _chatml(system: str, turns: list[Turn], sep: str) -> str:
    """`system<sep>\\nrole\\ntext<sep>\\n...role\\n` (the ChatML layout, with each format's markers)."""
    return _join(system + sep + "\n" if system else "", turns, "\n", (sep + "\n",), "\n")


def _roles(user: str, assistant: str, **more: str) -> dict[str, str]:
    return {"user": user, "assistant": assistant, **more}


def format_llama2(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = _system(messages)
    turns = _turns(messages, _roles("<s>[INST]", "[/INST]"))
    seps = (" ", "</s>")
    head, start = " ", 0
    if system:  # the system block, then the first message's text without its marker
        head = f"[INST] <<SYS>>\n{system}\n<</SYS>> "
        if turns:
            head, turns, start = head + (turns[0][1] or "") + seps[0], turns[1:], 1
    return ChatFormatterResponse(_join(head, turns, "", (" " + seps[0], " " + seps[1]), " ", start) + "[/INST]")


def format_llama3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    roles = {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")}
    sep = "<|eot_id|>"
    return ChatFormatterResponse(_join("", _turns(messages, roles, "assistant"), "", (sep,), ""), stop=sep)


def format_alpaca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("### Instruction", "### Response"))
    return ChatFormatterResponse(_colon(_system(messages), turns, ("\n\n", "</s>")))


def format_qwen(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "<|im_start|>system\n" + (_system(messages) or "You are a helpful assistant.")
    turns = _turns(messages, _roles("<|im_start|>user", "<|im_start|>assistant"), "assistant")
    return ChatFormatterResponse(_chatml(system, turns, "<|im_end|>"), stop="<|endoftext|>")


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def format_vicuna(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("USER", "ASSISTANT"), "assistant")
    return ChatFormatterResponse(_colon(VICUNA_SYSTEM, turns, (" ", "</s>")))


def format_oasst_llama(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = f"[INST] <<SYS>>\n{_system(messages)}\n<</SYS>>\n\n"
    turns = _turns(messages, _roles("<|prompter|>", "<|assistant|>"), "assistant")
    return ChatFormatterResponse(_join(system, turns, "", ("</s>",), ""))


def _baichuan(user: str, assistant: str) -> Any:
    def format_baichuan(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        turns = _turns(messages, _roles(user, assistant), "assistant")
        return ChatFormatterResponse(_join(_system(messages), turns, "", ("",), ""))

    return format_baichuan


format_baichuan2 = _baichuan("<reserved_106>", "<reserved_107>")
format_baichuan = _baichuan("<reserved_102>", "<reserved_103>")

OPENBUDDY_SYSTEM = """You are a helpful, respectful and honest INTP-T AI Assistant named Buddy. You are talking to a human User.
Always answer as helpfully and logically as possible, while being safe. Your answers should not include any harmful, political, religious, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.
If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.
You can speak fluently in many languages, for example: English, Chinese.
You cannot access the internet, but you have vast knowledge, cutoff: 2021-09.
You are trained by OpenBuddy team, (https://openbuddy.ai, https://github.com/OpenBuddy/OpenBuddy), you are based on LLaMA and Falcon transformers model, not related to GPT or OpenAI.

"""  # noqa: E501  the format's system prompt, verbatim


def format_openbuddy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("User", "Assistant"), "assistant")
    return ChatFormatterResponse(_colon(OPENBUDDY_SYSTEM, turns, ("\n",)))


def format_redpajama_incite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("<human>", "<bot>"), "assistant")
    return ChatFormatterResponse(_colon(_system(messages), turns, ("\n",)), stop="<human>")


SNOOZY_SYSTEM = (
    "The prompt below is a question to answer, a task to complete, or a conversation to respond to; decide which "
    "and write an appropriate response."
)


def format_snoozy(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("### Prompt", "### Response"), "assistant")
    return ChatFormatterResponse(_colon(_system(messages) or SNOOZY_SYSTEM, turns, ("\n",)), stop="###")


def format_phind(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    system = "### System Prompt\nYou are an intelligent programming assistant."
    turns = _turns(messages, _roles("### User Message", "### Assistant"), "assistant")
    return ChatFormatterResponse(_colon(system, turns, ("\n\n",)))


def format_intel(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("### User:", "### Assistant:"), "assistant")
    return ChatFormatterResponse(_colon("### System:\n" + _system(messages), turns, ("\n",)))


OPEN_ORCA_SYSTEM = (
    "You are a helpful assistant. Please answer truthfully and write out your thinking step by step to be sure you "
    "get the right answer. If you make a mistake or encounter an error in your thinking, say so out loud and "
    "attempt to correct it. If you don't know or aren't sure about something, say so clearly. You will act as a "
    "professional logician, mathematician, and physicist. You will also act as the most appropriate type of "
    "expert to answer any particular question or solve the relevant problem; state which expert type your are, if "
    "so. Also think of any particular named expert that would be ideal to answer the relevant question or solve "
    "the relevant problem; name and act as them, if appropriate."
)


def format_open_orca(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("User", "Assistant"), "assistant")
    return ChatFormatterResponse(_colon(OPEN_ORCA_SYSTEM, turns, ("<|end_of_turn|>\n",), ": "), stop="User")


def format_mistrallite(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("<|prompter|>", "</s>\n<|assistant|>"), "assistant")
    return ChatFormatterResponse(_join(f"<|system|>{_system(messages)}</s>", turns, "", (" ",), ""))


def _chatml_like(system: str, user: str, assistant: str, sep: str, stop: str | None = None) -> Any:
    """A format in the ChatML layout: `system` with {} for the system message, the role markers, the separator."""

    def format_chatml_like(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
        turns = _turns(messages, _roles(user, assistant), "assistant")
        return ChatFormatterResponse(_chatml(system.format(_system(messages)), turns, sep), stop=stop or sep)

    return format_chatml_like


format_zephyr = _chatml_like("<|system|>\n{}", "<|user|>\n", "<|assistant|>\n", "</s>")
format_pygmalion = _chatml_like("<|system|>{}", "<|user|>", "<|model|>", "\n")
format_chatml = _chatml_like("<|im_start|>system\n{}", "<|im_start|>user", "<|im_start|>assistant", "<|im_end|>")
format_openchat = _chatml_like(
    "{}<|end_of_turn|>", "GPT4 Correct User: ", "<|end_of_turn|>GPT4 Correct Assistant: ", "<|end_of_turn|>"
)


def format_mistral_instruct(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    out = []
    for m in messages:
        text = m.get("content")
        if m.get("role") == "user" and isinstance(text, str):
            out.append("[INST] " + text)
        elif m.get("role") == "assistant" and text is not None:
            out.append(" [/INST]" + (_text(text) or "") + "</s>")
    return ChatFormatterResponse("".join(out) + " [/INST]", stop="</s>")


def format_chatglm3(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("<|user|>", "<|assistant|>"), "assistant")
    return ChatFormatterResponse(_join("<|system|>\n" + _system(messages), turns, "\n ", ("",), ""), stop="</s>")


def format_saiga(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:
    turns = _turns(messages, _roles("user", "bot", system="system", bot="bot"))
    body = _join("", [(f"<s>{role}\n", text) for role, text in turns], "", ("</s>",), "")
    return ChatFormatterResponse((body + "<s>bot").strip())


def format_gemma(messages: Messages, **kwargs: Any) -> ChatFormatterResponse:  # Gemma has no system role
    turns = _turns(messages, _roles("<start_of_turn>user\n", "<start_of_turn>model\n"), "assistant")
    sep = "<end_of_turn>\n"
    return ChatFormatterResponse(_join("", turns, "", (sep,), ""), stop=sep)


NAMED_FORMATS = {
    "llama-2": format_llama2,
    "llama-3": format_llama3,
    "alpaca": format_alpaca,
    "qwen": format_qwen,
    "vicuna": format_vicuna,
    "oasst_llama": format_oasst_llama,
    "baichuan-2": format_baichuan2,
    "baichuan": format_baichuan,
    "openbuddy": format_openbuddy,
    "redpajama-incite": format_redpajama_incite,
    "snoozy": format_snoozy,
    "phind": format_phind,
    "intel": format_intel,
    "open-orca": format_open_orca,
    "mistrallite": format_mistrallite,
    "zephyr": format_zephyr,
    "pygmalion": format_pygmalion,
    "chatml": format_chatml,
    "mistral-instruct": format_mistral_instruct,
    "chatglm3": format_chatglm3,
    "openchat": format_openchat,
    "saiga": format_saiga,
    "gemma": format_gemma,
}


class LlamaChatCompletionHandlerRegistry(ChatFormatRegistry):
    """The process-wide registry: `LlamaChatCompletionHandlerRegistry()` is the same object at every call, holding
    the built-in formats of this module and what user code registers."""

    _instance: LlamaChatCompletionHandlerRegistry | None = None

    def __new__(cls) -> LlamaChatCompletionHandlerRegistry:
        if cls._instance is None:
            inst = super().__new__(cls)
            ChatFormatRegistry.__init__(inst)
            cls._instance = inst
        return cls._instance

    def __init__(self) -> None:  # set up once, in __new__
        pass


def get_chat_completion_handler(name: str) -> LlamaChatCompletionHandler:
    """The process-wide handler registered as `name` (llama-cpp-python's function)."""
    return LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)


def register_chat_completion_handler(name: str) -> Any:
    """Decorator: register the decorated handler process-wide as `name` (llama-cpp-python's; ValueError if taken)."""

    def decorator(f: LlamaChatCompletionHandler) -> LlamaChatCompletionHandler:
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, f)
        return f

    return decorator


def register_chat_format(name: str) -> Any:
    """Decorator: register the decorated chat formatter process-wide as the chat format `name` (ValueError if the
    name is taken); returns the formatter unchanged."""

    def decorator(f: ChatFormatter) -> ChatFormatter:
        handler = chat_formatter_to_chat_completion_handler(f)
        LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(name, handler)
        return f

    return decorator


def _register() -> None:
    registry = LlamaChatCompletionHandlerRegistry()
    registry.register_chat_completion_handler(
        "deepseek-v4", TemplateChatHandler(default_chat_template(), "deepseek-v4", compile_now=False)
    )
    for name, formatter in NAMED_FORMATS.items():
        registry.register_chat_completion_handler(name, chat_formatter_to_chat_completion_handler(formatter))
    registry.register_chat_completion_handler("chatml-function-calling", chatml_function_calling)
    for name in FUNCTIONARY:
        registry.register_chat_completion_handler(name, UnavailableChatHandler(name))


_register()
