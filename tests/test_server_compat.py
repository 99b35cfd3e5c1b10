"""llama-cpp-python's server command line on llama-dsv4 (issue 14 item 4): `python -m llama_cpp.server` in an
environment where the alias was enabled (a throwaway virtual environment: the test's own stays unchanged), its
flags and environment variables mapped to our server's settings, `--config_file` with several models routed by
the request's `model`, and bad config files refused with a clear message and exit status 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from typing import Any

import pytest

from llama_dsv4.compat import enable as compat_enable
from llama_dsv4.compat.server import cli
from llama_dsv4.compat.server import settings as compat_settings
from llama_dsv4.server.settings import SettingsError

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_server import Server, free_port  # noqa: E402 - after the skips: it needs httpx, openai, fastapi

KEY = "sk-compat,with-a-comma"  # llama-cpp-python's --api_key is one key: the comma is part of it
AUTH = {"Authorization": f"Bearer {KEY}"}


def clean_env() -> dict[str, str]:
    """This environment without variables llama-cpp-python's server would read as settings (HOST, PORT, MODEL...)."""
    names = {*compat_settings.Settings.model_fields, "config_file"}
    return {k: v for k, v in os.environ.items() if k.lower() not in names}


def parse(*argv: str, env: dict[str, str] | None = None) -> tuple[list[Any], list[str]]:
    return cli.parse(list(argv), env if env is not None else clean_env())


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(), timeout=timeout)


# ------------------------------------------------------------------------------------------------ the flags
def test_flags_mean_what_they_meant(real_vocab_path: str) -> None:
    (model,), notes = parse(
        "--model", real_vocab_path, "--n_ctx", "4096", "--n_gpu_layers", "-1", "--api_key", KEY, "--chat_format",
        "chatml", "--chat_template_kwargs", '{"thinking": true}', "--use_mlock", "false", "--flash_attn", "true",
        "--seed", "7", "--type_k", "0", "--cache", "true", "--cache_type", "disk", "--cache_size", "1000",
        "--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", "4", "--last_n_tokens_size", "32",
        "--disable_ping_events", "true", "--root_path", "/llm/",
    )  # fmt: skip
    s = model.settings
    assert model.name == real_vocab_path  # llama-cpp-python names a model by its path as given
    assert (s.model, s.n_ctx, s.device, s.n_gpu_layers) == (real_vocab_path, 4096, "auto", -1)
    assert s.api_keys == [KEY] and s.chat_template_kwargs == {"thinking": True}
    assert (s.use_mlock, s.flash_attn, s.seed, s.type_k) == (False, True, 7, 0)
    assert s.prompt_cache == ("disk", 1000) and not s.sse_ping and s.root_path == "/llm"
    kw = s.llama_kwargs()
    assert kw["chat_format"] == "chatml" and kw["last_n_tokens_size"] == 32
    assert type(kw["draft_model"]).__name__ == "LlamaPromptLookupDecoding" and kw["draft_model"].num_pred_tokens == 4
    assert not notes and not s.notes


def test_defaults_are_llama_cpp_pythons(real_vocab_path: str) -> None:
    (model,), _ = parse("--model", real_vocab_path)
    s = model.settings
    assert (s.host, s.port, s.n_ctx, s.n_batch, s.n_ubatch) == ("localhost", 8000, 2048, 512, 512)
    assert s.device == "cpu"  # n_gpu_layers 0: no offload
    assert s.use_mlock and s.use_mmap and s.logits_all and s.verbose and not s.flash_attn
    assert s.seed is None and s.api_keys == [] and s.repeat_penalty == 1.1 and s.sse_ping
    assert "chat_format" not in s.llama_kwargs() and s.notes == []


def test_environment_fills_what_the_flags_leave(real_vocab_path: str, tmp_path: Any) -> None:
    env = {"MODEL": real_vocab_path, "n_ctx": "1024", "N_BATCH": "64", "TENSOR_SPLIT": "[0.5, 0.5]", "PORT": "9001"}
    (model,), _ = parse("--n_batch", "128", "--port", "9000", env=env)
    s = model.settings
    assert (s.model, s.n_ctx, s.n_batch, s.port) == (real_vocab_path, 1024, 128, 9001)  # $PORT wins, as there
    assert any("tensor_split" in n for n in s.notes)
    with pytest.raises(SettingsError, match="n_ctx"):
        parse(env={"MODEL": real_vocab_path, "N_CTX": "lots"})
    with pytest.raises(SettingsError, match="TENSOR_SPLIT: not JSON"):
        parse(env={"MODEL": real_vocab_path, "TENSOR_SPLIT": "0.5,0.5"})


