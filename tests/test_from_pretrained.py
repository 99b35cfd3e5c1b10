"""Llama.from_pretrained against a local mock of the Hub's HTTP API, with the real huggingface_hub client."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MICRO
from hub_mock import MockHub

from llama_dsv4 import Llama
from llama_dsv4.model.writer import write_model

hf_constants = pytest.importorskip("huggingface_hub.constants")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = str(tmp_path_factory.mktemp("hubfiles"))
    out = {}
    for p in write_model(os.path.join(d, "DeepSeek-V4-Flash-Q8xQ5.gguf"), MICRO, n_shards=11):
        with open(p, "rb") as f:
            out[os.path.basename(p)] = f.read()
    single = write_model(os.path.join(d, "tiny-F32.gguf"), MICRO, seed=5)[0]
    with open(single, "rb") as f:
        out["tiny-F32.gguf"] = f.read()
    return out


@pytest.fixture
def hub(files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> MockHub:
    with MockHub() as h:
        for name, data in files.items():
            if name.startswith("DeepSeek"):
                h.add_file("setar007/DeepSeek-V4-Flash-Q8xQ5-GGUF", name, data)
                h.add_file("org/two-models", "Q8xQ5/" + name, data)
        h.add_file("org/two-models", "tiny-F32.gguf", files["tiny-F32.gguf"])
        h.add_file("org/two-models", "README.md", b"# two models")
        h.add_file("org/revs", "tiny-F32.gguf", files["tiny-F32.gguf"], revision="v2")
        h.add_file("org/private", "tiny-F32.gguf", files["tiny-F32.gguf"])
        h.private["org/private"] = "hf_secret"
        monkeypatch.setattr(hf_constants, "ENDPOINT", h.url)  # what HF_ENDPOINT sets at import time
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield h


def test_model_card_snippet_with_empty_filename_downloads_the_split_set(
    tmp_path: os.PathLike[str], files: dict[str, bytes]
) -> None:
    """The card's own snippet, in a fresh process with HF_ENDPOINT pointing at the mock."""
    with MockHub() as h:
        for name, data in files.items():
            if name.startswith("DeepSeek"):
                h.add_file("setar007/DeepSeek-V4-Flash-Q8xQ5-GGUF", name, data)
        code = (
            "from llama_dsv4 import Llama\n"
            "llm = Llama.from_pretrained(repo_id='setar007/DeepSeek-V4-Flash-Q8xQ5-GGUF', filename='',"
            " verbose=False, n_ctx=64)\n"
            "print(llm.model_path)\n"
            "print(llm('Hello', max_tokens=2, temperature=0)['usage']['completion_tokens'])\n"
        )
        env = {**os.environ, "HF_ENDPOINT": h.url, "HF_HOME": str(tmp_path), "HF_HUB_DISABLE_TELEMETRY": "1"}
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path)
        )  # not the source tree: the installed package
        assert r.returncode == 0, r.stderr[-3000:]
        path, n = r.stdout.split()
        assert path.endswith("DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf") and n == "2"
        got = {p for m, p, _ in h.requests if m == "GET" and "/resolve/" in p}
        assert len(got) == 11  # every shard


def test_glob_on_one_shard_brings_the_set(hub: MockHub, tmp_path: os.PathLike[str]) -> None:
    llm = Llama.from_pretrained(
        "org/two-models", "*00001-of-00011.gguf", cache_dir=str(tmp_path), verbose=False, n_ctx=64
    )
    assert len(llm._model.paths) == 11
    assert os.path.basename(llm.model_path) == "DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf"


def test_filename_choices_and_errors(hub: MockHub, tmp_path: os.PathLike[str]) -> None:
    for fname in ("", None):
        with pytest.raises(ValueError, match="holds 2 GGUF models") as e:
            Llama.from_pretrained("org/two-models", fname, cache_dir=str(tmp_path), verbose=False)
        assert "Q8xQ5/DeepSeek-V4-Flash-Q8xQ5-00001-of-00011.gguf" in str(e.value) and "tiny-F32.gguf" in str(e.value)
    with pytest.raises(ValueError, match=r"No file found in org/two-models that match \*Q4_K_M\*"):
        Llama.from_pretrained("org/two-models", "*Q4_K_M*", cache_dir=str(tmp_path), verbose=False)
    with pytest.raises(ValueError, match=r"Multiple files found in org/two-models matching \*\.gguf"):
        Llama.from_pretrained("org/two-models", "*.gguf", cache_dir=str(tmp_path), verbose=False)
    llm = Llama.from_pretrained("org/two-models", "tiny-*.gguf", local_dir=str(tmp_path), verbose=False, n_ctx=64)
    assert llm.model_path == os.path.join(str(tmp_path), "tiny-F32.gguf")


def test_revision_and_token_are_honoured(hub: MockHub, tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(Exception, match=r"(?i)revision|not found|404"):
        Llama.from_pretrained("org/revs", "tiny-F32.gguf", cache_dir=str(tmp_path), verbose=False)
    llm = Llama.from_pretrained(
        "org/revs", "tiny-F32.gguf", revision="v2", cache_dir=str(tmp_path), verbose=False, n_ctx=64
    )
    assert llm.n_vocab() == 512
    assert any("/resolve/v2/" in p for _, p, _ in hub.requests)
    with pytest.raises(Exception, match=r"(?i)401|not found|authenticat|repository"):
        Llama.from_pretrained("org/private", "tiny-F32.gguf", cache_dir=str(tmp_path), verbose=False)
    llm = Llama.from_pretrained(
        "org/private", "tiny-F32.gguf", token="hf_secret", cache_dir=str(tmp_path), verbose=False, n_ctx=64
    )
    assert llm.n_vocab() == 512
    assert ("GET", "/org/private/resolve/main/tiny-F32.gguf", "Bearer hf_secret") in hub.requests
