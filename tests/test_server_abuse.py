"""llama-dsv4-server against abusive clients (issue 9, part 4), on 127.0.0.1 only: slowloris connections that
dribble their headers or body or send nothing, a stream whose client stops reading, a flood of hundreds of
connections at once, and texts of many MB to complete or tokenize. Every request gets 200 or an OpenAI-style
4xx/503, other clients are served meanwhile, the server drops the abusers within its bounds (--header-timeout,
--timeout, --max-queue, --limit-concurrency, the context, /tokenize's bound), never crashes, and its memory comes
back to its baseline.

Malformed, mistyped and oversize requests are in test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from test_server import AUTH, KEY, Server, metrics_of, start_server

from llama_dsv4.server.app import TOKENIZE_MAX_CHARS, TOKENIZE_MAX_PIECES, TOKENIZE_MAX_TOKENS

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

HEADER_TIMEOUT = 2.0  # --header-timeout
TIMEOUT = 2.0  # --timeout: a request body's arrival, a stalled stream's send
MAX_QUEUE = 4  # --max-queue
LIMIT = 250  # --limit-concurrency
SNDBUF_KIB = 16  # --send-buffer-kib


@pytest.fixture(scope="module")
def server(real_vocab_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = str(tmp_path_factory.mktemp("abuse") / "server.log")
    srv = start_server(
        real_vocab_path,
        log,
        *("--header-timeout", str(HEADER_TIMEOUT), "--timeout", str(TIMEOUT), "--max-queue", str(MAX_QUEUE)),
        *("--limit-concurrency", str(LIMIT), "--send-buffer-kib", str(SNDBUF_KIB)),
    )
    yield srv
    alive = srv.proc.poll() is None
    code = srv.stop()
    assert alive and code == 0, srv.log()  # never crashed, and stops cleanly


@pytest.fixture(scope="module")
def word(server: Server) -> int:
    """A one-token word: biased towards it, the model says it forever (no end of text)."""
    ids = httpx.post(server.url + "/tokenize", json={"content": " alpha"}, headers=AUTH).json()["tokens"]
    assert len(ids) == 1
    return int(ids[0])


def raw_request(method: str, path: str, body: Any = None, close: bool = True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
    if close:
        head += "Connection: close\r\n"
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def parse(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def chat(word: int, n: int, stream: bool = False, top_logprobs: int | None = None) -> dict[str, Any]:
    extra = {} if top_logprobs is None else {"logprobs": True, "top_logprobs": top_logprobs}
    return {
        **extra,
        "messages": [{"role": "user", "content": "Say a word."}],
        "max_tokens": n,
        "temperature": 0,
        "logit_bias": {str(word): 100},
        "stream": stream,
    }


def openai_error(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "param" in err and "code" in err
    return err


def settle(server: Server, timeout: float = 10) -> dict[str, float]:
    """/metrics once no slot is busy and nobody waits (fails after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics_of(server)
        if m["llamadsv4:requests_processing"] == 0 and m["llamadsv4:requests_deferred"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- slow clients


def test_slowloris_is_dropped_and_does_not_block_others(server: Server, word: int) -> None:
    """Connections that dribble their headers a byte at a time, or send nothing, are closed after --header-timeout;
    one that dribbles its body gets a 408 after --timeout; a normal client is served meanwhile."""
    port = server.port

    async def dribble_headers(i: int) -> float:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        line = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 10_000
        try:
            for k in range(len(line)):
                w.write(line[k : k + 1])
                await w.drain()
                try:
                    if await asyncio.wait_for(r.read(1), 0.1) == b"":
                        return time.monotonic() - t0  # the server closed it
                except asyncio.TimeoutError:
                    pass
                assert time.monotonic() - t0 < 10, "a slowloris connection was never dropped"
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        finally:
            w.close()
        raise AssertionError("sent all of it")

    async def silent(i: int) -> float:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        return time.monotonic() - t0

    async def dribble_body() -> tuple[float, int, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        body = json.dumps(chat(word, 4)).encode()
        head = raw_request("POST", "/v1/chat/completions", chat(word, 4))[: -len(body)]
        w.write(head)
        await w.drain()
        data = b""
        for k in range(len(body)):
            w.write(body[k : k + 1])
            await w.drain()
            try:
                data = await asyncio.wait_for(r.read(), 0.2)
                break
            except asyncio.TimeoutError:
                pass
        w.close()
        status, payload = parse(data)
        return time.monotonic() - t0, status, payload

    async def normal() -> tuple[float, int, str]:
        await asyncio.sleep(0.5)  # the slow ones are connected
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as c:
            r = await c.post("/v1/chat/completions", json=chat(word, 4))
        return time.monotonic() - t0, r.status_code, r.json()["choices"][0]["message"]["content"]

    async def main() -> Any:
        return await asyncio.gather(
            asyncio.gather(*(dribble_headers(i) for i in range(20))),
            asyncio.gather(*(silent(i) for i in range(20))),
            dribble_body(),
            normal(),
        )

    t0 = time.monotonic()
    dribblers, silents, (t_body, status, payload), (t_normal, code, text) = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert code == 200 and text == " alpha" * 4 and t_normal < HEADER_TIMEOUT, t_normal  # not held up by them
    for t in (*dribblers, *silents):  # dropped by the header deadline, not before and not much later
        assert HEADER_TIMEOUT - 0.5 < t < HEADER_TIMEOUT + 2, (dribblers, silents)
    assert status == 408 and openai_error(payload)["code"] == "request_timeout", (status, payload)
    assert TIMEOUT - 0.2 < t_body < TIMEOUT + 2, t_body
    assert elapsed < 10
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    print(
        f"slowloris: 20 dribbling + 20 silent dropped after {min(dribblers + silents):.2f}-"
        f"{max(dribblers + silents):.2f} s, slow body 408 after {t_body:.2f} s, a normal request in {t_normal:.2f} s"
    )


def test_a_stream_whose_client_stops_reading_is_paused_then_dropped(server: Server, word: int) -> None:
    """A client that asks for a long stream and reads none of it (a tiny receive window): generation pauses
    (bounded memory, backpressure), the stream is dropped after --timeout of stalled sending, the slot is freed,
    and a following request completes."""
    n = 1900  # nearly a slot's context (2048)

    async def warm() -> list[int]:  # both slots' contexts touched as far as the stalled stream will get
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(word, n // 3)) for _ in range(2)))
        return [r.status_code for r in rs]

    assert asyncio.run(warm()) == [200, 200]
    settle(server)
    before = metrics_of(server)
    rss0 = server.rss()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.connect(("127.0.0.1", server.port))
    t0 = time.monotonic()
    s.sendall(raw_request("POST", "/v1/chat/completions", chat(word, n, stream=True)))
    try:
        busy_seen = False
        rss_peak = rss0
        freed_after = None
        while time.monotonic() - t0 < TIMEOUT + 10:
            m = metrics_of(server)
            rss_peak = max(rss_peak, server.rss())
            if m["llamadsv4:requests_processing"] >= 1:
                busy_seen = True
            elif busy_seen:
                freed_after = time.monotonic() - t0
                break
            time.sleep(0.1)
    finally:
        s.close()
    assert busy_seen and freed_after is not None, "the stalled stream never freed its slot"
    assert freed_after < TIMEOUT + 8, freed_after
    m = settle(server)
    assert m["llamadsv4:completions_cancelled_total"] - before["llamadsv4:completions_cancelled_total"] == 1
    generated = m["llamadsv4:tokens_predicted_total"] - before["llamadsv4:tokens_predicted_total"]
    assert generated < n // 2, generated  # paused while the client did not read, not run to the end
    assert rss_peak - rss0 < 32 << 20, (rss0 >> 20, rss_peak >> 20)
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(word, 4), headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == " alpha" * 4
    print(
        f"stalled stream: {generated:.0f} of {n} tokens generated, slot freed after {freed_after:.2f} s, "
        f"RSS {rss0 >> 20} -> peak {rss_peak >> 20} MiB"
    )


# ---------------------------------------------------------------------------------------------- a flood


def test_connection_flood_gets_200_or_503_and_memory_returns(server: Server, word: int) -> None:
    """400 connections at once: a quarter idle, a quarter GET /health, half chat completions. Each request is
    answered 200 or an OpenAI-style 503 (over --limit-concurrency connections, or over --max-queue waiting), the
    idle ones are closed by --header-timeout, the server stays up and its RSS returns to its baseline."""
    port = server.port
    n_conn = 400

    async def one(i: int) -> tuple[str, int | str, bytes]:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            return "connect", type(e).__name__, b""
        try:
            kind = ("idle", "health", "chat", "chat")[i % 4]
            if kind == "health":
                w.write(raw_request("GET", "/health"))
            elif kind == "chat":
                w.write(raw_request("POST", "/v1/chat/completions", chat(word, 16)))
            await w.drain()
            data = await asyncio.wait_for(r.read(), 30)
            if kind == "idle":
                return kind, "closed" if data == b"" else "answered", data
            status, body = parse(data)
            return kind, status, body
        except (ConnectionResetError, BrokenPipeError) as e:
            return "reset", type(e).__name__, b""
        finally:
            w.close()

    async def flood(n: int) -> list[tuple[str, int | str, bytes]]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(flood(100))  # warm up the machinery (first allocations of the asyncio, h11 and JSON paths)
    settle(server)
    time.sleep(0.5)
    baseline = server.rss()
    t0 = time.monotonic()
    results = asyncio.run(flood(n_conn))
    elapsed = time.monotonic() - t0
    assert server.proc.poll() is None, server.log()

    counts = Counter((kind, status) for kind, status, _ in results)
    assert sum(counts.values()) == n_conn
    assert counts[("idle", "closed")] == n_conn // 4, counts  # dropped by the header deadline
    assert set(counts) <= {("idle", "closed"), ("health", 200), ("health", 503), ("chat", 200), ("chat", 503)}, counts
    reasons = Counter()
    for kind, status, body in results:
        if status == 200 and kind == "chat":
            assert json.loads(body)["choices"][0]["message"]["content"] == " alpha" * 16
        elif status == 503:
            err = openai_error(body)
            assert err["code"] == "server_busy" and err["type"] == "server_error"
            reasons["--limit-concurrency" if "--limit-concurrency" in err["message"] else "--max-queue"] += 1
    assert counts[("chat", 200)] >= 2 and counts[("health", 200)] >= 1, counts
    assert reasons["--limit-concurrency"] > 0 and reasons["--max-queue"] > 0, reasons
    assert elapsed < 25, elapsed

    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = settle(server)
    assert m["llamadsv4:requests_processing"] == 0 and m["llamadsv4:requests_deferred"] == 0
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(word, 4), headers=AUTH, timeout=30)
    assert r.status_code == 200
    time.sleep(0.5)
    after = server.rss()
    grown = after - baseline
    print(
        f"flood: {n_conn} connections in {elapsed:.1f} s: "
        + ", ".join(f"{k} {s}: {c}" for (k, s), c in sorted(counts.items(), key=str))
        + f"; 503 by {dict(reasons)}; RSS {baseline >> 20} -> {after >> 20} MiB"
    )
    assert grown < max(32 << 20, baseline // 10), (baseline >> 20, after >> 20)


def test_requests_beyond_max_queue_get_503_at_once(server: Server, word: int) -> None:
    """Both slots busy with long generations: of 10 short requests sent together, MAX_QUEUE wait (and get their
    answers), the rest are refused at once with 503 server_busy and Retry-After."""
    settle(server)

    def post(n: int) -> tuple[int, float, httpx.Response]:
        t = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", json=chat(word, n), headers=AUTH, timeout=120)
        return r.status_code, time.monotonic() - t, r

    with ThreadPoolExecutor(12) as ex:
        long = [ex.submit(post, 1500) for _ in range(2)]
        deadline = time.monotonic() + 20
        while metrics_of(server)["llamadsv4:requests_processing"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        short = [f.result() for f in [ex.submit(post, 2) for _ in range(10)]]
        assert all(f.result()[0] == 200 for f in long)
    codes = Counter(code for code, _, _ in short)
    assert codes == {200: MAX_QUEUE, 503: 10 - MAX_QUEUE}, codes
    for code, dt, r in short:
        if code == 503:
            err = openai_error(r.content)
            assert err["code"] == "server_busy" and "--max-queue" in err["message"]
            assert r.headers.get("retry-after") == "1" and dt < 5, dt


# ---------------------------------------------------------------------------------------------- big texts

LINE = "The quick brown fox jumps over the lazy dog 12345, again!\n"  # 58 bytes, 15 tokens


def lines(mib: float) -> str:
    return LINE * int(mib * 2**20 / len(LINE))


def post(server: Server, path: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=120)
    return r, time.monotonic() - t0


def test_prompts_that_cannot_fit_are_refused_at_once(server: Server) -> None:
    """16 MB prompts (a slot has 2048 positions): their length shows that they cannot fit, so chat and text
    completions answer 400 context_length_exceeded at once, without tokenizing them (that took 20 s and GBs)."""
    text = lines(16)
    for path, body, param in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 1}, "messages"),
        ("/v1/completions", {"prompt": text, "max_tokens": 1}, "prompt"),
    ):
        r, dt = post(server, path, body)
        err = openai_error(r.content)
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, err
        # the chat prompt stops rendering at what 2048 positions could hold; the text's bytes bound its tokens
        assert "at least" in err["message"] or "more than a context" in err["message"], err
        assert "2048 tokens" in err["message"], err
        assert dt < 5, dt
        print(f"{path} with a 16 MB prompt: 400 in {dt:.2f} s")


def test_tokenize_is_bounded_and_health_answers_meanwhile(server: Server) -> None:
    """/tokenize answers up to TOKENIZE_MAX_TOKENS tokens (TOKENIZE_MAX_PIECES with_pieces) and 413 past them,
    stopping there, or at once past TOKENIZE_MAX_CHARS characters (an 8 MB word took 8 s and 650 MB to tokenize);
    while it tokenizes 2 MB (540k tokens, on its own threads and off the GIL), /health keeps answering (it waited
    for the whole tokenization)."""
    latencies: list[float] = []
    stop = False

    def probe() -> None:
        while not stop:
            t0 = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=60).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)

    with ThreadPoolExecutor(1) as ex:
        prober = ex.submit(probe)
        time.sleep(0.2)
        r, dt = post(server, "/tokenize", {"content": lines(2)})
        stop = True
        prober.result()
    assert r.status_code == 200 and len(r.json()["tokens"]) == int(2 * 2**20 / len(LINE)) * 15
    print(f"/tokenize 2 MB: 200 in {dt:.2f} s; /health meanwhile at most {max(latencies):.3f} s")
    assert len(latencies) >= 3 and max(latencies) < min(1.0, dt / 2), (latencies, dt)

    r, dt = post(server, "/tokenize", {"content": lines(6)})  # 1.6M tokens
    err = openai_error(r.content)
    assert (
        r.status_code == 413
        and err["code"] == "request_too_large"
        and f"at most {TOKENIZE_MAX_TOKENS}" in err["message"]
    ), err
    assert dt < 10, dt
    print(f"/tokenize 6 MB: 413 in {dt:.2f} s")
    r, dt = post(server, "/tokenize", {"content": "a" * (TOKENIZE_MAX_CHARS + 1)})
    err = openai_error(r.content)
    assert r.status_code == 413 and f"at most {TOKENIZE_MAX_CHARS}" in err["message"] and dt < 2, (err, dt)
    print(f"/tokenize of an 8 MiB word: 413 in {dt:.2f} s")
    r, _ = post(server, "/tokenize", {"content": lines(1), "with_pieces": True})
    assert r.status_code == 413 and f"at most {TOKENIZE_MAX_PIECES} with_pieces" in openai_error(r.content)["message"]
    r, _ = post(server, "/extras/tokenize/count", {"input": lines(0.5)})
    assert r.status_code == 200 and r.json()["count"] == int(0.5 * 2**20 / len(LINE)) * 15


def test_memory_comes_back_after_big_texts(server: Server) -> None:
    """Three 7 MB /tokenize requests (413 after a million tokens), a 3.5 MB one answered and a 16 MB chat prompt:
    the server's RSS comes back to within 32 MiB of what it was (it kept GBs; without handing freed memory back,
    50-130 MiB)."""
    post(server, "/tokenize", {"content": "first use of the path"})
    time.sleep(1.5)
    baseline = server.rss()
    for _ in range(3):
        assert post(server, "/tokenize", {"content": lines(7)})[0].status_code == 413
    assert post(server, "/tokenize", {"content": lines(3.5)})[0].status_code == 200
    body = {"messages": [{"role": "user", "content": lines(16)}], "max_tokens": 1}
    assert post(server, "/v1/chat/completions", body)[0].status_code == 400
    time.sleep(1.5)  # (memory is handed back 0.5 s after the last big request)
    deadline = time.monotonic() + 10
    while (after := server.rss()) - baseline >= 32 << 20 and time.monotonic() < deadline:
        time.sleep(0.25)
    print(f"big texts: RSS {baseline >> 20} -> {after >> 20} MiB")
    assert after - baseline < 32 << 20, (baseline >> 20, after >> 20)
