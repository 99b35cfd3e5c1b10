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
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template failed to compile or to render."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTags(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant masks): the body is rendered as is."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _from_json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise TemplateError(f"from_json: not JSON: {value[:80]!r} ({e.msg})") from None


MAX_REPEAT = 1 << 20  # the largest string or list a template may build by multiplication


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus bounds on `*` and `**` so a template cannot exhaust memory or CPU with
    "x" * 10**10 or 10**10**10 (ranges are already bounded by the sandbox)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(f"repetition beyond {MAX_REPEAT} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise jinja2.exceptions.SecurityError("exponent too large")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTags, "jinja2.ext.loopcontrols"],
    )
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
    except Exception as e:  # whatever an untrusted template makes happen is its failure, reported as such
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
