"""DeepSeek V4's DSML tool-call markup (docs/architecture.md §14.4): parsing it out of model text, and the
grammar that makes constrained decoding produce it.

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

String parameters are written as is (string="true"); every other value as JSON (string="false").
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..sampling.grammar_bounds import MAX_SCHEMA_CHARS, GrammarError, check_json_schema
from ..sampling.json_limits import with_limits

DSML = "｜DSML｜"
CALLS_OPEN = f"<{DSML}tool_calls>"
CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
_INVOKE = re.compile(rf'\s*<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.S)
_PARAM = re.compile(rf'\s*<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.S)


def parse_invoke(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of one `<｜DSML｜invoke ...>...</｜DSML｜invoke>`; None if it is malformed."""
    m = _INVOKE.fullmatch(text)
    if m is None:
        return None
    name, body = m.group(1), m.group(2)
    args: dict[str, Any] = {}
    pos = 0
    for p in _PARAM.finditer(body):
        if body[pos : p.start()].strip():
            return None
        key, is_string, value = p.groups()
        if key in args:
            return None
        if is_string == "true":
            args[key] = value
        else:
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError:
                return None
        pos = p.end()
    if body[pos:].strip():
        return None
    return name, args


# ------------------------------------------------------------------------------------------ grammar


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


_PLAIN_STRING_KEYS = {"type", "description", "title", "examples", "default"}


def _param_rule(name: str, schema: dict[str, Any], defs: dict[str, Any] | None, budget: list[int]) -> str:
    """The rule of one parameter; `budget` holds the characters of JSON schema the grammar may still embed."""
    as_text = _lit(f'<{DSML}parameter name="{name}" string="true">')
    as_json = _lit(f'<{DSML}parameter name="{name}" string="false">')
    close = _lit(f"</{DSML}parameter>\n")
    if isinstance(schema, dict) and schema.get("type") == "string" and set(schema) <= _PLAIN_STRING_KEYS:
        return f"{as_text} DSML_TEXT {close}"
    sub = dict(schema) if isinstance(schema, dict) else {}
    if defs:
        sub.setdefault("$defs", defs)
    budget[0] -= check_json_schema(sub, f"the schema of parameter {name!r}")  # what llguidance compiles: bounded
    if budget[0] < 0:
        raise GrammarError(f"the tools' parameter schemas come to more than {MAX_SCHEMA_CHARS} characters")
    return f"{as_json} %json{json.dumps(with_limits(sub), ensure_ascii=False)} {close}"


def tools_grammar(tools: list[dict[str, Any]], only: str | None = None) -> str:
    """A lark grammar (llguidance dialect) for one DSML tool-calls block calling the given function tools: one
    call of `only` when named, else one or more calls of any. Arguments follow each tool's parameters schema:
    required parameters in order, optional ones may be left out, nothing else."""
    funcs = [t["function"] for t in tools if t.get("type") == "function" and "function" in t]
    if only is not None:
        funcs = [f for f in funcs if f.get("name") == only]
        if not funcs:
            raise ValueError(f"tool_choice names the function {only!r}, which is not among the tools")
    if not funcs:
        raise ValueError("tool_choice needs at least one function tool")
    rules = []
    alts = []
    budget = [MAX_SCHEMA_CHARS]  # each parameter's schema (with the tool's $defs) is compiled on its own
    for i, f in enumerate(funcs):
        name = f.get("name")
        if not isinstance(name, str) or not name or '"' in name:
            raise ValueError(f"invalid tool name {name!r}")
        params = f.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        required = set(params.get("required", [])) if isinstance(params, dict) else set()
        defs = params.get("$defs") if isinstance(params, dict) else None
        parts = []
        if isinstance(props, dict) and props:
            for j, (pname, pschema) in enumerate(props.items()):
                if not isinstance(pname, str) or '"' in pname:
                    raise ValueError(f"invalid parameter name {pname!r} in tool {name!r}")
                rules.append(f"p{i}_{j}: {_param_rule(pname, pschema, defs, budget)}")
                parts.append(f"p{i}_{j}" if pname in required else f"p{i}_{j}?")
        newline = _lit("\n")
        body = " ".join(parts) if parts else newline
        if parts and not required:  # everything optional: allow an empty call too
            body = f"({body}) | {newline}"
        opener = _lit(f'<{DSML}invoke name="{name}">\n')
        closer = _lit(INVOKE_CLOSE + "\n")
        rules.append(f"invoke{i}: {opener} ({body}) {closer}")
        alts.append(f"invoke{i}")
    calls = alts[0] if only is not None else f"({' | '.join(alts)})+"
    start = f"start: {_lit(CALLS_OPEN + chr(10))} {calls} {_lit(CALLS_CLOSE)}"
    return "\n".join([start, *rules, "DSML_TEXT: /[^<]*/"])
