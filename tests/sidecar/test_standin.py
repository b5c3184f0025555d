"""The stand-in model server (spendgate.sidecar.standin)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from spendgate.sidecar.standin import (
    STATE,
    StandinConfig,
    create_app,
    pseudo_random_bytes,
)

CHAT = {
    "model": "standin",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there  world"},  # 2 + 3 = 5 prompt tokens
    ],
    "max_tokens": 4,
}
USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@contextlib.asynccontextmanager
async def standin(**config: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(StandinConfig(**config)))) as client:
        yield client


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    events = []
    for block in (await resp.text()).split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_non_streaming_usage() -> None:
    async with standin() as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["usage"] == USAGE
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3"}
    assert choice["finish_reason"] == "length"
    assert "X-Usage-Input-Tokens" not in resp.headers


async def test_stop_after_and_default_max_tokens() -> None:
    async with standin(default_max_tokens=7) as client:
        body = await (
            await client.post("/v1/chat/completions", json=CHAT | {"stop_after": 2})
        ).json()
        assert body["usage"]["completion_tokens"] == 2
        assert body["choices"][0]["finish_reason"] == "stop"
        no_max = {k: v for k, v in CHAT.items() if k != "max_tokens"}
        body = await (await client.post("/v1/chat/completions", json=no_max)).json()
        assert body["usage"]["completion_tokens"] == 7


async def test_streaming_ends_with_usage_then_done() -> None:
    request = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    async with standin(token_interval_ms=5) as client:
        started = time.monotonic()
        resp = await client.post("/v1/chat/completions", json=request)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
        assert time.monotonic() - started >= 3 * 0.005  # 3 gaps between 4 tokens
        assert client.app[STATE].completed_streams == 1
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == USAGE
    finish, tokens = events[-3], events[:-3]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert len(tokens) == 4
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"]["content"] for e in tokens)
    assert text == "tok0 tok1 tok2 tok3"


async def test_streaming_without_include_usage_has_no_usage() -> None:
    async with standin() as client:
        resp = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert not any("usage" in e for e in events[:-1])
    assert len(events) == 4 + 1 + 1  # tokens, finish chunk, [DONE]


async def test_header_usage_mode() -> None:
    async with standin(usage_mode="header") as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        body = await resp.json()
        assert resp.headers["X-Usage-Input-Tokens"] == "5"
        assert resp.headers["X-Usage-Output-Tokens"] == "4"
        assert "usage" not in body
        stream = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
        events = await sse_events(await client.post("/v1/chat/completions", json=stream))
        assert not any("usage" in e for e in events[:-1])  # nowhere to put it when streaming


async def test_usage_mode_none() -> None:
    async with standin(usage_mode="none") as client:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert "usage" not in await resp.json()
        assert "X-Usage-Input-Tokens" not in resp.headers


async def test_fail_status_applies_to_every_request() -> None:
    async with standin(fail_status=503) as client:
        for method, path in [("POST", "/v1/chat/completions"), ("POST", "/echo")]:
            resp = await client.request(method, path, json=CHAT)
            assert resp.status == 503
            error = (await resp.json())["error"]
            assert set(error) == {"type", "code", "message"}
            assert error["type"] == "server_error"
        assert client.app[STATE].requests["POST /echo"] == 1  # seen, then refused


async def test_malformed_json_is_openai_400() -> None:
    async with standin() as client:
        for data in [b"{not json", b"[1, 2]", json.dumps({"messages": "nope"}).encode()]:
            resp = await client.post("/v1/chat/completions", data=data)
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] in {"invalid_json", "invalid_value"}
        resp = await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": -1})
        assert resp.status == 400


async def test_bytes_deterministic_and_chunked() -> None:
    n = 100_000
    expected = pseudo_random_bytes(n)
    async with standin() as client:
        resp = await client.post("/bytes", params={"n": n, "chunk": 4096, "interval_ms": 0})
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.headers["X-Bytes-Sha256"] == hashlib.sha256(expected).hexdigest()
        first = await resp.read()
        again = await (await client.get("/bytes", params={"n": n, "chunk": 777})).read()
        other_seed = await (await client.get("/bytes", params={"n": 64, "seed": 1})).read()
    assert first == again == expected
    assert other_seed == pseudo_random_bytes(64, seed=1) != expected[:64]


async def test_echo_headers_as_lists_and_body() -> None:
    async with standin() as client:
        headers = [("X-Dup", "a"), ("X-Dup", "b"), ("Authorization", "Bearer sk-1")]
        resp = await client.post("/echo?q=1", data=b'{"a": 1}', headers=headers)
        body = await resp.json()
    assert body["method"] == "POST" and body["path"] == "/echo" and body["query"] == "q=1"
    assert body["headers"]["x-dup"] == ["a", "b"]
    assert body["headers"]["authorization"] == ["Bearer sk-1"]
    assert body["body"] == '{"a": 1}' and body["json"] == {"a": 1}


async def test_slow_completions_embeddings_models() -> None:
    async with standin(latency_ms=20) as client:
        started = time.monotonic()
        body = await (await client.post("/v1/completions", json={"prompt": "a b c"})).json()
        assert time.monotonic() - started >= 0.02
        assert body["object"] == "text_completion"
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
        emb = await (await client.post("/v1/embeddings", json={"input": ["a b", "c"]})).json()
        assert [d["index"] for d in emb["data"]] == [0, 1]
        assert emb["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        models = await (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "standin"
        slow = await client.get("/slow", params={"ms": 30})
        assert (await slow.json()) == {"slept_ms": 30}
        with pytest.raises(asyncio.TimeoutError):
            await client.get("/slow", params={"ms": 5000}, timeout=aiohttp.ClientTimeout(0.05))


async def test_aborted_stream_is_counted() -> None:
    request = CHAT | {"max_tokens": 1000, "stream": True}
    async with standin(token_interval_ms=5) as client:
        resp = await client.post("/v1/chat/completions", json=request)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # client goes away mid-stream
        for _ in range(100):
            if client.app[STATE].aborted_streams:
                break
            await asyncio.sleep(0.01)
        assert client.app[STATE].aborted_streams == 1
        assert client.app[STATE].completed_streams == 0


def test_main_cli(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "spendgate.sidecar.standin", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--latency-ms", "1", "--usage-mode", "header"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        start = json.loads(proc.stderr.readline())
        assert start["event"] == "standin_start" and start["port"] == port
        assert start["usage_mode"] == "header" and start["latency_ms"] == 1
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                    assert json.load(r)["data"][0]["id"] == "standin"
                    break
            except OSError:
                assert time.monotonic() < deadline, "standin did not start serving"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
