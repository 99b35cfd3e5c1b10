"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Request problems are 4xx naming the field; a prompt longer than the context is a 400 with code
`context_length_exceeded`; only a bug in the server itself is a 500 (logged with its traceback).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("llama_dsv4.server")

_CONTEXT = re.compile(r"Requested tokens \((at least )?(\d+)\) exceed context window of (\d+)")
_CONTEXT_CHARS = re.compile(r"the prompt is over \d+ characters: more than a context of \d+ tokens can hold")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(path: str) -> APIError:
    return APIError(404, f"no route {path}", "invalid_request_error", None, "not_found")


_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "int_", "float_"}


def from_validation(e: ValidationError) -> APIError:
    """The first problem pydantic found, as `field.path: message` (a value that matches none of a field's
    alternative forms is reported as such, not as the first alternative's complaint)."""
    err = e.errors(include_url=False)[0]
    path: list[str] = []
    alternatives = False
    for x in err.get("loc", ()):
        if isinstance(x, int):
            path.append(str(x))
        elif _FIELD.fullmatch(x) and x not in _TYPE_TAGS:
            path.append(x)
        else:  # a union member's tag (str, list[int], literal[...], a model's name): not part of the field's path
            alternatives = True
            break
    loc = ".".join(path)
    msg = err.get("msg", "invalid value")
    if err.get("type") == "value_error":  # our own validators' messages, without pydantic's "Value error, "
        msg = msg.removeprefix("Value error, ")
    if alternatives:
        msg = f"not one of the accepted forms (e.g. {msg[:1].lower() + msg[1:]})"
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


def from_exception(e: BaseException, prompt_param: str = "messages") -> APIError:
    """What an exception raised by a completion means for the client (`prompt_param`: the field holding the
    prompt, named when it does not fit the context)."""
    if isinstance(e, APIError):
        return e
    text = str(e)
    m = _CONTEXT.search(text)
    if m:
        at_least, n, ctx = m.group(1) or "", int(m.group(2)), int(m.group(3))
        return APIError(
            400,
            f"the prompt is {at_least}{n} tokens, which does not fit this server's context of {ctx} tokens per request "
            "(shorten the prompt, or start the server with a larger --ctx-size or fewer --parallel slots)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if _CONTEXT_CHARS.search(text):  # the chat prompt stopped rendering at the most the context could hold
        return APIError(
            400,
            f"{text} (shorten the messages, or start the server with a larger --ctx-size or fewer --parallel slots)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if isinstance(e, ConnectionError):  # the model's RPC servers failed (engine/isolated.py's RPCError)
        return APIError(503, f"the model is unavailable: {text}", "server_error")
    if isinstance(e, NotImplementedError):
        return APIError(501, text or "not implemented", "not_implemented_error")
    if isinstance(e, (ValueError, TypeError, KeyError)):
        # the engine's and chat layer's checks: bad messages, tools, schemas, grammars, token ids, templates
        return APIError(400, text.strip("'\"") or type(e).__name__)
    log.error("request failed", exc_info=(type(e), e, e.__traceback__))
    return APIError(500, f"internal error: {type(e).__name__}: {text}", "server_error")
