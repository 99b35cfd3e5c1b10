"""The server's --parallel slots with continuous batching (docs/batching.md): one context of N sequences whose
requests are evaluated together; every stream gets its own tokens under load; --kv-unified shares --ctx-size;
the flags (-cb, -nocb, -kvu) and what they set."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import MICRO
from test_server import AUTH, KEY, Server, error_of, free_port, metrics_of, wait_idle

from llama_dsv4 import flags as flags_mod
from llama_dsv4.model.writer import write_model
from llama_dsv4.server.settings import parse_args
from llama_dsv4.server.slots import fit_context

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The micro model with the real vocabulary in f32 (a mixed ubatch's logits are each sequence's alone, bit for
    bit), so greedy texts under load equal those of one request at a time."""
    path = os.path.join(tmp_path_factory.mktemp("server-batching"), "micro-realvocab-f32.gguf")
    return write_model(path, MICRO, vocab="real", dtype="f32")[0]


def serve(path: str, log: str, *extra: str) -> Iterator[Server]:
    srv = Server(["-m", path, "-t", "1", "--api-key", KEY, *extra], log, port=free_port())
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def parallel4(f32_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(f32_path, str(tmp_path_factory.mktemp("np4") / "server.log"), "-c", "2048", "-np", "4")


def prompt(i: int) -> list[int]:
    """Request i's prompt: token ids, 3 to 150 tokens (the continuations cross 4-blocks and the 128-block at
    different steps)."""
    n = 3 + (i * 37) % 148
    return [1000 + (i * 131 + k * 17) % 20000 for k in range(n)]


def body(i: int, stream: bool) -> dict[str, Any]:
    return {"prompt": prompt(i), "max_tokens": 8, "temperature": 0, "stream": stream}


def test_16_concurrent_streams_on_4_slots_get_their_own_tokens(parallel4: Server) -> None:
    """Sixteen streams at once on --parallel 4 (the other twelve queue): every stream completes with the greedy
    text its prompt gets alone (asked one at a time first), nothing lost or mixed up."""
    assert "continuous batching" in parallel4.log()
    props = httpx.get(parallel4.url + "/props", headers=AUTH).json()
    assert props["n_ctx"] == 512  # -c 2048 / 4
    n = 16
    alone = []
    for i in range(n):
        r = httpx.post(parallel4.url + "/v1/completions", json=body(i, False), headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        alone.append(r.json()["choices"][0]["text"])
    assert len(set(alone)) > n // 2  # the prompts give different texts

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, str | None]:
        async with c.stream("POST", "/v1/completions", json=body(i, True)) as r:
            assert r.status_code == 200, await r.aread()
            text, finish = [], None
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["text"])
                    finish = choice["finish_reason"] or finish
            return "".join(text), finish

    async def run() -> list[tuple[str, str | None]]:
        limits = httpx.Limits(max_connections=n + 2)
        async with httpx.AsyncClient(base_url=parallel4.url, headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    before = metrics_of(parallel4)
    got = asyncio.run(run())
    assert [t for t, _ in got] == alone
    assert all(f in ("length", "stop") for _, f in got)
    m = wait_idle(parallel4)
    assert m["llamadsv4:completions_total"] - before["llamadsv4:completions_total"] == n
    # the batcher's figures: steps of the concurrent streams held several sequences
    steps = m["llamadsv4:batch_steps_total"] - before["llamadsv4:batch_steps_total"]
    seqs = m["llamadsv4:batch_sequences_total"] - before["llamadsv4:batch_sequences_total"]
    assert 0 < steps < seqs and m["llamadsv4:batch_tokens_total"] > before["llamadsv4:batch_tokens_total"]
    assert 1 < m["llamadsv4:batch_size"] <= 4 and 0 < m["llamadsv4:ubatch_occupancy"] <= 1


def test_kv_unified_slots_share_the_context(f32_path: str, tmp_path: Any) -> None:
    """-kvu: each slot may hold all of --ctx-size (a 150-token prompt on -c 256 -np 2), while the running requests
    stay within it together: a second such request while the first runs is a 400 ("Context size has been
    exceeded", llama-server's words, for the request that does not fit, not the one running); once the first is
    finished or cancelled its positions are free at once."""
    gen = serve(f32_path, str(tmp_path / "kvu.log"), "-c", "256", "-np", "2", "-kvu")
    srv = next(gen)
    try:
        assert httpx.get(srv.url + "/props", headers=AUTH).json()["n_ctx"] == 256
        long = {"prompt": [1000 + 7 * k for k in range(150)], "max_tokens": 100, "temperature": 0, "stream": True}

        async def run() -> None:
            async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=60) as c:
                async with c.stream("POST", "/v1/completions", json=long) as r:
                    assert r.status_code == 200
                    lines = r.aiter_lines()
                    while not (await lines.__anext__()).startswith("data: "):
                        pass  # the first request runs (its stream is open) and holds 150 + positions
                    second = await c.post("/v1/completions", json={**long, "stream": False, "max_tokens": 4})
                    err = error_of(second)
                    assert second.status_code == 400 and "Context size has been exceeded" in err["message"], err
                # the client left: the first request is cancelled and gives its positions back
                for _ in range(100):
                    if metrics_of(srv)["llamadsv4:requests_processing"] == 0:
                        break
                    await asyncio.sleep(0.05)
                third = await c.post("/v1/completions", json={**long, "stream": False, "max_tokens": 4})
                assert third.status_code == 200, third.text

        asyncio.run(run())
    finally:
        next(gen, None)


def test_batching_flags(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """-cb is the default (one context computes for every slot: all the threads), -nocb a context per slot (the
    CPUs shared), -kvu each slot all of --ctx-size; -kvu without continuous batching is a note."""
    model = tmp_path / "m.gguf"
    model.write_text("")
    monkeypatch.setattr(flags_mod, "usable_cpus", lambda: 4)
    monkeypatch.setattr(flags_mod, "physical_cores", lambda: 4)
    base = ["-m", str(model), "-c", "1024", "-np", "4"]
    cb = parse_args(base, env={})
    assert (cb.cont_batching, cb.kv_unified, cb.n_threads) == (True, False, 4)
    assert parse_args([*base, "-cb"], env={}).cont_batching is True
    nocb = parse_args([*base, "--no-cont-batching"], env={})
    assert (nocb.cont_batching, nocb.n_threads) == (False, 1)
    kvu = parse_args([*base, "-kvu"], env={})
    assert kvu.kv_unified and fit_context(kvu, 4096)[0] == 1024 and fit_context(cb, 4096)[0] == 256
    assert parse_args([*base, "-kvu", "--no-kv-unified"], env={}).kv_unified is False
    odd = parse_args([*base, "-kvu", "-nocb"], env={})
    assert not odd.kv_unified and any(n.startswith("--kv-unified: no effect") for n in odd.notes)
    assert not any("cont-batching" in n or "kv-unified: accepted" in n for n in cb.notes + kvu.notes)
