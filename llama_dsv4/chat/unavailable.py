"""llama-cpp-python's chat handlers that cannot apply to a DeepSeek V4 model: they exist by name (so that code
importing them loads), and making or calling one raises ChatFormatUnavailable saying why.

- functionary ("functionary", "functionary-v1", "functionary-v2"): written for functionary models, their tokenizer
  and the tool-call markup they were trained on. DeepSeek V4 calls tools in its own DSML markup, which the
  default chat format parses.
- the multimodal handlers (Llava15ChatHandler and its subclasses, MTMDChatHandler, Gemma4ChatHandler): they put
  images through a vision encoder (a CLIP / mmproj file) into the model; DeepSeek V4 has no vision input.
"""

from __future__ import annotations

from typing import Any, NoReturn


class ChatFormatUnavailable(NotImplementedError):
    """A llama-cpp-python chat handler or format that cannot apply to a DeepSeek V4 model."""


FUNCTIONARY = ("functionary", "functionary-v1", "functionary-v2")

_TOOLS_INSTEAD = (
    "DeepSeek V4 calls tools in its own DSML markup, which llama-dsv4's default chat format parses: pass `tools` "
    "to create_chat_completion without a chat_format"
)


class UnavailableChatHandler:
    """The registered chat format `name` that cannot apply (functionary): calling it raises ChatFormatUnavailable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, **kwargs: Any) -> NoReturn:
        raise ChatFormatUnavailable(
            f"chat format {self.name!r} is for functionary models: it needs a functionary model's Hugging Face "
            f"tokenizer and the tool-call markup that model was trained on; {_TOOLS_INSTEAD}"
        )


functionary_chat_handler = UnavailableChatHandler("functionary")
functionary_v1_v2_chat_handler = UnavailableChatHandler("functionary-v2")


class _VisionChatHandler:
    """A multimodal chat handler: refused when made, as DeepSeek V4 has no vision input."""

    def __init__(self, clip_model_path: str = "", verbose: bool = True, **kwargs: Any) -> None:
        self._refuse()

    @classmethod
    def _refuse(cls) -> NoReturn:
        raise ChatFormatUnavailable(
            f"{cls.__name__} feeds images through a vision encoder (a CLIP / mmproj model) into the model; DeepSeek V4 "
            "has no vision input, so multimodal chat handlers cannot apply to it (send text messages, with the "
            "default chat format)"
        )

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, **kwargs: Any) -> NoReturn:
        """Refused, as making one is (nothing is downloaded)."""
        cls._refuse()

    def __call__(self, **kwargs: Any) -> NoReturn:
        self._refuse()


class Llava15ChatHandler(_VisionChatHandler):
    pass


class Llava16ChatHandler(Llava15ChatHandler):
    pass


class ObsidianChatHandler(Llava15ChatHandler):
    pass


class MoondreamChatHandler(Llava15ChatHandler):
    pass


class NanoLlavaChatHandler(Llava15ChatHandler):
    pass


class Llama3VisionAlphaChatHandler(Llava15ChatHandler):
    pass


class MiniCPMv26ChatHandler(Llava15ChatHandler):
    pass


class Qwen25VLChatHandler(Llava15ChatHandler):
    pass


class MTMDChatHandler(_VisionChatHandler):
    pass


class Gemma4ChatHandler(MTMDChatHandler):
    pass


Llama3VisionAlpha = Llama3VisionAlphaChatHandler
