"""Chat templates from model files, rendered in a sandbox: an immutable sandboxed Jinja environment (no attribute
walks to Python internals, no mutation of passed objects) with llama-cpp-python's helpers (raise_exception,
strftime_now, trim/lstrip blocks, loop controls) plus what DeepSeek V4 templates use (from_json; tojson without
HTML escaping, as the official encoder's json.dumps(..., ensure_ascii=False)).

A template comes from a stranger's file, so a render is also bounded in time and memory (issue 9):

- every block executed (a loop iteration, a macro call, an if branch), call and filter costs a tick; a render may
  take MAX_TICKS of them and MAX_SECONDS of wall time (checked at each tick);
- every string or sequence a template builds (by `*`, `+`, `~`, `%`, a call, a filter, a captured block, a macro)
  is checked against MAX_SIZE before or right after it is built, repetition against MAX_REPEAT, padding and
  format widths against MAX_WIDTH, integer growth against MAX_INT_BITS; the prompt itself against MAX_OUTPUT;
- large results (1 MiB and more) are also charged to a per-render total (MAX_BIG_TOTAL), so a loop cannot keep
  many of them alive;
- turning a structure into text (output, `~`, string filters, tojson, format) first measures the structure
  through its nesting, so a small list that refers to itself many times over cannot print as terabytes.

Compiling is bounded too (Jinja turns a template into Python source, which Python compiles): the source may be
MAX_SOURCE characters of MAX_TOKENS tokens, blocks may nest MAX_NESTING deep and brackets MAX_BRACKETS deep
(checked on the lexer's tokens, before Jinja's parser and Python's compiler, which refuses more than 20 nested
loops and 100 levels of indentation); whatever compiling raises becomes a TemplateError.

Whatever fails, compile_template() and render() raise TemplateError (a ValueError).
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import io
import json
import re
import string
import time
import types
from typing import Any, cast

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Macro, Namespace, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template failed to compile or to render."""


class OutputTooLong(TemplateError):
    """A rendered template passed the length its caller allows."""


MAX_REPEAT = 1 << 20  # the most items a template may build by repetition ("x" * n, [x] * n)
MAX_SIZE = 1 << 24  # the largest string a template may build (characters; a sequence counts 8 per item)
MAX_OUTPUT = 1 << 24  # characters of a rendered prompt (a million tokens of text is ~4-8 Mi); callers may ask less
MAX_SOURCE = 256 << 10  # characters of a template (real ones: 17 KB at most among llama.cpp's 70 model templates)
MAX_TOKENS = 1 << 15  # lexer tokens of a template, whitespace aside (real ones: 2,500 at most among those)
MAX_NESTING = 16  # nested blocks (if, for, macro...): Python refuses 20 nested loops; real templates nest < 10
MAX_BRACKETS = 32  # nested brackets in an expression (Jinja's parser recurses per level)
MAX_BIG_TOTAL = 1 << 28  # characters of large (>= 1 MiB) intermediate results one render may create in all
MAX_TICKS = 1 << 20  # block executions, calls and filter applications per render
MAX_SECONDS = 10.0  # wall time per render
MAX_WIDTH = 10_000  # padding widths, format-spec widths and precisions, JSON indents
MAX_INT_BITS = 1 << 16  # integers a template may compute
_BIG = 1 << 20
_MACRO_TICKS = 16  # a macro call costs about as much as this many loop iterations
_TEXT_LIMIT = 1 << 20  # items (through nesting) of a structure that may be turned into text


class _Budget:
    __slots__ = ("big", "deadline", "ticks")

    def __init__(self) -> None:
        self.ticks = 0
        self.big = 0
        self.deadline = time.monotonic() + MAX_SECONDS


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("llama_dsv4_template_budget", default=None)