def test_what_cannot_apply_is_noted_or_refused(real_vocab_path: str) -> None:
    (model,), _ = parse(
        "--model", real_vocab_path, "--split_mode", "2", "--clip_model_path", "mmproj.gguf", "--type_k", "8",
        "--embedding", "true", "--interrupt_requests", "true", "--rope_freq_base", "20000",
    )  # fmt: skip
    notes = "\n".join(model.settings.notes)
    for field in ("split_mode", "clip_model_path", "type_k=8", "embedding", "interrupt_requests"):
        assert field in notes
    assert model.settings.llama_kwargs()["rope_freq_base"] == 20000  # honoured by Llama (with its own warning)
    refused = {  # flags (split at spaces) -> what the error says
        "--kv_overrides a=int:1": "kv_overrides",
        "--lora_path x.gguf": "LoRA",
        "--rope_freq_scale 0.5": "RoPE",
        "--yarn_orig_ctx 4096": "YaRN",
        "--vocab_only true": "vocab_only",
        "--hf_pretrained_model_name_or_path x/y": "tokenizer",
        "--chat_format llava-1-5": "vision format",
        "--chat_format hf-autotokenizer": "Hugging Face tokenizer",
        "--chat_format hf-tokenizer-config": "needs hf_tokenizer_config_path",
        "--n_gpu_layers -2": "greater than or equal to -1",
        "--port 70000": "less than or equal to 65535",
        "--ssl_keyfile k.pem": "ssl_certfile",
        "--no_such_flag 1": "unknown argument",
    }
    for flags, match in refused.items():
        with pytest.raises(SettingsError, match=match):
            parse("--model", real_vocab_path, *flags.split())
    with pytest.raises(SettingsError, match="no model"):
        parse()
    with pytest.raises(SettingsError, match="no such file"):
        parse("--model", "missing.gguf")


