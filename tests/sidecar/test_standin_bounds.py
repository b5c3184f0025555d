"""The stand-in model bounds its own work like a real model server: absurd requests are refused
in the OpenAI error shape before anything is allocated."""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from spendgate.sidecar.standin import StandinConfig, build_parser, create_app

CHAT = {"model": "standin", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def standin(**config: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(StandinConfig(**config)))) as client:
        yield client


async def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    error: dict[str, Any] = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
async def test_absurd_max_tokens_is_refused_before_any_work(field: str, stream: bool) -> None:
    async with standin(max_output_tokens=1000) as client:
        for value in (10**23, 1001):
            body = CHAT | {field: value, "stream": stream}
            error = await error_of(await client.post("/v1/chat/completions", json=body), 400)
            assert error["code"] == "invalid_value"
            assert error["message"] == (
                f"'{field}' is too large: {value}; this model allows at most 1000"
            )
        ok = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1000})
        assert (await ok.json())["usage"]["completion_tokens"] == 1000


async def test_body_larger_than_the_limit_is_a_json_413() -> None:
    async with standin(max_body_bytes=1000) as client:
        big = CHAT | {"messages": [{"role": "user", "content": "x " * 1000}]}
        error = await error_of(await client.post("/v1/chat/completions", json=big), 413)
        assert error["code"] == "body_too_large" and "1000 bytes" in error["message"]
        # Compressed small, decompressed large: the limit is on what it would have to hold.
        packed = gzip.compress(json.dumps(big).encode())
        assert len(packed) < 1000
        resp = await client.post(
            "/v1/chat/completions",
            data=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert (await error_of(resp, 413))["code"] == "body_too_large"
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_deeply_nested_json_is_a_400() -> None:
    async with standin() as client:
        resp = await client.post("/v1/chat/completions", data="[" * 100_000)
        assert (await error_of(resp, 400))["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field"),
    [
        ("POST", "/v1/embeddings", {"json": {"input": "a", "dimensions": 10**9}}, "dimensions"),
        ("POST", "/v1/embeddings", {"json": {"input": ["a"] * 3000}}, "input"),
        ("GET", "/bytes?n=100000000000", {}, "n"),
        ("GET", "/bytes?n=1" + "0" * 5000, {}, "n"),
        ("GET", "/bytes?chunk=99999999999", {}, "chunk"),
        ("GET", "/slow?ms=99999999999", {}, "ms"),
    ],
)
async def test_helpers_and_embeddings_are_bounded(
    method: str, path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with standin() as client:
        error = await error_of(await client.request(method, path, **kwargs), 400)
        assert error["code"] == "invalid_value" and f"'{field}'" in error["message"]


def test_help_is_plain_text_with_help_for_every_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text and ":func:" not in text
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "--max-output-tokens N" in text and "(default 8192)" in text