def _tick(n: int = 1) -> None:
    """Count `n` steps of work (a block, a call, a filter: plus one per 64 characters or per item it handled)."""
    b = _budget.get()
    if b is None:
        return
    b.ticks += n
    if b.ticks > MAX_TICKS:
        raise SecurityError(f"the template ran more than {MAX_TICKS} steps (a loop, recursion or data too large)")
    if (n > 1 or not b.ticks & 15) and time.monotonic() > b.deadline:
        raise SecurityError(f"the template ran longer than {MAX_SECONDS:g} s")


def _charge(n: int) -> None:
    if n < _BIG:
        return
    b = _budget.get()
    if b is None:
        return
    b.big += n
    if b.big > MAX_BIG_TOTAL:
        raise SecurityError(f"the template built more than {MAX_BIG_TOTAL} characters of large values")


def _size(x: Any, limit: int) -> int:
    """The size of `x` through its nesting (characters of strings, one per other item, shared parts counted each
    time they are referred to), counting stops once above `limit`."""
    if isinstance(x, str):
        return len(x)
    if not isinstance(x, (list, tuple, dict, set, frozenset, Namespace)):
        return 1
    total = 0
    stack = [x]
    while stack:
        y = stack.pop()
        total += len(y) if isinstance(y, (str, bytes)) else 1
        if isinstance(y, dict):
            stack.extend(y.keys())
            stack.extend(y.values())
        elif isinstance(y, (list, tuple, set, frozenset)):
            stack.extend(y)
        elif isinstance(y, Namespace):
            stack.extend(y._Namespace__attrs.values())  # type: ignore[attr-defined]
        if total > limit or len(stack) > limit:
            return limit + 1
    return total


def _check_text(x: Any, what: str) -> None:
    """`x` may be turned into text: not enormous, and not a function, class or module (whose text is Python's)."""
    if isinstance(x, (str, int, float, bool, type(None), Undefined)):
        return
    if callable(x) or isinstance(x, types.ModuleType):
        raise SecurityError(f"{what}: a {type(x).__name__} cannot be turned into text")
    if _size(x, _TEXT_LIMIT) > _TEXT_LIMIT:
        raise SecurityError(f"{what}: the value is too large to turn into text")


