"""The sidecar's response path: byte-exact streaming, usage metering, cut-off, settlement."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
from aiohttp import web

from spendgate.sidecar.standin import STATE, StandinConfig, pseudo_random_bytes
from tests.support.sidecar_env import ACME_KEY, DataPlane, data_plane

MICRO = 1_000_000
CENT = 10_000  # 0.01 in micro-units: the chat rule's flat fee and its price per output token
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
CHAT_PATH = "/v1/chat/completions"


async def usage_entries(plane: DataPlane, customer: str = "acme") -> list[dict[str, str]]:
    return [e for e in await plane.ledger.ledger_entries(customer) if e["type"] == "usage"]


async def settled_entry(plane: DataPlane, request_id: str) -> dict[str, str]:
    """The one ledger entry of a request, once its background settlement has run."""
    await plane.settled()
    entries = [e for e in await usage_entries(plane) if e["request_id"] == request_id]
    assert len(entries) == 1, entries
    return entries[0]


def metric(plane: DataPlane, name: str, labels: dict[str, str] | None = None) -> float:
    value = plane.sidecar.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def sse_blocks(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    blocks = [b for b in raw.decode().split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b.removeprefix("data: ") for b in blocks]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "standin", "messages": [{"role": "user", "content": "hi"}], **fields}


def sse_app(chunks: list[bytes], *, interval_s: float = 0.0) -> web.Application:
    """An upstream that answers the chat route with exactly these bytes, one write each."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            await asyncio.sleep(interval_s)  # separate writes reach the sidecar separately
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(CHAT_PATH, handler)
    return app


def content_event(i: int) -> bytes:
    delta = {"content": f" tok{i}"}
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "standin",
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


# --------------------------------------------------------------------------- pass-through


async def test_chunked_bytes_pass_through_exactly_and_are_charged_flat_once(
    redis_url: str,
) -> None:
    n = 200_000
    async with data_plane(redis_url) as plane:
        # The "bytes" rule matches POST (the default method); the stand-in serves both.
        resp = await plane.client.post(f"/bytes?n={n}&chunk=4096&seed=7", headers=AUTH)
        assert resp.status == 200
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        body = await resp.read()
        assert len(body) == n
        assert body == pseudo_random_bytes(n, seed=7)
        assert "X-Bytes-Sha256" in resp.headers
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["cost"] == str(CENT)
        assert len(await usage_entries(plane)) == 1
        account = await plane.account()
        assert account.balance == 10 * MICRO - CENT
        assert account.held == 0


async def test_sse_bytes_are_unchanged_even_when_events_straddle_chunks(redis_url: str) -> None:
    """Fixed upstream bytes, written in pieces that split events (and a CRLF-terminated one)."""
    usage = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "standin",
             "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7,
                                      "total_tokens": 10}}  # fmt: skip
    stream = (
        b": keep-alive comment\n\n"
        + content_event(0)
        + content_event(1).replace(b"\n\n", b"\r\n\r\n")
        + content_event(2)
        + b"data: "
        + json.dumps(usage).encode()
        + b"\n\n"
        + b"data: [DONE]\n\n"
    )
    pieces = [stream[i : i + 37] for i in range(0, len(stream), 37)]
    async with data_plane(redis_url, upstream_app=sse_app(pieces, interval_s=0.002)) as plane:
        body = chat_body(stream=True, stream_options={"include_usage": True})
        resp = await plane.client.post(CHAT_PATH, json=body, headers=AUTH)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert await resp.read() == stream
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        # Billed from the usage chunk (7 tokens), not from the 3 content events it counted.
        assert entry["output_tokens"] == "7"
        assert entry["cost"] == str(CENT + 7 * CENT)
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - 8 * CENT


async def test_sse_with_include_usage_matches_the_model_and_bills_its_usage(
    redis_url: str,
) -> None:
    """The stand-in's own stream, through the sidecar and directly: same bytes but ids."""
    body = chat_body(max_tokens=6, stream=True, stream_options={"include_usage": True})
    async with data_plane(redis_url, standin=StandinConfig(token_interval_ms=2)) as plane:
        resp = await plane.client.post(CHAT_PATH, json=body, headers=AUTH)
        assert resp.status == 200
        proxied = await resp.read()
        async with aiohttp.ClientSession() as direct:
            upstream_url = plane.upstream.make_url(CHAT_PATH)
            async with direct.post(upstream_url, json=body) as direct_resp:
                expected = await direct_resp.read()

        def normalized(raw: bytes) -> bytes:
            raw = re.sub(rb'"id":"chatcmpl-standin-\d+"', b'"id":"X"', raw)
            return re.sub(rb'"created":\d+', b'"created":0', raw)

        assert normalized(proxied) == normalized(expected)
        events = sse_blocks(proxied)
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 6
        assert len(events) == 6 + 3  # tokens, finish chunk, usage chunk, [DONE]

        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["output_tokens"] == "6"
        assert entry["cost"] == str(CENT + 6 * CENT)
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - 7 * CENT


