"""A model split across RPC servers (docs/rpc.md): two llama-dsv4-rpc-server processes on 127.0.0.1 and this
process's CPU. Logits of the split equal a local run of the same (portable) graph, greedy text is identical, and
the faults of issue 20 (a server unreachable at start, dying mid-generation, answering garbage or nothing) are
exceptions in bounded time, after which the client connects again.

Needs the RPC-enabled install (README, "Beyond one machine": `<!-- rpc:install -->`), which CI runs these tests
in; on the default install, the one check that can run is that asking for RPC says which install has it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from forward_models import MODELS, SEED
from llama_dsv4.engine.context import Context

from llama_dsv4 import Llama, RPCError, _ggml
from llama_dsv4.demo import demo_model_path
from llama_dsv4.model.loader import load_model
from llama_dsv4.model.writer import write_model
from llama_dsv4.server.errors import from_exception

RPC = _ggml.rpc_available()
needs_rpc = pytest.mark.skipif(not RPC, reason="needs the RPC-enabled install (README: rpc:install); CI runs it")
PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 417 + 285?<｜Assistant｜><think>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no RPC server on port {port}")


class Server:
    """A supervised llama-dsv4-rpc-server (the command) on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_dsv4.rpc_server", "-p", str(self.port), "-t", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_listening(self.port)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def worker_pid(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        assert out, "the supervised server process is not running"
        return int(out[0])

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


@pytest.fixture(scope="module")
def servers() -> Iterator[list[Server]]:
    if not RPC:
        pytest.skip("needs the RPC-enabled install (README: rpc:install); CI runs it")
    both = [Server(), Server()]
    yield both
    for s in both:
        s.stop()


def endpoints(servers: list[Server]) -> list[str]:
    return [s.endpoint for s in servers]


