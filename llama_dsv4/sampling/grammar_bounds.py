"""Bounds on what reaches llguidance's compiler (issue: one request could kill the server).

llguidance compiles a JSON schema or a grammar recursively in native code: a `$ref` chain of ~2,500 (a chain of
object properties through `$ref`s of ~900, an `items` chain of ~1,100), or a GBNF chain of ~3,500 rules, overflows
an 8 MiB thread stack and the process dies (SIGSEGV), and large inputs cost seconds to minutes. So every schema and
GBNF grammar is measured here first, iteratively (no recursion in Python either), and refused with a `GrammarError`
(a ValueError) naming the bound:

- depth (`MAX_DEPTH`): the longest path through nested subschemas *and* the `$ref`s between them (or through nested
  groups and the rule references between them), in JSON nesting levels (or group levels plus rule references).
  Recursion is allowed, as llguidance allows it: a cycle of references is compiled once, so a strongly connected
  set of subschemas (or rules) counts as the sum of their depths. Measured on llguidance 1.9.1 (8 MiB stack):
  the worst construct crashes at ~2,160 levels (~3.9 KiB of native stack per level), so 256 is 8x below it on an
  ordinary thread, and compilation also runs on a 64 MiB stack (constrained.py); OpenAI's structured outputs
  allow 10 levels of object nesting, i.e. ~30-40 of these levels;
- size: a schema's JSON text (`MAX_SCHEMA_CHARS`, about), a GBNF grammar's text (`MAX_GBNF_CHARS`) and its rules
  (`MAX_GBNF_RULES`): compile time grows faster than linearly (a 100,000-way alternation took 18 s, then 25 s
  more to fail on an internal limit, with a Rust backtrace); at these bounds compiling and the first token's mask
  take up to ~2 s (real GBNF grammars are 1-20 KB; llguidance bounds a schema's compiled size itself).

`clean_message` turns what llguidance reports into a line a client may read (no Rust backtrace, no paths).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from typing import Any
from urllib.parse import unquote, urljoin

MAX_DEPTH = 256  # levels of nesting through subschemas and $refs (or groups and rule references)
MAX_SCHEMA_CHARS = 1 << 20  # a JSON schema's size, as JSON text (about)
MAX_GBNF_CHARS = 64 << 10  # a GBNF grammar's text
MAX_GBNF_RULES = 4096  # rules of a GBNF grammar
MAX_MESSAGE = 300  # characters of a compiler message passed on


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled."""


# ------------------------------------------------------------------------------------------------ depth


