"""Chat-template injection (issue 9): templates come from strangers' model files (CVE-2024-34359 was remote code
execution through one), so known server-side template injection payloads must fail safely: a ValueError, no
Python object reached, within a time and memory bound.

Each payload is rendered in its own Python process (so that its peak RSS can be measured, and so that a payload
that escaped the bounds could not take the test run down); tests/test_chat.py runs a few through a model file and
Llama.create_chat_completion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llama_dsv4.chat import template
from llama_dsv4.chat.template import TemplateError, render
from llama_dsv4.chat.templates import default_chat_template

MAX_WALL = 5.0  # seconds a hostile template may take to be refused
MAX_RSS_GROWTH = 256 << 20  # bytes its process may grow by

# what must never appear in a rendered text or an error message: Python objects (or a command's output)
INTERNALS = ("<class ", "<module ", "<function ", "<built-in", "<bound method", "object at 0x", "uid=", "root:x:0")

# ---- attribute walks to Python internals (each must raise)
WALKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ [].__class__.__base__.__subclasses__() }}",
    "{{ ().__class__.__bases__[0].__subclasses__() }}",
    "{{ messages.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ (messages|first).__class__.__init__.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c('touch {canary}', shell=True) }}{% endif %}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace(a=1).__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__code__.co_consts }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ lipsum.__globals__.__builtins__.__import__('os').system('touch {canary}') }}",
    "{{ lipsum(10**6) }}",
    "{{ range.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ dict.mro() }}",
    "{{ dict.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}",
    "{{ config.items() }}",
    "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ __import__('os').popen('id').read() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{% set fmt = '{0.__class__.__init__.__globals__}'.format %}{{ fmt(cycler) }}",  # CVE-2024-56326
    "{{ '{0.__class__.__init__.__globals__}'|attr('format')(cycler) }}",  # CVE-2025-27516
    "{{ '{0.__class__}'.format_map({'0': ''}) }}",
    "{{ (range(3)|map('string')).gi_frame.f_globals }}",
    "{% for x in messages %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "{{ ''.encode.__self__ }}",
    # mutation of what the caller passed (the immutable sandbox)
    "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
    "{{ messages.pop() }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{% set l = [] %}{{ l.append(1) }}",
    "{{ {}.setdefault('a', 1) }}",
    # no loader: nothing to import, include or extend
    "{% import 'os' as os %}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% from 'os' import system %}",
]

# ---- time and memory (each must raise, quickly, without a memory blow-up)
DOS = [
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for x in 'a' * 2**20 %}{% for y in 'b' * 2**20 %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**10 }}",
    "{{ 'a' * 2**20 * 2**20 }}",
    "{{ [1] * 10**10 }}",
    "{{ [[1] * 2**20] * 2**20 }}",
    "{{ [['a' * 2**20] * 1000] * 1000 }}",
    "{{ ([[1] * 2**10] * 2**10) * 2**10 }}",
    "{{ 2**(10**10) }}",
    "{{ (10**1000)**1000 }}",
    "{% set ns = namespace(n=2) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
    "{% set ns = namespace(s='a') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='a') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}",
    # a small structure that refers to itself many times over: enormous only when turned into text
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l|tojson }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l|string|length }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ '' ~ ns.l }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ '%s' % ns.l }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ '{}'.format(ns.l) }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l|join(',') }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ [ns, ns]|map(attribute='l')|join }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(200) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
    "{{ ns.l|pprint }}",
    "{{ dict(a=1).fromkeys(range(100000), 'x' * 2**20) }}",
    # recursion through macros
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "{% macro f(x, n) %}{% if n %}{{ f([x, x], n - 1) }}{% else %}{{ x }}{% endif %}{% endmacro %}{{ f([1], 100) }}",
    "{% for x in messages recursive %}{{ loop(messages) }}{% endfor %}",
    # padding, widths and formats
    "{{ 'a'.ljust(10**9) }}",
    "{{ 'a'.center(10**9) }}",
    "{{ 'a'.zfill(10**9) }}",
    "{{ ('\t' * 2**20).expandtabs(10**6) }}",
    "{{ 'a'|center(10**9) }}",
    "{{ ('a\n' * 2**19)|indent(10**4) }}",
    "{{ 'a'|indent(10**9) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%.999999999f'|format(1.0) }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ '{:{w}}'.format('a', w=10**9) }}",
    "{{ messages|tojson(indent=10**9) }}",
    # growth by replace, join, wordwrap, sum
    "{{ ('a' * 2**20).replace('a', 'a' * 2**20) }}",
    "{{ ('a' * 2**20)|replace('a', 'a' * 2**20) }}",
    "{{ ('x' * 2**20).join(['a'] * 2**20) }}",
    "{{ (['a' * 2**20] * 1000)|join }}",
    "{{ ('a' * 2**20)|wordwrap(1, wrapstring='b' * 2**20) }}",
    "{{ ([[0] * 2**19] * 30)|sum(start=[]) }}",
    # output and captured blocks
    "{% for i in range(100000) %}{{ 'a' * 2**20 }}{% endfor %}",
    "{% set big = 'a' * 2**20 %}{% for i in range(100000) %}{{ big }}{% endfor %}",
    "{% set big = 'a' * 2**20 %}{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset %}{{ x }}",
    "{% set big = 'a' * 2**20 %}{% macro m() %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endmacro %}"
    "{{ m() }}",
    "{% set big = 'a' * 2**20 %}{% filter upper %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endfilter %}",
    "{% for i in range(1000) %}{% set x = range(100000)|list|sort %}{% endfor %}",
    # pathological nesting at compile time
    "{{ " + "(" * 10000 + "1" + ")" * 10000 + " }}",
    "{{ " + "[" * 10000 + "]" * 10000 + " }}",
    "{{ " + "(" * 40 + "1" + ")" * 40 + " }}",
    # compile cost and Python's compiler (a model file's template is compiled when the model loads)
    "{% if messages %}a{% endif %}" * 140_000,  # 4 MB: took 40 s and 2.3 GB to compile
    "x" * 50_000_000 + "{{ messages }}",  # 50 MB: never finished
    "{% if messages %}" * 99 + "x" + "{% endif %}" * 99,  # IndentationError out of Python's compiler
    "{% for m in messages %}" * 21 + "x" + "{% endfor %}" * 21,  # SyntaxError: too many statically nested blocks
    "".join(f"{{% set x{i} %}}" for i in range(40)) + "{% endset %}" * 40,
    "{{ f(" + "1, " * 120_000 + ") }}",
    # a tiny template printing 60 MB (61 s and 5.4 GB per chat call with tokenizing): stops at the bound
    "{% for i in range(60) %}{{ 'a' * 1000000 }}{% endfor %}",
]

# ---- names that exist in other frameworks' templates: harmless here, whatever they render
PROBES = [
    "{{ config }}{{ request }}{{ self }}{{ getattr }}{{ os }}{{ __builtins__ }}",
    "{{ cycler }}{{ joiner }}{{ namespace }}{{ range }}{{ dict }}",
    "{{ self }}",
]

# A render server: imports the sandbox once, then renders each payload in a forked child of its own (a fresh
# process per payload where fork is unavailable), so that the child's peak RSS is the payload's.
_SERVER = textwrap.dedent(
    """
    import json, os, resource, select, sys, time
    from llama_dsv4.chat.template import TemplateError, render

    VARIABLES = dict(
        messages=[{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        add_generation_prompt=True,
        bos_token="<s>",
    )
    SCALE = 1 if sys.platform == "darwin" else 1024


    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * SCALE


    def render_one(src):
        if sys.platform.startswith("linux"):  # a safety net should a payload escape the bounds: fail, not thrash
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
        variables = json.loads(json.dumps(VARIABLES))
        before, t0 = rss(), time.perf_counter()
        try:
            out = render(src, **variables)
            res = {"outcome": "rendered", "text": out[:4000]}
        except TemplateError as e:
            res = {"outcome": "TemplateError", "text": str(e)[:4000], "value_error": isinstance(e, ValueError)}
        except BaseException as e:
            res = {"outcome": type(e).__name__, "text": str(e)[:4000]}
        res["wall"] = time.perf_counter() - t0
        res["rss_growth"] = rss() - before
        res["mutated"] = variables != VARIABLES
        return res


    def forked(src):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                data = json.dumps(render_one(src)).encode()
                while data:
                    data = data[os.write(w, data):]
            finally:
                os._exit(0)
        os.close(w)
        data, deadline = b"", time.monotonic() + 60
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, 9)
                data = json.dumps({"outcome": "timeout", "text": "", "wall": 60.0, "rss_growth": 0}).encode()
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if not data:
            return {"outcome": f"died (status {status})", "text": "", "wall": 0.0, "rss_growth": 0}
        return json.loads(data)


    render("{{ messages[0].content }}{% for m in messages %}{{ m|tojson }}{% endfor %}", **VARIABLES)  # warm up
    payloads = json.loads(sys.stdin.read())
    if hasattr(os, "fork"):
        print(json.dumps([forked(src) for src in payloads]))
    else:
        print(json.dumps([render_one(src) for src in payloads]))
    """
)


def run_isolated(payloads: list[str]) -> list[dict]:
    if not hasattr(os, "fork"):  # one process per payload
        return [r for p in payloads for r in run_isolated_each(p)]
    p = subprocess.run(
        [sys.executable, "-c", _SERVER], input=json.dumps(payloads), capture_output=True, text=True, timeout=1800
    )
    assert p.returncode == 0, f"the render server died ({p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_isolated_each(payload: str) -> list[dict]:
    p = subprocess.run(
        [sys.executable, "-c", _SERVER], input=json.dumps([payload]), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, f"the render process died ({p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_batch(payloads: list[str], tmp: str, must_raise: bool) -> None:
    canary = os.path.join(tmp, "pwned")
    sources = [p.replace("{canary}", canary) for p in payloads]
    n = min(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:  # two render servers, each with half the payloads
        parts = list(pool.map(run_isolated, [sources[i::n] for i in range(n)]))
    results: list[dict] = [{}] * len(sources)
    for i in range(n):
        results[i::n] = parts[i]
    problems = []
    for payload, r in zip(payloads, results, strict=True):
        where = f"{payload[:100]!r}: {r['outcome']} {r['text'][:200]!r}"
        if must_raise and not (r["outcome"] == "TemplateError" and r.get("value_error")):
            problems.append(f"not refused with a ValueError: {where}")
        if r["outcome"] not in ("TemplateError", "rendered"):
            problems.append(f"escaped as {r['outcome']}: {where}")
        if any(s in r["text"] for s in INTERNALS):
            problems.append(f"reached Python internals: {where}")
        if "MemoryError" in r["text"]:
            problems.append(f"tried to allocate too much before being refused: {where}")
        if r["wall"] > MAX_WALL:
            problems.append(f"took {r['wall']:.1f} s: {where}")
        if r["rss_growth"] > MAX_RSS_GROWTH:
            problems.append(f"grew the process by {r['rss_growth'] >> 20} MiB: {where}")
        if r["mutated"]:
            problems.append(f"changed the messages passed in: {where}")
    assert not os.path.exists(canary), "a payload ran a shell command"
    assert not problems, "\n".join(problems)


def test_attribute_walks_to_python_internals_are_refused(tmp_path: os.PathLike[str]) -> None:
    check_batch(WALKS, str(tmp_path), must_raise=True)


def test_resource_exhaustion_is_refused_within_time_and_memory(tmp_path: os.PathLike[str]) -> None:
    check_batch(DOS, str(tmp_path), must_raise=True)


def test_names_from_other_frameworks_reach_nothing(tmp_path: os.PathLike[str]) -> None:
    check_batch(PROBES, str(tmp_path), must_raise=False)


def test_the_payload_suite_is_broad() -> None:
    assert len(WALKS) >= 40 and len(DOS) >= 50
    text = " ".join(WALKS + DOS)
    for what in ("__globals__", "__builtins__", "__subclasses__", "__mro__", "cycler", "joiner", "namespace",
                 "lipsum", "config", "request", "self", "range(10**9)", "'a' * 10**10", "[[1] * 2**20] * 2**20",
                 "macro", "popen", "attr(", "format"):  # fmt: skip
        assert what in text, what


# ---- real templates keep working, and the bounds are per render


def _conversation(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " * 20})
        out.append({"role": "assistant", "content": f"answer {i} " * 20, "reasoning_content": "thinking"})
    return out


def test_large_legitimate_prompts_render() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "does things " * 20,
                "parameters": {"type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(10)}},
            },
        }
        for i in range(50)
    ]
    src = default_chat_template()
    t0 = time.perf_counter()
    out = render(src, messages=_conversation(2000), tools=tools, add_generation_prompt=True, bos_token="<s>")
    assert time.perf_counter() - t0 < 5.0
    assert "question 1999" in out and "tool_49" in out
    # a message of a million tokens' worth of text
    big = "word " * 1_000_000
    out = render(src, messages=[{"role": "user", "content": big}], add_generation_prompt=True, bos_token="<s>")
    assert big in out
    # common template idioms on long inputs
    idioms = (
        "{% for m in messages %}{{ m['content']|trim }}{{ m.content.strip() }}{{ m.content|length }}"
        "{{ (m.content ~ '\n')|replace('\n', ' ') }}{% endfor %}{{ messages|map(attribute='role')|join(',') }}"
    )
    assert len(render(idioms, messages=[{"role": "user", "content": big}])) > 2 * len(big) - 10


def test_budgets_are_per_render_and_per_thread() -> None:
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    small = "{% for i in range(50000) %}{% endfor %}{{ messages[0].content }}"
    for _ in range(40):  # 40 renders of 50,000 iterations each: far beyond one render's budget in all
        assert render(small, messages=[{"role": "user", "content": "ok"}]) == "ok"
    errors: list[BaseException] = []
    results: list[str] = []

    def hostile() -> None:
        try:
            render(loop, messages=[])
        except TemplateError as e:
            errors.append(e)

    t = threading.Thread(target=hostile)
    t.start()
    for _ in range(10):
        results.append(render(small, messages=[{"role": "user", "content": "ok"}]))
    t.join(30)
    assert results == ["ok"] * 10
    assert len(errors) == 1 and "steps" in str(errors[0])


def test_whatever_compiling_raises_is_a_template_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the nesting bound (lifted here), Python's own compiler fails (IndentationError, SyntaxError): that too
    is a TemplateError, so a model file's template can always be refused and replaced."""
    monkeypatch.setattr(template, "MAX_NESTING", 10**6)
    with pytest.raises(TemplateError, match="IndentationError"):
        template.compile_template("{% if messages %}" * 99 + "x" + "{% endif %}" * 99)
    with pytest.raises(TemplateError, match="SyntaxError"):
        template.compile_template("{% for m in messages %}" * 21 + "x" + "{% endfor %}" * 21)


def test_the_bounds_name_themselves() -> None:
    with pytest.raises(ValueError, match=f"at most {template.MAX_SOURCE} are allowed"):
        render("x" * (template.MAX_SOURCE + 1))
    with pytest.raises(ValueError, match=f"more than {template.MAX_TOKENS} tokens"):
        render("{{ 1 ~ 1 ~ 1 ~ 1 ~ 1 ~ 1 ~ 1 }}" * 3000)
    with pytest.raises(ValueError, match=f"nests blocks more than {template.MAX_NESTING} deep"):
        render("{% if 1 %}" * 17 + "{% endif %}" * 17)
    assert render("{% if 1 %}" * 16 + "ok" + "{% endif %}" * 16) == "ok"
    with pytest.raises(ValueError, match=f"nests brackets more than {template.MAX_BRACKETS} deep"):
        render("{{ " + "[" * 33 + "]" * 33 + " }}")
    with pytest.raises(ValueError, match="passes 1000 characters"):
        template.render_bounded("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", {}, 1000)
    assert template.render_bounded("{{ 'x' * 1000 }}", {}, 1000) == "x" * 1000


def test_errors_are_template_errors_naming_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unsafe.*__class__"):
        render("{{ ''.__class__ }}")
    with pytest.raises(ValueError, match="repetition beyond"):
        render("{{ 'a' * 10**10 }}")
    with pytest.raises(ValueError, match="steps"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="does not compile"):
        render("{% for %}")
    with pytest.raises(ValueError, match="raised: stop"):
        render("{{ raise_exception('stop') }}")
