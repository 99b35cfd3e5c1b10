"""Chat formats by name.

A chat completion handler is a callable with llama-cpp-python's protocol (`LlamaChatCompletionHandler`): keyword
arguments `llama`, `messages` and the OpenAI request parameters, returning a chat completion or an iterator of
chunks. Registries map names to handlers:

- the process-wide one, chat/formats.py's `LlamaChatCompletionHandlerRegistry()` (the same object at every call,
  as in llama-cpp-python): the built-in formats ("deepseek-v4", "chatml", "llama-2", ...) and whatever user code
  registers;
- each Llama's own, `Llama.chat_formats`: the model file's templates ("chat_template.default",
  "chat_template.<name>") and a template given by the server (`--chat-template[-file]`), over the process-wide one.

`Llama(chat_format=NAME)` is looked up in the Llama's registry, then in the process-wide one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class LlamaChatCompletionHandlerNotFoundException(Exception):
    """No chat format of that name."""


class LlamaChatCompletionHandler(Protocol):
    """What a chat format does: `handler(llama=..., messages=..., tools=..., temperature=..., stream=..., ...)`
    returns a chat completion, or with stream=True an iterator of chat completion chunks."""

    def __call__(self, *, llama: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any: ...


class ChatFormatRegistry:
    """Names -> chat completion handlers, over an optional parent registry that is searched after this one."""

    def __init__(self, parent: ChatFormatRegistry | None = None) -> None:
        self._handlers: dict[str, LlamaChatCompletionHandler] = {}
        self._parent = parent

    def _own(self) -> dict[str, LlamaChatCompletionHandler]:
        return self._handlers

    def register_chat_completion_handler(
        self, name: str, chat_handler: LlamaChatCompletionHandler, overwrite: bool = False
    ) -> None:
        """Register `chat_handler` as `name` here; ValueError if the name is taken and not `overwrite`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a chat format name is a non-empty string, not {name!r}")
        if not callable(chat_handler):
            raise TypeError(f"chat format {name!r}: the handler must be callable, got {type(chat_handler).__name__}")
        own = self._own()
        if name in own and not overwrite:
            raise ValueError(
                f"Formatter with name '{name}' is already registered. Use `overwrite=True` to overwrite it."
            )
        own[name] = chat_handler

    def unregister_chat_handler(self, name: str) -> None:
        """Remove `name` from this registry (not from its parent); ValueError if it is not registered here."""
        own = self._own()
        if name not in own:
            raise ValueError(f"No formatter registered under the name '{name}'.")
        del own[name]

    def get_chat_completion_handler_by_name(self, name: str) -> LlamaChatCompletionHandler:
        """The handler registered as `name` here or in the parent; LlamaChatCompletionHandlerNotFoundException
        (naming the formats there are) otherwise."""
        handler = self._own().get(name) if isinstance(name, str) else None
        if handler is not None:
            return handler
        if self._parent is not None and name in self._parent:
            return self._parent.get_chat_completion_handler_by_name(name)
        raise LlamaChatCompletionHandlerNotFoundException(
            f"Invalid chat handler: {name} (valid formats: {self.names()})"
        )

    def names(self) -> list[str]:
        """Every name this registry answers, sorted."""
        parent = self._parent.names() if self._parent is not None else []
        return sorted({*self._own(), *parent})

    def __contains__(self, name: object) -> bool:
        return name in self._own() or (self._parent is not None and name in self._parent)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