def longest_path(local: dict[Hashable, int], edges: dict[Hashable, list[tuple[int, Hashable]]]) -> dict[Hashable, int]:
    """For each node, the deepest nesting reachable from it: `local[n]` is the node's own depth, an edge
    `(d, m)` means node `m` is entered at depth `d` of `n`. A strongly connected set of nodes counts as the sum of
    its nodes' depths (each is entered at most once on a path through it). Iterative Tarjan; O(nodes + edges)."""
    index: dict[Hashable, int] = {}
    low: dict[Hashable, int] = {}
    on_stack: set[Hashable] = set()
    stack: list[Hashable] = []
    best: dict[Hashable, int] = {}
    counter = 0
    for start in local:
        if start in index:
            continue
        work: list[tuple[Hashable, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            out = edges.get(node, [])
            while i < len(out):
                nxt = out[i][1]
                i += 1
                if nxt not in index:
                    work.append((node, i))
                    work.append((nxt, 0))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:  # every successor visited
                if low[node] == index[node]:  # a strongly connected component, all of whose successors are done
                    members = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        members.append(m)
                        if m == node:
                            break
                    inside = set(members)
                    if len(members) == 1 and not any(t == node for _, t in edges.get(node, [])):
                        depth = local[node]
                        for d, t in edges.get(node, []):
                            depth = max(depth, d + best[t])
                    else:
                        below = max(
                            (best[t] for m in members for _, t in edges.get(m, []) if t not in inside), default=0
                        )
                        depth = sum(local[m] for m in members) + below
                    for m in members:
                        best[m] = depth
                if work:  # back in the node that entered this one
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return best


def _too_deep(what: str, depth: int) -> GrammarError:
    return GrammarError(
        f"{what} nests {depth} levels deep (through nested parts and the references between them); "
        f"at most {MAX_DEPTH} are allowed"
    )


# ------------------------------------------------------------------------------------------------ JSON schemas

_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # values that are data, not subschemas
_DEFS_KEYS = frozenset({"$defs", "definitions"})  # reached only through $ref


def _pointer(doc: Any, pointer: str) -> Any:
    """The value at a JSON pointer (RFC 6901, percent-decoded as in a URI fragment), or None."""
    node = doc
    for raw in pointer.split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def resolve_refs(schema: dict[str, Any], what: str = "the JSON schema") -> tuple[int, dict[int, Any]]:
    """The schema's size (JSON characters, about) and the subschema each `$ref` names: `id(the dict holding the
    $ref)` -> that subschema (a dict or a bool). Raises GrammarError when the schema is larger than
    MAX_SCHEMA_CHARS, nests deeper than MAX_DEPTH as plain JSON, or a $ref names nothing in it."""
    # 1. the whole document: size and plain nesting (bounded before anything else, so a cyclic Python structure
    # ends too), the resources ($id) and anchors, and every $ref with the base URI it is resolved against
    resources: dict[str, Any] = {"": schema}
    anchors: dict[tuple[str, str], Any] = {}
    refs: list[tuple[Any, str, str]] = []  # (the dict holding the $ref, the $ref, its base URI)
    size = 0
    work: list[tuple[Any, int, str, bool]] = [(schema, 1, "", False)]
    while work:
        obj, depth, base, data = work.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(what, depth)
        if isinstance(obj, dict):
            size += 2
            if not data:
                sid = obj.get("$id")
                if isinstance(sid, str) and sid:
                    uri = sid if sid.startswith("#") else urljoin(base, sid).partition("#")[0]
                    base = uri or base
                    for key in (sid.partition("#")[0], base):
                        resources.setdefault(key, obj)
                anchor = obj.get("$anchor")
                if isinstance(anchor, str):
                    anchors.setdefault((base, anchor), obj)
                ref = obj.get("$ref")
                if isinstance(ref, str):
                    refs.append((obj, ref, base))
            for k, v in obj.items():
                size += len(k) + 3 if isinstance(k, str) else 8
                work.append((v, depth + 1, base, data or k in _DATA_KEYS))
        elif isinstance(obj, (list, tuple)):
            size += 2 + len(obj)
            work.extend((v, depth + 1, base, data) for v in obj)
        else:
            size += len(obj) + 2 if isinstance(obj, str) else 6
        if size > MAX_SCHEMA_CHARS:
            raise GrammarError(f"{what} is larger than {MAX_SCHEMA_CHARS} characters")
    # 2. every $ref resolved to the subschema it names
    ref_of: dict[int, Any] = {}
    for holder, ref, base in refs:
        uri, _, fragment = ref.partition("#")
        doc = resources.get(uri, resources.get(urljoin(base, uri))) if uri else resources.get(base, schema)
        target = None
        if doc is not None:
            if not fragment:
                target = doc
            elif fragment.startswith("/"):
                target = _pointer(doc, fragment)
            else:
                target = anchors.get((base if not uri else urljoin(base, uri), fragment))
        if not isinstance(target, (dict, bool)):
            raise GrammarError(f"{what}: $ref {ref[:100]!r} does not name a subschema of this schema")
        ref_of[id(holder)] = target
    return size, ref_of


def check_json_schema(schema: Any, what: str = "the JSON schema") -> int:
    """Refuse a schema beyond the module's bounds (GrammarError); returns its size (JSON characters, about)."""
    if isinstance(schema, bool):
        return 5
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be an object")
    size, ref_of = resolve_refs(schema, what)
    targets: dict[int, Any] = {id(schema): schema}
    targets.update((id(t), t) for t in ref_of.values() if isinstance(t, dict))
    # 3. each referenced subschema's own nesting (not into $defs, nor into other referenced subschemas: those are
    # edges), then the longest path through them
    local: dict[Hashable, int] = {}
    edges: dict[Hashable, list[tuple[int, Hashable]]] = {}
    for key, node in targets.items():
        deepest = 1
        out: list[tuple[int, Hashable]] = []
        stack: list[tuple[Any, int, bool]] = [(node, 1, False)]
        while stack:
            obj, depth, data = stack.pop()
            deepest = max(deepest, depth)
            if isinstance(obj, dict):
                if not data and id(obj) in ref_of:
                    t = ref_of[id(obj)]
                    if isinstance(t, dict):
                        out.append((depth, id(t)))
                for k, v in obj.items():
                    if data or k not in _DEFS_KEYS:
                        if not data and isinstance(v, dict) and id(v) in targets:
                            out.append((depth, id(v)))
                        else:
                            stack.append((v, depth + 1, data or k in _DATA_KEYS))
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    if not data and isinstance(v, dict) and id(v) in targets:
                        out.append((depth, id(v)))
                    else:
                        stack.append((v, depth + 1, data))
        local[key] = deepest
        edges[key] = out
    depth = longest_path(local, edges)[id(schema)]
    if depth > MAX_DEPTH:
        raise _too_deep(what, depth)
    return size


# ------------------------------------------------------------------------------------------------ GBNF

_GBNF_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\{[^}]*\}|::=|[A-Za-z0-9_-]+|.""", re.DOTALL
)


def _gbnf_tokens(text: str) -> Iterable[str]:
    for m in _GBNF_TOKEN.finditer(text):
        tok = m.group()
        if not tok[0].isspace() and tok[0] != "#":
            yield tok


def check_gbnf(text: str) -> None:
    """Refuse a GBNF grammar beyond the module's bounds (GrammarError). Syntax errors are left to the
    compiler."""
    if len(text) > MAX_GBNF_CHARS:
        raise GrammarError(f"the GBNF grammar is longer than {MAX_GBNF_CHARS} characters")
    tokens = list(_gbnf_tokens(text))
    # rules: a name followed by ::=, up to the next such name
    local: dict[Hashable, int] = {}
    edges: dict[Hashable, list[tuple[int, Hashable]]] = {}
    refs: dict[str, list[tuple[int, str]]] = {}
    rule: str | None = None
    level = 1
    for i, tok in enumerate(tokens):
        if i + 1 < len(tokens) and tokens[i + 1] == "::=" and (tok[0].isalnum() or tok[0] in "_-"):
            rule, level = tok, 1
            if rule not in local:
                local[rule] = 1
                refs[rule] = []
                if len(local) > MAX_GBNF_RULES:
                    raise GrammarError(f"the GBNF grammar has more than {MAX_GBNF_RULES} rules")
            continue
        if rule is None or tok == "::=":
            continue
        if tok == "(":
            level += 1
            local[rule] = max(local[rule], level)
        elif tok == ")":
            level = max(1, level - 1)
        elif tok[0].isalnum() or tok[0] in "_-":
            refs[rule].append((level, tok))
        if level > MAX_DEPTH:
            raise _too_deep("the GBNF grammar", level)
    for name, out in refs.items():
        edges[name] = [(d, t) for d, t in out if t in local]  # an undefined rule is the compiler's to report
    if local:
        depth = max(longest_path(local, edges).values())
        if depth > MAX_DEPTH:
            raise _too_deep("the GBNF grammar", depth)


# ------------------------------------------------------------------------------------------------ messages

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}(?::\d+)*")


def clean_message(text: str) -> str:
    """The first meaningful line of a compiler message: no backtrace, no file paths, at most MAX_MESSAGE
    characters."""
    text = str(text).split("<backtrace>")[0].split("stack backtrace:")[0]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "unknown error")
    line = _PATH.sub("<path>", line)
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."
