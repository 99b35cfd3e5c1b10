"""The repository explains itself: no reference to a document outside it, every cited section of our documents
exists, and the module map of docs/design.md lists every module."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = (".py", ".pyx", ".pxd", ".c", ".h", ".md", ".jinja", ".sh", ".toml", ".in", ".txt", ".json", ".cfg")
# what used to point outside the repository: a study and a reference-implementation setup in a sibling directory
# (written with [/] and [ ] so that this file does not match what it looks for)
OUTSIDE = re.compile(r"\.\./shared\b|\bshared[/](specs|oracle)|\b[Ss]pec[ ](§|\d)|\bdeepseek4\.md")


def source_files() -> list[str]:
    """The repository's text files (relative paths), without build outputs (Cython's generated C files)."""
    out = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, ROOT)
            if not (f.endswith(TEXT_SUFFIXES) or rel == os.path.join(".ci", "run")):
                continue
            if f.endswith(".c") and os.path.exists(path[:-2] + ".pyx"):
                continue
            out.append(rel)
    return sorted(out)


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_nothing_points_outside_the_repository() -> None:
    files = source_files()
    assert "README.md" in files and os.path.join("llama_dsv4", "engine", "graph.pyx") in files
    bad = [
        f"{rel}:{i}: {line.strip()}"
        for rel in files
        for i, line in enumerate(read(rel).splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert bad == [], "\n".join(bad)


def sections(doc: str) -> set[str]:
    """The numbers of a document's numbered headings ("## 8. Attention" -> "8", "### 8.6 ..." -> "8.6")."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", read(os.path.join("docs", doc)), re.M))


def test_every_cited_section_exists() -> None:
    docs = {name: sections(name) for name in ("architecture.md", "llama-cpp-python-api.md")}
    assert {"1", "5.4", "8.6", "11.2", "15.1"} <= docs["architecture.md"]
    missing, cited = [], 0
    for rel in source_files():
        text = read(rel)
        refs = re.findall(r"§(\d+(?:\.\d+)*)(?:-(\d+))?", text)
        if not refs:
            continue
        # a file cites docs/llama-cpp-python-api.md when it names only that document, else docs/architecture.md
        api_only = "llama-cpp-python-api.md" in text and "architecture" not in text
        doc = (
            "llama-cpp-python-api.md" if api_only and not rel.endswith("llama-cpp-python-api.md") else "architecture.md"
        )
        for first, last in refs:
            cited += 1
            missing += [f"{rel}: {doc} §{n}" for n in (first, last) if n and n not in docs[doc]]
    assert cited > 50
    assert missing == [], "\n".join(missing)


def test_the_module_map_lists_every_module() -> None:
    design = read(os.path.join("docs", "design.md"))
    listed = set(re.findall(r"`([^`\s]+)`", design))
    want = []
    for d, dirs, files in os.walk(os.path.join(ROOT, "llama_dsv4")):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        for f in files:
            if f.endswith((".py", ".pyx", ".pxd", ".jinja")):
                want.append(os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "llama_dsv4")).replace(os.sep, "/"))
    want += os.listdir(os.path.join(ROOT, "kernels"))
    assert len(want) > 70
    assert sorted(m for m in want if m not in listed) == []


@pytest.mark.parametrize(
    "script",
    [
        "tools/oracle/setup.sh",
        "tools/check_wheel.sh",
        "tools/aarch64_check.sh",
        "tools/cuda_build.sh",
        "bench/device_check.sh",
    ],
)
def test_the_tool_scripts_parse(script: str) -> None:
    """The reference's setup, the wheel check, the aarch64 check under emulation, the CUDA build and the device
    check (each run by hand: minutes to an hour of building, or a GPU machine; docs/install.md says when)."""
    path = os.path.join(ROOT, *script.split("/"))
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.access(path, os.X_OK)