def _cost(x: Any) -> int:
    """Bytes-ish of a string (its characters) or a container (8 per item): what MAX_SIZE bounds."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple, dict, set, frozenset)):
        return 8 * len(x)
    return 0


def _work(x: Any) -> int:
    """Ticks for handling `x` in a call or filter: one per 64 characters of a string, one per item."""
    if isinstance(x, str):
        return 1 + len(x) // 64
    if isinstance(x, (list, tuple, dict, set, frozenset)):
        return 1 + len(x)
    return 1


def _check_result(x: Any, what: str = "a value") -> Any:
    """A value the template just built: bounded, and charged when large."""
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"{what}: an integer of more than {MAX_INT_BITS} bits")
    n = _cost(x)
    if n > MAX_SIZE:
        raise SecurityError(f"{what}: a value larger than {MAX_SIZE} characters (or {MAX_SIZE // 8} items)")
    _charge(n)
    return x


def _join(pieces: Any, limit: int, what: str) -> str:
    """The pieces joined, as they come: stops as soon as they pass `limit` characters."""
    out = io.StringIO()
    n = 0
    for p in pieces:
        n += len(p)
        if n > limit:
            raise SecurityError(f"{what} exceeds {limit} characters")
        out.write(p)
    s = out.getvalue()
    _charge(len(s))
    return s


def _check_width(width: Any, what: str) -> None:
    if (isinstance(width, int) and width > MAX_WIDTH) or (isinstance(width, str) and len(width) > MAX_WIDTH):
        raise SecurityError(f"{what}: width {width if isinstance(width, int) else len(width)} exceeds {MAX_WIDTH}")


_NUM = re.compile(r"\d+")
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_format(fmt: str, args: Any, kwargs: Any) -> None:
    """str.format: no nested specs, no huge widths or precisions, arguments that print in bounded size."""
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        if "{" in spec:
            raise SecurityError("str.format with nested format specs")
        if any(int(n) > MAX_WIDTH for n in _NUM.findall(spec)):
            raise SecurityError(f"str.format width or precision beyond {MAX_WIDTH}")
    for a in (*args, *kwargs.values()):
        _check_text(a, "str.format")


def _check_printf(fmt: str, args: Any) -> None:
    """`fmt % args` and the format filter: no '*' widths, no huge widths or precisions, bounded arguments."""
    for m in _PRINTF.finditer(fmt):
        for g in m.groups():
            if g == "*" or (g is not None and int(g) > MAX_WIDTH):
                raise SecurityError(f"%-format width or precision {g!r} is not allowed")
    for a in args if isinstance(args, tuple) else (args,):
        _check_text(a, "%-format")


def _check_str_method(owner: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Pre-checks for str methods whose result can be far larger than their inputs."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(args[0] if args else kwargs.get("width", 0), f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int) and len(owner) + owner.count("\t") * tab > MAX_SIZE:
            raise SecurityError(f"str.expandtabs result beyond {MAX_SIZE} characters")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        n = owner.count(old) if old else len(owner) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        if len(owner) + n * (len(new) - len(old)) > MAX_SIZE:
            raise SecurityError(f"str.replace result beyond {MAX_SIZE} characters")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        total = len(owner) * max(len(items) - 1, 0)
        for it in items:
            total += len(it) if isinstance(it, str) else 0
            if total > MAX_SIZE:
                raise SecurityError(f"str.join result beyond {MAX_SIZE} characters")


# ------------------------------------------------------------------------------------------------ filters

# filters that turn their value into text
_TEXT_FILTERS = frozenset(
    {
        "capitalize", "center", "e", "escape", "forceescape", "indent", "lower", "pprint", "safe", "string",
        "striptags", "title", "trim", "truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "replace",
        "xmlattr",
    }
)  # fmt: skip


def _filter_precheck(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if name in _TEXT_FILTERS:
        _check_text(value, f"filter {name}")
    if name == "center":
        _check_width(args[0] if args else kwargs.get("width", 80), "filter center")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        _check_width(width, "filter indent")
        if isinstance(value, str):
            w = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
            if len(value) + (value.count("\n") + 1) * w > MAX_SIZE:
                raise SecurityError(f"filter indent result beyond {MAX_SIZE} characters")
    elif name == "format" and isinstance(value, str):
        _check_printf(value, tuple(args) + tuple(kwargs.values()))
    elif name == "replace" and isinstance(value, str):
        _check_str_method(value, "replace", tuple(args), {})
    elif name == "wordwrap" and isinstance(value, str):
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        if isinstance(wrap, str) and (len(value) + 1) * len(wrap) > MAX_SIZE:
            raise SecurityError("filter wordwrap: wrapstring too long")
    elif name == "join" and isinstance(value, (list, tuple)):
        sep = args[0] if args else kwargs.get("d", "")
        total = (len(sep) if isinstance(sep, str) else 0) * max(len(value) - 1, 0)
        for it in value:
            _check_text(it, "filter join")
            total += _size(it, _TEXT_LIMIT) if not isinstance(it, str) else len(it)
            if total > MAX_SIZE:
                raise SecurityError(f"filter join result beyond {MAX_SIZE} characters")
    elif name == "sum" and isinstance(value, (list, tuple)):
        total = 0
        for it in value:
            total += _cost(it) if isinstance(it, (str, list, tuple)) else 1
            if total > MAX_SIZE:
                raise SecurityError("filter sum: the result would be too large")


def _guard_filter(name: str, f: Any) -> Any:
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # context / eval context / environment

    @functools.wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            value = args[skip]
            if name in ("join", "sum") and not isinstance(value, (str, list, tuple, dict, Undefined)):
                value = list(value)  # a generator (map, select...): its items are checked before they are joined
                args = (*args[:skip], value, *args[skip + 1 :])
            _tick(_work(value))
            _filter_precheck(name, value, args[skip + 1 :], kwargs)
        rv = _check_result(f(*args, **kwargs), f"filter {name}")
        _tick(_work(rv))
        return rv

    return guarded


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template raised: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    _check_width(indent, "tojson indent")
    _check_text(value, "tojson")  # measured first: nested references make slow, enormous JSON
    enc = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _join(enc.iterencode(value), MAX_SIZE, "tojson")  # the incremental encoder: stops as soon as too long


def _from_json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise TemplateError(f"from_json: not JSON: {value[:80]!r} ({e.msg})") from None


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _GenerationTags(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant masks): the body is rendered as is."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# ------------------------------------------------------------------------------------------------ environment


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles templates with a tick at the start of every block (so every loop iteration and macro call counts)
    and `~` through a bounded join."""

    def blockvisit(self, nodes: Any, frame: Frame) -> None:
        self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:  # not our configuration: keep Jinja's, checked after
            self.write("environment.checked(")
            super().visit_Concat(node, frame)
            self.write(")")
            return
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedTemplate(jinja2.Template):
    def render(self, *args: Any, **kwargs: Any) -> str:
        return self.render_bounded(dict(*args, **kwargs), MAX_OUTPUT)

    def render_bounded(self, variables: dict[str, Any], max_output: int) -> str:
        """The text, streamed and counted: the render stops once it passes `max_output` characters."""
        token = _budget.set(_Budget())
        try:
            ctx = self.new_context(variables)
            try:
                out = io.StringIO()
                n = 0
                for piece in self.root_render_func(ctx):
                    n += len(piece)
                    if n > max_output:
                        raise OutputTooLong(f"the rendered template passes {max_output} characters")
                    out.write(piece)
                return out.getvalue()
            except Exception:
                self.environment.handle_exception()
        finally:
            _budget.reset(token)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds of this module's docstring."""

    code_generator_class = _GuardedCodeGenerator
    template_class = _BoundedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    @staticmethod
    def tick() -> None:
        _tick()

    @staticmethod
    def checked(value: Any) -> Any:
        return _check_result(value, "~")

    @staticmethod
    def concat_values(values: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...` with each part turned into text in bounded size."""
        parts = []
        for v in values:
            _check_text(v, "~")
            parts.append(v if isinstance(v, str) else str(v))
        return _join(parts, MAX_SIZE, "~")

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """Captured blocks ({% set %}...{% endset %}, macros, filter blocks)."""
        return _join(pieces, MAX_SIZE, "a captured block")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > MAX_REPEAT:
                        raise SecurityError(f"repetition beyond {MAX_REPEAT} items")
                    if not isinstance(seq, str) and n > 1 and _size(seq, MAX_SIZE // n) * n > MAX_SIZE:
                        raise SecurityError(f"repetition beyond {MAX_SIZE} items through nesting")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise SecurityError(f"integer product beyond {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError("exponent too large")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and left.bit_length() * right > MAX_INT_BITS
            ):
                raise SecurityError(f"power beyond {MAX_INT_BITS} bits")
        elif (
            operator == "+"
            and isinstance(left, (str, list, tuple))
            and isinstance(right, (str, list, tuple))
            and _cost(left) + _cost(right) > MAX_SIZE
        ):
            raise SecurityError(f"concatenation beyond {MAX_SIZE} characters (or {MAX_SIZE // 8} items)")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return _check_result(super().call_binop(context, operator, left, right), f"operator {operator}")

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(attribute, str) and attribute.startswith("_"):  # private or dunder: refused, existing or not
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """An unsafe attribute fails at once (Jinja's own sandbox returns an undefined that fails only when used,
        and that `|attr` chains turn into a silent empty string)."""
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        _tick(_work(owner) + (_MACRO_TICKS if isinstance(obj, Macro) else 0))
        if isinstance(owner, str):
            _check_str_method(owner, getattr(obj, "__name__", ""), args, kwargs)
        rv = _check_result(super().call(context, obj, *args, **kwargs), "a call")
        _tick(_work(rv))
        return rv

    def wrap_str_format(self, value: Any) -> Any:
        fmt_call = super().wrap_str_format(value)
        if fmt_call is None:
            return None
        fmt = value.__self__

        def checked_format(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, args, kwargs)
            if args and isinstance(args[0], dict):  # format_map
                _check_format(fmt, (), args[0])
            return _check_result(fmt_call(*args, **kwargs), "str.format")

        return checked_format


def _finalize(value: Any) -> Any:
    """Output of `{{ ... }}`: structures are measured before Jinja turns them into text."""
    _check_text(value, "output")
    return value


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTags, "jinja2.ext.loopcontrols"],
        finalize=_finalize,
    )
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: no chat template needs it
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    env.filters["from_json"] = _from_json
    for name, f in list(env.filters.items()):
        env.filters[name] = _guard_filter(name, f)
    return env


_OPENERS = frozenset({"if", "for", "macro", "call", "filter", "block", "with", "autoescape", "generation", "trans"})


def _check_source(source: str) -> None:
    """Size, tokens and nesting from the lexer's tokens (linear, no recursion), before anything compiles."""
    if not isinstance(source, str):
        raise TemplateError(f"a chat template is a string, not {type(source).__name__}")
    if len(source) > MAX_SOURCE:
        raise TemplateError(f"the chat template is {len(source)} characters long; at most {MAX_SOURCE} are allowed")
    tokens = depth = brackets = 0
    head: str | None = None  # the tag name of the block tag being read
    assigns = False  # a `{% set %}` with `=` (no end tag)
    in_block = False
    for _, kind, value in environment().lex(source):
        if kind != "whitespace":
            tokens += 1
            if tokens > MAX_TOKENS:
                raise TemplateError(f"the chat template has more than {MAX_TOKENS} tokens")
        if kind in ("block_begin", "variable_begin"):
            in_block, head, assigns = kind == "block_begin", None, False
        elif kind == "name" and in_block and head is None:
            head = value
        elif kind == "operator":
            if value in "([{":
                brackets += 1
                if brackets > MAX_BRACKETS:
                    raise TemplateError(f"the chat template nests brackets more than {MAX_BRACKETS} deep")
            elif value in ")]}":
                brackets = max(0, brackets - 1)
            elif value == "=" and brackets == 0:
                assigns = True
        elif kind == "block_end" and head is not None:
            if head in _OPENERS or (head == "set" and not assigns):
                depth += 1
                if depth > MAX_NESTING:
                    raise TemplateError(f"the chat template nests blocks more than {MAX_NESTING} deep")
            elif head.startswith("end"):
                depth = max(0, depth - 1)
            in_block, head = False, None


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> _BoundedTemplate:
    """The template compiled in the sandbox, within this module's bounds (TemplateError otherwise)."""
    try:
        _check_source(source)
        return cast(_BoundedTemplate, environment().from_string(source))
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None
    except Exception as e:  # Python's compiler on Jinja's output: IndentationError, SyntaxError, RecursionError...
        raise TemplateError(f"the chat template does not compile: {type(e).__name__}: {e}") from None


def render(source: str, /, **variables: Any) -> str:
    """The template rendered with `variables`, in the sandbox, at most MAX_OUTPUT characters."""
    return render_bounded(source, variables, MAX_OUTPUT)


def render_bounded(source: str, variables: dict[str, Any], max_output: int) -> str:
    """The template rendered with `variables`; TemplateError once its text passes `max_output` characters."""
    try:
        return compile_template(source).render_bounded(variables, min(max_output, MAX_OUTPUT))
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template tried something unsafe: {e}") from None
    except Exception as e:  # whatever an untrusted template makes happen is its failure, reported as such
        raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
