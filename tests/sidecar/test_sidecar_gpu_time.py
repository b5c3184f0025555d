"""Rules priced by upstream (GPU) time: a window held, extended while the model runs, and the
request stopped when the balance cannot pay the next window -- charged at most what it held.

Windows are 200 ms and the price 1.00 per second, so one window holds 0.20.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

from spendgate.money import parse_amount
from spendgate.sidecar.settings import FailMode
from spendgate.sidecar.standin import StandinConfig
from tests.sidecar.test_sidecar_streaming import content_event, sse_app
from tests.support.redis_servers import RedisServer
from tests.support.sidecar_env import (
    ACME_KEY,
    PRICEBOOK,
    DataPlane,
    budget,
    data_plane,
    replace,
)

MICRO = 1_000_000
WINDOW = 200_000  # 200 ms at 1.00 per second, in micro-units
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def gpu_pricebook(**rule: Any) -> dict[str, Any]:
    pricebook = copy.deepcopy(PRICEBOOK)
    timed = {
        "name": "gpu",
        "match": {"pathPrefix": "/slow", "methods": ["GET"]},
        "price": {"perSecond": "1.00"},
        "estimate": {"seconds": "200ms"},
        "maximum": "5.00",
        "timeout": "5s",
        "onUpstreamError": "metered",
        **rule,
    }
    streamed = {**timed, "name": "gpu-chat", "match": {"path": "/v1/chat/completions"}}
    pricebook["spec"]["rules"] = [timed, streamed]
    return pricebook


async def usage_entries(plane: DataPlane, customer: str = "acme") -> list[dict[str, str]]:
    return [e for e in await plane.ledger.ledger_entries(customer) if e["type"] == "usage"]


async def test_a_slow_request_is_stopped_when_the_balance_pays_no_more_windows(
    redis_url: str,
) -> None:
    async with data_plane(redis_url, pricebook=gpu_pricebook(), acme_balance="0.40") as plane:
        started = time.monotonic()
        resp = await plane.client.get("/slow?ms=3000", headers=AUTH)
        elapsed = time.monotonic() - started
        body = await resp.json()
        assert resp.status == 402, body
        assert body["error"]["code"] == "insufficient_balance"
        assert "GPU time" in body["error"]["message"]
        assert 0.35 < elapsed < 1.5  # two windows (0.4 s), not the 3 s the model wanted
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert entry["outcome"] == "cut_off"
        assert int(entry["cost"]) == 2 * WINDOW  # the two windows it held, all of them used
        assert int(entry["absorbed"]) == 0
        assert 390 <= int(entry["upstream_ms"]) < 1500
        account = await plane.account()
        assert (account.balance, account.held, account.absorbed) == (0, 0, 0)
        assert resp.headers["X-Spendgate-Cost"] == "0.40"


async def test_a_request_within_one_window_is_charged_its_measured_time(redis_url: str) -> None:
    async with data_plane(redis_url, pricebook=gpu_pricebook()) as plane:
        resp = await plane.client.get("/slow?ms=50", headers=AUTH)
        assert resp.status == 200
        assert resp.headers["X-Spendgate-Cost-Limit"] == "0.20"  # one window held
        await plane.settled()
        (entry,) = await usage_entries(plane)
        cost = int(entry["cost"])
        assert 50 * 1_000 <= cost < WINDOW
        assert cost == int(entry["upstream_ms"]) * 1_000  # exactly its measured time
        assert (await plane.account()).balance == 10 * MICRO - cost


async def test_a_request_over_several_windows_is_charged_in_full(redis_url: str) -> None:
    """Without extensions the hold (one window) would cap the charge and the rest be absorbed."""
    async with data_plane(redis_url, pricebook=gpu_pricebook()) as plane:
        resp = await plane.client.get("/slow?ms=700", headers=AUTH)
        assert resp.status == 200
        await plane.settled()
        (entry,) = await usage_entries(plane)
        cost = int(entry["cost"])
        assert 700 * 1_000 <= cost < 1_500 * 1_000
        assert cost == int(entry["upstream_ms"]) * 1_000
        assert int(entry["absorbed"]) == 0
        assert int(entry["estimate"]) == WINDOW  # what was held at reserve: one window
        account = await plane.account()
        assert (account.held, account.absorbed) == (0, 0)
        assert account.balance == 10 * MICRO - cost


async def test_a_stream_is_cut_off_when_the_balance_pays_no_more_windows(redis_url: str) -> None:
    standin = StandinConfig(token_interval_ms=50)
    async with data_plane(
        redis_url, pricebook=gpu_pricebook(), acme_balance="0.40", standin=standin
    ) as plane:
        started = time.monotonic()
        resp = await plane.post_chat(max_tokens=60, stream=True)  # 60 x 50 ms: 3 s
        raw = await resp.read()
        elapsed = time.monotonic() - started
        assert resp.status == 200
        assert 0.35 < elapsed < 1.5
        assert raw.endswith(b"data: [DONE]\n\n")
        assert b'"code": "insufficient_balance"' in raw
        assert 2 <= raw.count(b"tok") < 30
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert entry["outcome"] == "cut_off"
        assert int(entry["cost"]) == 2 * WINDOW
        account = await plane.account()
        assert (account.balance, account.held, account.absorbed) == (0, 0, 0)


async def test_a_stream_that_stalls_is_cut_off_without_waiting_for_its_next_event(
    redis_url: str,
) -> None:
    """The model thinks for 2 s after its first event: the clock, not the next event, ends it."""
    app = sse_app([content_event(0), content_event(1)], interval_s=2.0)
    async with data_plane(
        redis_url, pricebook=gpu_pricebook(), acme_balance="0.40", upstream_app=app
    ) as plane:
        started = time.monotonic()
        resp = await plane.post_chat(max_tokens=60, stream=True)
        raw = await resp.read()
        assert 0.35 < time.monotonic() - started < 1.5
        assert b" tok0" in raw and b" tok1" not in raw
        assert raw.endswith(b"data: [DONE]\n\n") and b"insufficient_balance" in raw
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert (entry["outcome"], int(entry["cost"])) == ("cut_off", 2 * WINDOW)
        assert (await plane.account()).balance == 0


async def test_a_stream_within_its_windows_is_charged_its_time(redis_url: str) -> None:
    standin = StandinConfig(token_interval_ms=50)
    async with data_plane(redis_url, pricebook=gpu_pricebook(), standin=standin) as plane:
        resp = await plane.post_chat(max_tokens=12, stream=True)  # ~0.6 s: three windows
        raw = await resp.read()
        assert resp.status == 200
        assert b"insufficient_balance" not in raw and raw.endswith(b"data: [DONE]\n\n")
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert entry["outcome"] == "ok"
        cost = int(entry["cost"])
        assert cost == int(entry["upstream_ms"]) * 1_000 and 500_000 <= cost < 1_500_000
        assert int(entry["absorbed"]) == 0


async def test_concurrent_slow_requests_never_take_the_balance_below_zero(
    redis_url: str,
) -> None:
    async with data_plane(redis_url, pricebook=gpu_pricebook(), acme_balance="1.30") as plane:
        lowest = [10 * MICRO]
        running = True

        async def sample() -> None:
            while running:
                account = await plane.account()
                lowest[0] = min(lowest[0], account.balance - account.held, account.balance)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        responses = await asyncio.gather(
            *(plane.client.get("/slow?ms=3000", headers=AUTH) for _ in range(6))
        )
        statuses = sorted(r.status for r in responses)
        running = False
        await sampler
        await plane.settled()
        assert set(statuses) <= {402}, statuses  # the balance ran out for every one of them
        entries = await usage_entries(plane)
        charged = sum(int(e["cost"]) for e in entries)
        account = await plane.account()
        assert lowest[0] >= 0
        assert (account.held, account.absorbed) == (0, 0)
        assert account.balance >= 0
        assert charged == 1_300_000 - account.balance
        assert len(entries) == 6 and all(e["outcome"] == "cut_off" for e in entries)
        for resp in responses:
            assert json.loads(await resp.text())["error"]["code"] == "insufficient_balance"


async def test_another_customer_is_not_held_up(redis_url: str) -> None:
    """The clock extends one request's hold; a second customer's budget is untouched."""
    async with data_plane(redis_url, pricebook=gpu_pricebook(), acme_balance="0.20") as plane:
        await plane.apply_budget(budget("other", "1.00"), "sk-test-other-0123456789abcdef")
        resp = await plane.client.get("/slow?ms=1000", headers=AUTH)
        assert resp.status == 402
        await plane.settled()
        assert (await plane.account("other")).balance == MICRO


# --------------------------------------------------------------------------- price expressions

KSERVE_BODY = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}


def windowed_expression_pricebook(**rule: Any) -> dict[str, Any]:
    """A KServe rule priced by expressions whose bound is over held_ms, in 200 ms windows."""
    pricebook = copy.deepcopy(PRICEBOOK)
    pricebook["spec"]["rules"] = [
        {
            "name": "kserve",
            "match": {"methods": ["POST"], "pathPrefix": "/v2/models/"},
            "expression": {
                "prices": {"gpu_second": "1.00"},
                "bound": "ceil_div(held_ms * prices.gpu_second, 1000)",
                "cost": "ceil_div(upstream_ms * prices.gpu_second, 1000)",
            },
            "estimate": {"seconds": "200ms"},
            "timeout": "5s",
            **rule,
        }
    ]
    return pricebook


async def infer(plane: DataPlane, compute_ms: int) -> Any:
    body = {**KSERVE_BODY, "parameters": {"compute_ms": compute_ms}}
    return await plane.client.post("/v2/models/resnet/infer", json=body, headers=AUTH)


async def test_an_expression_bound_over_held_ms_is_held_a_window_at_a_time(
    redis_url: str,
) -> None:
    async with data_plane(redis_url, pricebook=windowed_expression_pricebook()) as plane:
        resp = await infer(plane, 700)
        assert resp.status == 200
        await plane.settled()
        (entry,) = await usage_entries(plane)
        cost = int(entry["cost"])
        assert cost == int(entry["upstream_ms"]) * 1_000 and cost >= 700_000
        # one window held at reserve (not 5 s), extended as the model ran
        assert (int(entry["estimate"]), int(entry["absorbed"])) == (WINDOW, 0)
        limit = parse_amount(resp.headers["X-Spendgate-Cost-Limit"])  # held when it answered
        assert cost <= limit <= cost + 2 * WINDOW


async def test_an_expression_rule_is_stopped_when_the_balance_pays_no_more_windows(
    redis_url: str,
) -> None:
    pricebook = windowed_expression_pricebook()
    async with data_plane(redis_url, pricebook=pricebook, acme_balance="0.40") as plane:
        started = time.monotonic()
        resp = await infer(plane, 3000)
        assert resp.status == 402
        assert 0.35 < time.monotonic() - started < 1.5
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert (entry["outcome"], int(entry["cost"])) == ("cut_off", 2 * WINDOW)
        account = await plane.account()
        assert (account.balance, account.held, account.absorbed) == (0, 0, 0)


async def test_without_a_window_an_expression_bound_holds_the_whole_timeout(
    redis_url: str,
) -> None:
    pricebook = windowed_expression_pricebook(estimate={})
    async with data_plane(redis_url, pricebook=pricebook) as plane:
        resp = await infer(plane, 10)
        assert resp.status == 200
        assert resp.headers["X-Spendgate-Cost-Limit"] == "5.00"


# --------------------------------------------------------------------------- Redis gone mid-way


async def _slow_while_redis_hangs(server: RedisServer, mode: FailMode) -> tuple[int, float]:
    settings = lambda s: replace(s, fail_mode=mode, redis_timeout_s=0.2)  # noqa: E731
    async with data_plane(server.url, pricebook=gpu_pricebook(), settings=settings) as plane:
        started = time.monotonic()
        request = asyncio.create_task(plane.client.get("/slow?ms=1200", headers=AUTH))
        await asyncio.sleep(0.05)
        server.freeze()  # the first extension (at 100 ms) finds Redis hung
        try:
            resp = await asyncio.wait_for(request, 15)
            return resp.status, time.monotonic() - started
        finally:
            server.thaw()


async def test_failing_closed_a_request_whose_hold_cannot_be_extended_is_stopped(
    fresh_redis_server: RedisServer,
) -> None:
    status, elapsed = await _slow_while_redis_hangs(fresh_redis_server, FailMode.closed)
    assert status == 402 and elapsed < 1.0


async def test_failing_open_a_request_whose_hold_cannot_be_extended_is_served(
    fresh_redis_server: RedisServer,
) -> None:
    status, elapsed = await _slow_while_redis_hangs(fresh_redis_server, FailMode.open)
    assert status == 200 and elapsed >= 1.2