def test_tokenizer_config_template(real_vocab_path: str, tmp_path: Any) -> None:
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    flags = ["--model", real_vocab_path, "--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(cfg)]
    (model,), _ = parse(*flags)
    assert model.settings.chat_template.startswith("{% for m in messages %}")
    cfg.write_text('{"chat_template": 3}')
    with pytest.raises(SettingsError, match="no chat_template string"):
        parse(*flags)


# ------------------------------------------------------------------------------------------------ config files
def write_config(tmp_path: Any, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_models_and_precedence(real_vocab_path: str, micro_path: str, tmp_path: Any) -> None:
    yaml_text = f"host: 0.0.0.0\nport: 8123\nmodels:\n  - model: {real_vocab_path}\n    model_alias: big\n"
    yaml_text += f"  - model: {micro_path}\n    model_alias: small\n    n_ctx: 256\n"
    path = write_config(tmp_path, "models.yaml", yaml_text)
    models, notes = parse("--config_file", path, "--n_ctx", "99")
    assert [m.name for m in models] == ["big", "small"] and models[1].settings.n_ctx == 256
    assert models[0].settings.n_ctx == 2048 and (models[0].settings.host, models[0].settings.port) == ("0.0.0.0", 8123)
    assert any("--n_ctx ignored" in n for n in notes)  # the file wins over the other flags, as there
    other = write_config(tmp_path, "other.json", json.dumps({"models": [{"model": micro_path}]}))
    models, _ = parse("--config_file", path, env={"CONFIG_FILE": other, "HOST": "127.0.0.2"})  # as there
    assert [m.name for m in models] == [micro_path] and models[0].settings.host == "127.0.0.2"


BAD_CONFIGS = [
    ("bad.json", '{"models": [', "not valid JSON"),
    ("bad.yaml", "models: [\n  - model: x\n  bad", "not valid YAML"),
    ("list.json", "[]", "top level must be an object"),
    ("unknown.json", '{"models": [{"model": "MODEL", "n_ctxx": 1}]}', r"models\[0\].n_ctxx: unknown setting"),
    ("typo.json", '{"prot": 1, "models": [{"model": "MODEL"}]}', r"prot: unknown setting \(did you mean port\?\)"),
    ("type.json", '{"models": [{"model": "MODEL", "n_ctx": "big"}]}', r"models\[0\].n_ctx: Input should be"),
    ("bool.json", '{"models": [{"model": "MODEL", "use_mmap": "perhaps"}]}', r"models\[0\].use_mmap"),
    ("none.json", '{"models": []}', "lists no model"),
    ("nomodels.json", '{"port": 1}', "lists no model"),
    ("nopath.json", '{"models": [{"n_ctx": 1}]}', r"models\[0\].model: Field required"),
    ("dup.json", '{"models": [{"model": "MODEL"}, {"model": "MODEL"}]}', "two models are named"),
    ("missing.json", '{"models": [{"model": "/nonexistent/m.gguf"}]}', "no such file"),
    ("lora.json", '{"models": [{"model": "MODEL", "lora_path": "a.gguf"}]}', "LoRA adapters"),
    ("deep.json", '{"models": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply|not valid JSON"),
    ("self.yaml", "a: &a [*a]\nmodels: []\n", "too large or nested too deeply"),
    ("huge.json", '{"models": [' + "1," * (1 << 17) + "1]}", "over 256 KiB"),
    ("binary.json", "\udcff", "not valid JSON"),
]


@pytest.mark.parametrize(("name", "text", "match"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_files_are_clear_errors(
    name: str, text: str, match: str, real_vocab_path: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(text.replace("MODEL", real_vocab_path).encode("utf-8", "surrogateescape"))
    assert cli.main(["--config_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m llama_cpp.server: error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Any) -> None:
    """Nine levels of ten aliases: a 1 KB file standing for 10^9 values."""
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = write_config(tmp_path, "bomb.yaml", "\n".join(lines) + "\nmodels: []\n")
    t0 = time.perf_counter()
    with pytest.raises(SettingsError, match="too large"):
        cli.load_config_file(path)
    assert time.perf_counter() - t0 < 5


def test_bad_config_exit_status_without_traceback(micro_path: str, tmp_path: Any) -> None:
    path = write_config(tmp_path, "models.json", '{"models": [{"model": "m.gguf", "n_ctx": -5}]}')
    r = run([sys.executable, "-m", "llama_dsv4.compat.server", "--config_file", path])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "models[0].n_ctx: Input should be greater than or equal to 0" in r.stderr
    # a chat format no handler has: found when the model loads, exit status 1 as for any model that cannot load
    r = run([sys.executable, "-m", "llama_dsv4.compat.server", "--model", micro_path, "--chat_format", "no-such"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: chat format 'no-such': Invalid chat handler: no-such" in r.stderr


# ------------------------------------------------------------------------------------------------ serving
def test_config_file_routes_by_model_alias(real_vocab_path: str, micro_path: str, tmp_path: Any) -> None:
    """Two models, one loaded at a time: a request names one by its alias (unknown names: the first), the
    server switches when asked, and requests for both at once all finish."""
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "api_key": KEY,
        "models": [
            {"model": real_vocab_path, "model_alias": "big", "n_ctx": 512, "n_threads": 1, "verbose": False},
            {"model": micro_path, "model_alias": "small", "n_ctx": 256, "n_threads": 1, "verbose": False},
        ],
    }
    path = write_config(tmp_path, "models.json", json.dumps(config))
    srv = Server(  # (the host and port flags it adds are ignored: the config file's win, as there)
        ["--config_file", path],
        str(tmp_path / "server.log"),
        command=[sys.executable, "-m", "llama_dsv4.compat.server"],
        environ=clean_env(),
        port=port,
    )
    try:
        srv.wait_ready()
        c = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["big", "small"]

        def complete(model: str | None) -> dict[str, Any]:
            body: dict[str, Any] = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
            if model is not None:
                body["model"] = model
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        def loaded() -> tuple[str, int]:
            props = c.get("/props").json()
            return os.path.basename(props["model_path"]), props["n_ctx"]

        assert loaded() == (os.path.basename(real_vocab_path), 512)
        assert complete("small")["model"] == "small" and loaded() == (os.path.basename(micro_path), 256)
        # the small model's vocabulary has 512 tokens: routed there, a larger id is refused; routed to big, not
        assert c.post("/detokenize", json={"model": "small", "tokens": [1000]}).status_code == 400
        assert c.post("/detokenize", json={"model": "big", "tokens": [1000]}).status_code == 200
        assert complete("gpt-4o-mini")["model"] == "big" and complete(None)["model"] == "big"
        r = c.post("/v1/chat/completions", json={"model": "small", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "small", r.text

        async def both() -> list[int]:
            async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as ac:
                bodies = [{"prompt": "x", "max_tokens": 4, "model": ("big", "small")[i % 2]} for i in range(6)]
                rs = await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))
                assert all(r.json()["model"] == b["model"] for r, b in zip(rs, bodies, strict=True))
                return [r.status_code for r in rs]

        assert asyncio.run(both()) == [200] * 6
        assert c.get("/health").json()["slots_processing"] == 0
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-compat"}).status_code == 401
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_create_app_under_the_alias(micro_path: str) -> None:
    """llama_cpp.server.app.create_app and llama_cpp.server.settings as llama-cpp-python's code uses them."""
    from starlette.testclient import TestClient

    from llama_dsv4 import compat

    compat.install()
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

        assert issubclass(Settings, ServerSettings) and issubclass(Settings, ModelSettings)
        settings = Settings(model=micro_path, n_ctx=128, n_threads=1, verbose=False, use_mlock=False, root_path="/llm")
        with TestClient(create_app(settings)) as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == micro_path
            assert client.get("/llm/v1/models").status_code == 200  # behind a proxy that keeps the prefix
            r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    finally:
        compat.uninstall()
    assert "llama_cpp.server" not in sys.modules
    assert not any(getattr(f, "llama_dsv4_alias", None) == "install" for f in sys.meta_path)


# ------------------------------------------------------------------------------------------------ enable/disable
@pytest.fixture
def venv(tmp_path: Any) -> dict[str, str]:
    """A throwaway virtual environment that sees this one's packages (its site-packages added by a .pth file), so
    `enable` changes it and not the environment running the tests."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = str(root / "bin" / "python")
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    with open(os.path.join(site_dir, "00_test_base.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({ours!r})\n")
    return {"python": python, "site": site_dir}


def test_python_m_llama_cpp_server_after_enable(venv: dict[str, str], real_vocab_path: str, tmp_path: Any) -> None:
    py, site_dir = venv["python"], venv["site"]
    before = sorted(os.listdir(site_dir))
    r = run([py, "-c", "import llama_cpp"])
    assert r.returncode != 0 and "No module named 'llama_cpp'" in r.stderr  # not enabled yet
    r = run([py, "-m", "llama_dsv4.compat", "enable"])
    assert r.returncode == 0 and compat_enable.PTH_NAME in r.stdout, r.stderr
    assert "enabled" in run([py, "-m", "llama_dsv4.compat", "status"]).stdout
    # interpreter start imports nothing of ours (nor numpy) until llama_cpp is imported
    probe = "import sys; print(sorted(m for m in sys.modules if m.startswith(('llama', 'numpy'))))"
    assert run([py, "-c", probe]).stdout.strip() == "[]"

    srv = Server(
        ["--model", real_vocab_path, "--n_ctx", "512", "--n_threads", "1", "--api_key", KEY],
        str(tmp_path / "server.log"),
        command=[py, "-m", "llama_cpp.server"],
        environ=clean_env(),
    )
    try:
        srv.wait_ready()
        c = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [real_vocab_path]
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    bad = run([py, "-m", "llama_cpp.server", "--model", real_vocab_path, "--n_ctx", "many"])
    assert bad.returncode == 2 and "--n_ctx: expected an integer" in bad.stderr and "Traceback" not in bad.stderr

    r = run([py, "-m", "llama_dsv4.compat", "disable"])
    assert r.returncode == 0 and "removed" in r.stdout
    assert sorted(os.listdir(site_dir)) == before  # nothing left behind
    r = run([py, "-m", "llama_cpp.server", "--model", real_vocab_path])
    assert r.returncode != 0 and "No module named 'llama_cpp'" in r.stderr
    assert run([py, "-m", "llama_dsv4.compat", "disable"]).stdout.strip() == "not enabled"


def test_enabled_alias_wins_over_a_real_llama_cpp_unless_switched_off(tmp_path: Any) -> None:
    """A stand-in for a real llama-cpp-python on the path: the enabled alias wins; LLAMA_DSV4_COMPAT=0 lets the
    real one through for one process; a .pth left behind after llama-dsv4 is gone is harmless."""
    site_dir = str(tmp_path / "site")
    assert compat_enable.main(["enable", "--site-dir", site_dir]) == 0
    real = tmp_path / "real" / "llama_cpp"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n")
    code = (
        f"import site; site.addsitedir({site_dir!r}); import llama_cpp; "
        "print(getattr(llama_cpp, '__llama_dsv4__', False), getattr(llama_cpp, 'REAL', False))"
    )
    env = {**clean_env(), "PYTHONPATH": str(real.parent)}
    assert run([sys.executable, "-c", code], env).stdout.split() == ["True", "False"]
    assert run([sys.executable, "-c", code], {**env, "LLAMA_DSV4_COMPAT": "0"}).stdout.split() == ["False", "True"]
    # an interpreter without llama-dsv4 (the base one, isolated): the finder steps aside, the real one imports
    base = getattr(sys, "_base_executable", sys.executable)
    if "No module named 'llama_dsv4'" not in run([base, "-I", "-c", "import llama_dsv4"]).stderr:
        pytest.skip("the base interpreter has llama-dsv4 installed")
    r = run([base, "-I", "-c", f"import sys; sys.path.insert(0, {str(real.parent)!r}); {code}"], env)
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stderr
    assert compat_enable.main(["disable", "--site-dir", site_dir]) == 0
    assert os.listdir(site_dir) == []


def test_model_set_switches_in_arrival_order_after_the_loaded_model_drains() -> None:
    """ModelSet (server/models.py) with stand-in models: a switch waits for the requests admitted to the loaded
    model, requests behind it wait their turn whatever model they ask for, a failed load is that request's error
    and the next request loads again."""
    from llama_dsv4.server.models import Model, ModelLoadError, ModelSet
    from llama_dsv4.server.settings import Settings
    from llama_dsv4.server.slots import SlotPool

    class Stub:
        def __init__(self, name: str) -> None:
            self.name, self.closed = name, False

        def close(self) -> None:
            self.closed = True

    loads: list[str] = []
    failing: set[str] = set()

    def load(settings: Settings) -> tuple[list[tuple[Any, int]], list[str]]:
        loads.append(settings.alias or "")
        if settings.alias in failing:
            raise ValueError("no memory")
        return [(Stub(settings.alias or ""), 64)], []

    a, b = Model("a", Settings(alias="a")), Model("b", Settings(alias="b"))

    async def scenario() -> None:
        first = Stub("a")
        models = ModelSet([a, b], SlotPool([(first, 64)]), load=load)
        assert models.pick("nope") is a and models.pick(None) is a and models.pick("b") is b
        pool_a = await models.enter(a)
        order: list[str] = []

        async def ask(m: Model) -> None:
            pool = await models.enter(m)
            order.append(f"{m.name}:{pool.slots[0].llm.name}")
            models.leave()

        to_b = asyncio.ensure_future(ask(b))
        back_to_a = asyncio.ensure_future(ask(a))  # asks for the loaded model, but after the switch was asked for
        await asyncio.sleep(0.05)
        assert order == [] and loads == [] and models.active == "a"  # b waits for the request on a
        assert pool_a.slots[0].llm is first and not first.closed
        models.leave()
        await asyncio.gather(to_b, back_to_a)
        assert order == ["b:b", "a:a"] and loads == ["b", "a"] and first.closed
        failing.add("b")
        with pytest.raises(ModelLoadError, match="'b' could not be loaded: no memory"):
            await models.enter(b)
        assert models.pool is None and models.active is None and models.users == 0
        await ask(a)
        assert loads == ["b", "a", "b", "a"] and order[-1] == "a:a"

    asyncio.run(scenario())