@pytest.mark.skipif(RPC, reason="this install has RPC: the tests below run instead")
def test_without_the_rpc_install_asking_for_rpc_names_the_install() -> None:
    with pytest.raises(RuntimeError, match="RPC-enabled build") as e:
        Llama(demo_model_path(), n_ctx=256, rpc_servers="127.0.0.1:50052", verbose=False)
    assert _ggml.RPC_INSTALL in str(e.value)
    r = subprocess.run([sys.executable, "-m", "llama_dsv4.rpc_server"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "RPC-enabled build" in r.stderr


def test_bad_endpoints_and_shares_are_clear_errors() -> None:
    for bad in ("localhost", "host:0", "host:99999", ":50052", "a b:1"):
        with pytest.raises(ValueError, match="host:port"):
            Llama(demo_model_path(), n_ctx=256, rpc_servers=bad, verbose=False)
    with pytest.raises(ValueError, match="tensor_split needs rpc_servers"):
        Llama(demo_model_path(), n_ctx=256, tensor_split=[1, 1], verbose=False)


def test_the_server_answers_503_when_the_rpc_part_fails() -> None:
    e = from_exception(RPCError("a server died"))
    assert e.status == 503 and "unavailable" in str(e.message)


def run(path: str, toks: np.ndarray, be: _ggml.Backends, prefill: int) -> tuple[np.ndarray, object]:
    with load_model(path) as m:
        ctx = Context(m, 512, n_ubatch=64, type_k="f32", backends=be)
        out = [ctx.eval(toks[:prefill], all_logits=True)] + [
            ctx.eval(toks[i : i + 1]) for i in range(prefill, len(toks))
        ]
        layers = ctx.layer_dev
        del ctx
    return np.concatenate(out), layers


@needs_rpc
@pytest.mark.parametrize("name", ["decisive", "continuous", "second-decisive"])
def test_split_logits_equal_the_local_run(servers: list[Server], tmp_path: os.PathLike[str], name: str) -> None:
    """Prefill (two ubatches and a part) and decode to position 300: the CSA (ratio 4) blocks and the HCA block of
    128 complete on every device, at different steps of prefill and decode."""
    params, init, dtype = MODELS[name]
    path = write_model(os.path.join(tmp_path, f"{name}.gguf"), params, dtype=dtype, vocab="none", init=init, seed=SEED)[
        0
    ]
    toks = np.random.default_rng(7).integers(0, params.n_vocab, 300)
    local, _ = run(path, toks, _ggml.Backends("cpu", 1, portable=True), prefill=150)
    be = _ggml.Backends("cpu", 1, rpc=endpoints(servers))
    split, layers = run(path, toks, be, prefill=150)
    assert layers is not None and set(layers) == {0, 1, 2}, layers  # every device holds layers
    hits, misses = be.alloc_size_stats()  # the servers were asked each allocation size once, not every graph
    assert misses > 0 and hits > 20 * misses, (hits, misses)
    rel = np.abs(split - local).max(axis=1) / np.abs(local).max(axis=1)
    assert rel.max() <= 1e-5, rel.max()
    assert (split.argmax(1) == local.argmax(1)).all()


@needs_rpc
def test_split_set_of_shards_and_tensor_split(servers: list[Server], tmp_path: os.PathLike[str]) -> None:
    params, init, dtype = MODELS["second-decisive"]
    shards = write_model(
        os.path.join(tmp_path, "split.gguf"), params, dtype=dtype, vocab="none", init=init, seed=SEED, n_shards=3
    )
    toks = np.random.default_rng(3).integers(0, params.n_vocab, 140)
    local, _ = run(shards[1], toks, _ggml.Backends("cpu", 1, portable=True), prefill=130)
    be = _ggml.Backends("cpu", 1, rpc=endpoints(servers), tensor_split=[0, 3, 2])
    split, layers = run(shards[1], toks, be, prefill=130)
    assert layers == [1, 1, 1, 2, 2]  # the first server has no share: 3/5 of the layers on the second, 2/5 here
    np.testing.assert_allclose(split, local, rtol=0, atol=1e-5 * np.abs(local).max())


@needs_rpc
def test_llama_on_a_split_writes_the_local_text(servers: list[Server]) -> None:
    ref = Llama(demo_model_path(), n_ctx=512, verbose=False)(PROMPT, max_tokens=40, temperature=0)["choices"][0]
    llm = Llama(demo_model_path(), n_ctx=512, rpc_servers=",".join(endpoints(servers)), verbose=False)
    try:
        out = llm(PROMPT, max_tokens=40, temperature=0)["choices"][0]
        assert out["text"] == ref["text"]
        assert llm._runner.context.layer_dev == [0, 1, 1, 2]
    finally:
        llm.close()


@needs_rpc
def test_an_unreachable_server_is_a_clear_error_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{(port := free_port())} cannot be reached"):
        Llama(demo_model_path(), n_ctx=256, rpc_servers=f"127.0.0.1:{port}", verbose=False)
    assert time.monotonic() - t0 < 30


@needs_rpc
def test_a_server_dying_mid_generation_then_coming_back() -> None:
    """The supervised server's process is killed while tokens stream: RPCError, this process unharmed; the
    supervisor starts the server again, and the next call connects again and writes the same text."""
    server = Server()
    try:
        ref = Llama(demo_model_path(), n_ctx=512, verbose=False)(PROMPT, max_tokens=40, temperature=0)
        llm = Llama(demo_model_path(), n_ctx=512, rpc_servers=server.endpoint, verbose=False, rpc_timeout=30)
        first_child = llm._runner.context.pid
        t0 = time.monotonic()
        with pytest.raises(RPCError, match="RPC client process ended"):
            for i, _ in enumerate(llm(PROMPT, max_tokens=200, temperature=0, stream=True)):
                if i == 3:
                    os.kill(server.worker_pid(), 9)
        assert time.monotonic() - t0 < 30
        wait_listening(server.port)  # the supervisor started it again
        again = llm(PROMPT, max_tokens=40, temperature=0)
        assert again["choices"][0]["text"] == ref["choices"][0]["text"]
        assert llm._runner.context.pid != first_child and llm._runner.context.restarts == 1
        llm.close()
    finally:
        err = server.stop()
    assert "starting it again" in err


class FakeServer:
    """A TCP server that answers every connection with `reply` (garbage), or with nothing."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            with contextlib.suppress(OSError):
                c.recv(4096)
                if self.reply is not None:
                    c.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@needs_rpc
@pytest.mark.parametrize("reply", [b"\xff" * 64, None], ids=["garbage", "silence"])
def test_a_server_answering_garbage_or_nothing(reply: bytes | None) -> None:
    fake = FakeServer(reply)
    try:
        t0 = time.monotonic()
        with pytest.raises((RPCError, ConnectionError)):
            Llama(demo_model_path(), n_ctx=256, rpc_servers=f"127.0.0.1:{fake.port}", verbose=False, rpc_timeout=3)
        assert time.monotonic() - t0 < 30
    finally:
        fake.close()


@needs_rpc
def test_the_rpc_server_command_listens_on_loopback_and_warns() -> None:
    s = Server()
    try:
        r = subprocess.run(["ss", "-ltn"], capture_output=True, text=True)
        if r.returncode == 0:
            assert f"127.0.0.1:{s.port}" in r.stdout
    finally:
        err = s.stop()
    assert "no authentication" in err
    r = subprocess.run([sys.executable, "-m", "llama_dsv4.rpc_server", "-p", "0"], capture_output=True, text=True)
    assert r.returncode != 0 and "--port" in r.stderr


@needs_rpc
def test_cli_and_server_with_rpc(servers: list[Server], tmp_path: os.PathLike[str]) -> None:
    """`llama-dsv4 --rpc ... -ts ...` writes what it writes locally; `llama-dsv4-server --rpc` serves on the split
    and answers 503 once its RPC server is gone for good."""
    cli = [sys.executable, "-m", "llama_dsv4", "-m", demo_model_path(), "-p", PROMPT, "-n", "24", "--temp", "0"]
    local = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    split = subprocess.run([*cli, "--rpc", servers[0].endpoint, "-ts", "1,1"], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == local.stdout and len(local.stdout) > 20

    httpx = pytest.importorskip("httpx")
    own = Server()
    port = free_port()
    log = open(os.path.join(tmp_path, "server.log"), "w")  # noqa: SIM115 - closed below
    srv = subprocess.Popen(
        [sys.executable, "-m", "llama_dsv4.server", "-m", demo_model_path(), "--rpc", own.endpoint, "-t", "1",
         "--host", "127.0.0.1", "--port", str(port), "--rpc-timeout", "10"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        end = time.monotonic() + 120
        while time.monotonic() < end:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        own.stop()  # the server and its supervisor gone: no one to connect to
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert "unavailable" in r.json()["error"]["message"]
    finally:
        srv.send_signal(2)
        srv.wait(30)
        log.close()
