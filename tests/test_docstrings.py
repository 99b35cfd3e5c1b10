"""The public API explains itself in help(): its classes and functions have docstrings, every public method of
Llama has one, and Llama.__init__'s "Args:" section names every parameter of its signature (so a keyword added
without documentation fails here), with its default."""

from __future__ import annotations

import inspect
import re
from types import ModuleType
from typing import Any

import pytest

import llama_dsv4
from llama_dsv4 import Llama, grammar, sampling, tokenizer

# Names of llama_dsv4.__all__ whose docstring is pending in a module another change owns right now; the test
# below fails as soon as one is documented, so that its entry is removed with it.
PENDING: dict[str, str] = {}  # name -> why it has no docstring yet


def _undocumented(obj: Any) -> bool:
    """No docstring of its own: none, blank, or the signature a dataclass writes in place of one."""
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    return not (doc or "").strip() or (inspect.isclass(obj) and doc.startswith(obj.__name__ + "("))


def _public_module_names(module: ModuleType) -> list[str]:
    """The public classes and functions defined in `module` (not those it imports)."""
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def _methods(cls: type) -> dict[str, Any]:
    """The public methods and properties `cls` defines itself (__call__ included), as plain functions."""
    out = {}
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(member, property):
            member = member.fget
        elif isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member):
            out[name] = member
    return out


def test_exports_have_docstrings() -> None:
    # (LogitsProcessor and StoppingCriteria are type aliases, Callable[...]: neither class nor function)
    names = [
        n
        for n in llama_dsv4.__all__
        if inspect.isclass(getattr(llama_dsv4, n)) or inspect.isfunction(getattr(llama_dsv4, n))
    ]
    assert "Llama" in names and "LlamaGrammar" in names
    missing = [n for n in names if n not in PENDING and _undocumented(getattr(llama_dsv4, n))]
    assert not missing, f"llama_dsv4.__all__ names without a docstring: {missing}"
    done = [n for n in PENDING if not _undocumented(getattr(llama_dsv4, n))]
    assert not done, f"documented now: remove {done} from PENDING"


@pytest.mark.parametrize("module", [sampling, grammar, tokenizer], ids=lambda m: m.__name__)
def test_public_names_and_their_methods_have_docstrings(module: ModuleType) -> None:
    names = _public_module_names(module)
    assert names
    missing = [n for n in names if _undocumented(getattr(module, n))]
    for n in names:
        obj = getattr(module, n)
        if inspect.isclass(obj):
            missing += [f"{n}.{m}" for m, f in _methods(obj).items() if _undocumented(f)]
    assert not missing, f"{module.__name__}: no docstring for {missing}"


def test_llama_public_methods_have_docstrings() -> None:
    methods = _methods(Llama)
    assert {"n_ctx", "token_eos", "create_completion", "__call__", "eval_tokens", "from_pretrained"} <= set(methods)
    missing = sorted(n for n, f in methods.items() if _undocumented(f))
    assert not missing, f"Llama methods without a docstring: {missing}"


def _args_section(doc: str) -> dict[str, str]:
    """The entries of a Google-style "Args:" section: name (with * or ** for variadic ones) -> its text."""
    lines = doc.splitlines()
    start = lines.index("Args:") + 1
    entries: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        m = re.match(r"    (\*{0,2}\w+): (.*)", line)
        if m:
            name = m.group(1)
            assert name not in entries, f"{name} is documented twice"
            entries[name] = m.group(2)
        elif line.startswith("        ") and name is not None:
            entries[name] += " " + line.strip()
        else:
            assert not line.strip(), f"unexpected line in Args: {line!r}"
    return entries


def test_llama_init_documents_every_parameter() -> None:
    doc = inspect.getdoc(Llama.__init__)
    assert doc and "Args:" in doc.splitlines(), "Llama.__init__ has no Args: section"
    entries = _args_section(doc)
    params = list(inspect.signature(Llama.__init__).parameters.values())[1:]  # (self)
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    expected = [prefix.get(p.kind, "") + p.name for p in params]
    assert len(expected) > 50 and "moe_hot_count" in expected and "device" in expected
    undocumented = [n for n in expected if n not in entries]
    assert not undocumented, f"Llama.__init__ parameters missing from its docstring: {undocumented}"
    stale = [n for n in entries if n not in expected]
    assert not stale, f"Llama.__init__'s docstring documents parameters it does not have: {stale}"
    assert list(entries) == expected, "document the parameters in the order of the signature"
    no_default = [
        p.name for p in params if p.default is not inspect.Parameter.empty and "Default" not in entries[p.name]
    ]
    assert not no_default, f"Llama.__init__'s docstring does not give the default of {no_default}"
    short = [n for n, text in entries.items() if len(text.split()) < 3]
    assert not short, f"Llama.__init__'s docstring says next to nothing about {short}"
