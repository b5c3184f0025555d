"""Holds that bound the real cost: output clamping, the rule's output maximum, absorbed excess,
free requests and cost limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.support.sidecar_env import ACME_KEY, PRICEBOOK, DataPlane, budget, data_plane

CENT = 10_000  # the chat rule: 0.01 per request + 0.01 per output token
HEADER = "X-Spendgate-Output-Limit"


def metric(plane: DataPlane, name: str, labels: dict[str, str] | None = None) -> float:
    return plane.sidecar.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def usage(plane: DataPlane) -> list[dict[str, str]]:
    await plane.settled()
    return [e for e in await plane.ledger.ledger_entries("acme", 1000) if e["type"] == "usage"]


async def with_pricebook(plane: DataPlane, **changes: Any) -> None:
    pricebook = json.loads(json.dumps(PRICEBOOK))
    pricebook["spec"].update(changes.pop("spec", {}))
    pricebook["spec"]["rules"][0].update(changes)
    from spendgate.models import parse_resource

    await plane.store.apply_pricebook(parse_resource(pricebook))  # type: ignore[arg-type]
    await plane.sidecar.config.load()


async def test_max_tokens_far_above_the_balance_is_clamped(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.50") as plane:
        resp = await plane.post_chat(max_tokens=10_000)  # could cost 5.00 (the maximum)
        assert resp.status == 200
        assert resp.headers[HEADER] == "49; reason=balance"  # 0.01 + 49 * 0.01 = 0.50
        body = await resp.json()
        assert body["usage"]["completion_tokens"] == 49
        [entry] = await usage(plane)
        assert (entry["cost"], entry["estimate"], entry["absorbed"]) == ("500000", "500000", "0")
        account = await plane.account()
        assert (account.balance, account.held, account.absorbed) == (0, 0, 0)
        assert metric(plane, "spendgate_output_limits_set_total", {"reason": "balance"}) == 1
        # Below the rule's minimum (16 tokens) the request is refused, not clamped to nothing.
        await plane.ledger.fund("acme", "top-up", 10 * CENT)  # 0.10 covers 9 tokens
        resp = await plane.post_chat(max_tokens=10_000)
        assert resp.status == 402
        assert (await resp.json())["error"]["code"] == "insufficient_balance"


async def test_no_max_tokens_gets_the_limit_the_hold_pays_for(redis_url: str) -> None:
    seen: list[dict[str, Any]] = []

    async def model(request: web.Request) -> web.Response:
        seen.append(await request.json())
        tokens = seen[-1].get("max_completion_tokens", seen[-1].get("max_tokens", 100_000))
        usage = {"prompt_tokens": 3, "completion_tokens": tokens}
        return web.json_response({"choices": [], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", model)
    async with data_plane(redis_url, acme_balance="10.00", upstream_app=app) as plane:
        await with_pricebook(plane, maxOutputTokens=64)
        resp = await plane.post_chat()
        assert resp.status == 200
        assert resp.headers[HEADER] == "64; reason=unset"
        assert seen[-1]["max_tokens"] == 64
        resp = await plane.post_chat(max_completion_tokens=10**23)  # absurd: never forwarded
        assert resp.headers[HEADER] == "64; reason=maximum"
        assert seen[-1]["max_completion_tokens"] == 64
        assert "max_tokens" not in seen[-1]
        resp = await plane.post_chat(max_tokens=20)  # within everything: left alone
        assert HEADER not in resp.headers
        assert seen[-1]["max_tokens"] == 20
        account = await plane.account()
        assert account.absorbed == 0
        assert account.balance == 10_000_000 - (65 + 65 + 21) * CENT


async def test_clamping_switched_off_refuses_instead(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.50") as plane:
        await with_pricebook(plane, maxOutputTokens=100, spec={"clampOutput": False})
        resp = await plane.post_chat(max_tokens=60)  # 0.61 > 0.50
        assert resp.status == 402
        resp = await plane.post_chat(max_tokens=10**23)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "output_limit_too_high"
        resp = await plane.post_chat(max_tokens=40)
        assert resp.status == 200
        assert HEADER not in resp.headers


def lying_stream_app(streamed: int, reported: int) -> web.Application:
    """A model that streams `streamed` tokens and reports `reported` in its usage chunk."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(streamed):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 1, "completion_tokens": reported}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


async def test_stream_whose_model_reports_more_than_it_streamed(redis_url: str) -> None:
    app = lying_stream_app(streamed=5, reported=10_000)
    async with data_plane(redis_url, acme_balance="0.30", upstream_app=app) as plane:
        resp = await plane.post_chat(max_tokens=20, stream=True)  # holds 0.21
        assert resp.status == 200
        await resp.read()
        [entry] = await usage(plane)
        assert entry["cost"] == str(21 * CENT)  # never above the hold
        assert entry["absorbed"] == str(5_000_000 - 21 * CENT)  # the rule's maximum, less that
        account = await plane.account()
        assert account.balance == 9 * CENT >= 0
        labels = {"currency": "USD", "rule": "chat"}
        assert metric(plane, "spendgate_absorbed_micros_total", labels) > 0


async def test_a_free_request_does_not_use_up_a_cost_limit(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(
            budget("acme", "10.00", rateLimits=[{"cost": "1.00", "per": "hour"}]), ACME_KEY
        )
        await plane.upstream.close()  # the model is down: refused connections are free
        for _ in range(5):
            resp = await plane.post_chat(max_tokens=50)  # holds 0.51 of the 1.00/hour
            assert resp.status == 502
            await plane.settled()
        assert (await plane.account()).spent == 0
        await plane.upstream.start_server()
        resp = await plane.post_chat(max_tokens=90)  # 0.91: fits only if nothing was used
        assert resp.status in (200, 502)  # the restarted model may have a new port
        assert resp.status != 429


async def test_concurrent_clamped_requests_never_overdraw(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="1.00") as plane:
        responses = await asyncio.gather(*(plane.post_chat(max_tokens=30) for _ in range(20)))
        statuses = sorted(r.status for r in responses)
        assert set(statuses) <= {200, 402}
        entries = await usage(plane)
        account = await plane.account()
        assert account.balance >= 0
        assert account.absorbed == 0
        assert sum(int(e["cost"]) for e in entries) == 1_000_000 - account.balance