async def test_sse_without_usage_is_billed_by_counted_output_events(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        # max_tokens 12 is what the hold assumes; the model stops after 4 tokens.
        resp = await plane.post_chat(max_tokens=12, stop_after=4, stream=True)
        assert resp.status == 200
        events = sse_blocks(await resp.read())
        assert events[-1] == "[DONE]"
        assert not any("usage" in e for e in events[:-1])
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["output_tokens"] == "4"  # not the role/finish chunks, not max_tokens
        assert entry["cost"] == str(CENT + 4 * CENT)
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - 5 * CENT


# --------------------------------------------------------------------------- cut-off


async def test_stream_outrunning_the_balance_is_cut_off_and_paid_for_what_was_sent(
    redis_url: str,
) -> None:
    """The model ignores max_tokens and streams 100 tokens; the balance pays for 19."""
    chunks = [content_event(i) for i in range(100)] + [b"data: [DONE]\n\n"]
    upstream = sse_app(chunks)
    async with data_plane(redis_url, acme_balance="0.20", upstream_app=upstream) as plane:
        resp = await plane.post_chat(max_tokens=5, stream=True)  # holds 0.06 of the 0.20
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 10)
        events = sse_blocks(raw)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "insufficient_balance"
        assert error["type"] == "insufficient_quota"
        delivered = events[:-2]
        assert all("error" not in e for e in delivered)
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in delivered] == [
            f" tok{i}" for i in range(len(delivered))
        ]
        assert raw.startswith(b"".join(chunks[: len(delivered)]))  # whole events, unchanged

        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["outcome"] == "cut_off"
        assert entry["output_tokens"] == str(len(delivered))
        assert int(entry["cost"]) == CENT + CENT * len(delivered)
        account = await plane.account()
        assert account.held == 0
        assert account.balance >= 0  # never below zero
        # Cut off when the balance is gone, not while it could still pay for more tokens.
        assert account.balance < CENT
        assert len(delivered) == 19
        assert metric(plane, "spendgate_stream_cutoffs_total") == 1


async def test_stream_within_the_balance_is_not_cut_off(redis_url: str) -> None:
    """A stream longer than its hold extends the reservation instead of ending."""
    chunks = [content_event(i) for i in range(30)] + [b"data: [DONE]\n\n"]
    async with data_plane(redis_url, upstream_app=sse_app(chunks)) as plane:
        resp = await plane.post_chat(max_tokens=5, stream=True)  # holds 0.06, costs 0.31
        assert await resp.read() == b"".join(chunks)
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["outcome"] == "ok"
        assert entry["cost"] == str(CENT + 30 * CENT)
        assert (await plane.account()).held == 0
        assert metric(plane, "spendgate_stream_cutoffs_total") == 0


# --------------------------------------------------------------------------- non-streaming usage


async def test_json_usage_in_the_body_is_billed(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.post_chat(max_tokens=10, stop_after=3)  # holds 0.11
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 3
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["output_tokens"] == "3"
        assert entry["cost"] == str(CENT + 3 * CENT)
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - 4 * CENT


async def test_usage_headers_from_the_model_are_billed(redis_url: str) -> None:
    async with data_plane(redis_url, standin=StandinConfig(usage_mode="header")) as plane:
        resp = await plane.post_chat(max_tokens=10, stop_after=3)
        assert resp.status == 200
        assert "usage" not in await resp.json()
        assert resp.headers["X-Usage-Output-Tokens"] == "3"
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["output_tokens"] == "3"
        assert entry["cost"] == str(CENT + 3 * CENT)
        assert (await plane.account()).held == 0


async def test_without_any_usage_the_estimate_is_charged(redis_url: str) -> None:
    async with data_plane(redis_url, standin=StandinConfig(usage_mode="none")) as plane:
        resp = await plane.post_chat(max_tokens=7, stop_after=2)
        assert resp.status == 200
        assert "usage" not in await resp.json()
        assert plane.upstream.app is not None
        assert plane.upstream.app[STATE].requests[f"POST {CHAT_PATH}"] == 1
        entry = await settled_entry(plane, resp.headers["X-Spendgate-Request-Id"])
        assert entry["output_tokens"] == "7"  # max_tokens: all the model was allowed
        assert entry["cost"] == str(CENT + 7 * CENT)
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - 8 * CENT
