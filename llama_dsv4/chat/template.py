"""Chat templates from model files, rendered in a sandbox: an immutable sandboxed Jinja environment (no attribute
walks to Python internals, no mutation of passed objects) with llama-cpp-python's helpers (raise_exception,
strftime_now, trim/lstrip blocks, loop controls) plus what DeepSeek V4 templates use (from_json; tojson without
HTML escaping, as the official encoder's json.dumps(..., ensure_ascii=False))."""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template failed to compile or to render."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


def _tojson(value: Any, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=bool(kw.get("sort_keys", False)))


def _from_json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise TemplateError(f"from_json: not JSON: {value[:80]!r} ({e.msg})") from None


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    env.filters["from_json"] = _from_json
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    try:
        return environment().from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


def render(source: str, **variables: Any) -> str:
    try:
        return compile_template(source).render(**variables)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried something unsafe: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
