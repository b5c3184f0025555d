"""Customers see their own money through a real sidecar: balance headers on every response,
``GET /v1/spendgate/balance`` (free, rate limited, never another customer's data), and
refusals counted for ``spendgate usage``. Single Redis and Cluster."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from spendgate.accounting.refusals import read_refusals
from spendgate.keys import for_customer
from spendgate.money import parse_amount
from spendgate.sidecar.customer_view import BALANCE_PATH
from tests.support.sidecar_env import ACME_KEY, OTHER_KEY, budget, data_plane

MICRO = 1_000_000


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_two_customers_each_see_only_their_own_balance(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster) as plane:
        await plane.apply_budget(budget("other", "3.00", key_name="ops"), OTHER_KEY)
        resp = await plane.post_chat(max_tokens=5)
        assert resp.status == 200
        await plane.settled()
        acme = await plane.client.get(BALANCE_PATH, headers=bearer(ACME_KEY))
        other = await plane.client.get(BALANCE_PATH, headers={"X-API-Key": OTHER_KEY})
        assert acme.status == other.status == 200
        assert acme.headers["Cache-Control"] == "no-store"
        a, o = await acme.json(), await other.json()
        assert (a["customerId"], a["key"], a["balance"], a["held"]) == (
            "acme",
            "main",
            "9.94",
            "0.00",
        )
        assert a["spentThisPeriod"] == "0.06" and a["state"] == "Active" and a["currency"] == "USD"
        assert (o["customerId"], o["key"], o["balance"], o["available"]) == (
            "other", "ops", "3.00", "3.00",
        )  # fmt: skip
        assert "acme" not in await other.text() and "9.94" not in await other.text()
        # priced at zero: reading the balance changed nothing
        assert (await plane.account()).balance == 10 * MICRO - 60_000
        usage = [e for e in await plane.ledger.ledger_entries("acme") if e["type"] == "usage"]
        assert len(usage) == 1


async def test_balance_endpoint_refuses_bad_keys_and_methods(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster) as plane:
        assert (await plane.client.get(BALANCE_PATH)).status == 401
        unknown = await plane.client.get(BALANCE_PATH, headers=bearer("sk-unknown-0123456789"))
        assert unknown.status == 401
        assert (await unknown.json())["error"]["code"] == "invalid_api_key"
        post = await plane.client.post(BALANCE_PATH, headers=bearer(ACME_KEY))
        assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"


async def test_balance_endpoint_is_rate_limited_like_any_route(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster) as plane:
        limited = budget("acme", "10.00", rateLimits=[{"requests": 2, "per": "minute"}])
        await plane.apply_budget(limited, ACME_KEY)
        statuses = [
            (await plane.client.get(BALANCE_PATH, headers=bearer(ACME_KEY))).status
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        chat = await plane.post_chat()
        assert chat.status == 429  # the same allowance as every other route
        assert "RateLimit-Remaining" in chat.headers


async def test_suspended_customer_still_sees_why(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster) as plane:
        await plane.redis.hset(for_customer("acme").suspensions, "payment", "invoice failed")
        view = await (await plane.client.get(BALANCE_PATH, headers=bearer(ACME_KEY))).json()
        assert view["state"] == "Suspended" and view["reasons"] == ["payment: invoice failed"]


async def test_response_headers_carry_cost_and_remaining(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster) as plane:
        resp = await plane.post_chat(max_tokens=5)
        assert resp.status == 200
        # hold: 0.01 + 10 estimated tokens; cost: 0.01 + 5 tokens
        assert resp.headers["X-Spendgate-Currency"] == "USD"
        assert resp.headers["X-Spendgate-Cost"] == "0.06"
        assert resp.headers["X-Spendgate-Remaining"] == "9.94"
        assert float(resp.headers["X-Spendgate-Cost-Limit"]) >= 0.06
        await plane.settled()
        streamed = await plane.post_chat(max_tokens=3, stream=True)
        await streamed.read()
        assert "X-Spendgate-Cost" not in streamed.headers  # unknown when the headers leave
        limit = parse_amount(streamed.headers["X-Spendgate-Cost-Limit"])
        remaining = parse_amount(streamed.headers["X-Spendgate-Remaining"])
        assert remaining == 10 * MICRO - 60_000 - limit  # after this request's hold
        await plane.settled()


async def test_the_model_cannot_forge_money_headers(target: tuple[str, bool]) -> None:
    async def forging(request: web.Request) -> web.Response:
        await request.read()
        headers = {"X-Spendgate-Remaining": "1000000", "X-Spendgate-Balance": "other: 5.00"}
        return web.json_response({"ok": True}, headers=headers)

    model = web.Application()
    model.router.add_route("*", "/echo", forging)
    url, cluster = target
    async with data_plane(url, cluster=cluster, upstream_app=model) as plane:
        resp = await plane.client.post("/echo", data=b"{}", headers=bearer(ACME_KEY))
        assert resp.status == 200
        assert resp.headers.getall("X-Spendgate-Remaining") == ["9.99"]
        assert resp.headers["X-Spendgate-Cost"] == "0.01"
        assert "X-Spendgate-Balance" not in resp.headers


async def test_refusals_are_counted_for_usage(target: tuple[str, bool]) -> None:
    url, cluster = target
    async with data_plane(url, cluster=cluster, acme_balance="0.00") as plane:
        for _ in range(3):
            assert (await plane.post_chat()).status == 402
        await plane.sidecar.proxy.customer_view.refusals.flush()
        now = int(time.time() * 1000)
        counts = await read_refusals(plane.redis, "acme", now - 3_600_000, now + 1)
        assert [(k.reason, k.key, k.model, n) for k, n in counts] == [
            ("insufficient", "main", "standin", 3)
        ]


async def test_refusal_counter_is_bounded_and_survives_redis_errors() -> None:
    from spendgate.sidecar.refusal_counts import RefusalCounter

    class Down:
        def pipeline(self, transaction: bool = False) -> Any:
            raise ConnectionError("down")

    dropped: list[int] = []
    counter = RefusalCounter(Down(), max_keys=2, on_drop=dropped.append, clock=lambda: 7200.0)
    for key in ("a", "b", "c"):
        counter.count("acme", key, "insufficient", "m")
    counter.count("acme", "a", "insufficient", "m")
    await counter.flush()  # fails: kept
    assert sorted((k.key, n) for k, n in counter._counts.items()) == [("a", 2), ("b", 1)]
    assert dropped == [1]
    await counter.stop()
    await asyncio.sleep(0)
