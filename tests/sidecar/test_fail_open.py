"""Bounded fail-open: with Redis down each customer gets at most its allowance, journaled."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from aiohttp import web

from spendgate.accounting.settlement import in_flight
from spendgate.ledger import Usage
from spendgate.models import PriceRule
from spendgate.pricing import RequestFacts, RulePricing
from spendgate.sidecar.fail_open import upper_bound
from spendgate.sidecar.reconcile import PendingCharge
from spendgate.sidecar.settings import FailMode
from tests.support.redis_servers import RedisServer
from tests.support.sidecar_env import ACME_KEY, OTHER_KEY, DataPlane, budget, data_plane, replace

CENT = 10_000
MICRO = 1_000_000


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis that keeps its data across a kill (AOF, fsync always): "down", then back."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    yield server
    server.close()


def fail_open(journal: Path, allowance: int, **more: Any) -> Any:
    return lambda s: replace(
        s,
        fail_mode=FailMode.open,
        fail_open_allowance=allowance,
        journal_dir=str(journal),
        redis_timeout_s=0.3,
        **more,
    )


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def usage_ids(plane: DataPlane, customer: str) -> list[str]:
    with contextlib.suppress(redis.exceptions.ConnectionError):
        await plane.redis.ping()  # the test's own client reconnects after a Redis restart
    entries = await plane.ledger.ledger_entries(customer, 1000)
    return [e["request_id"] for e in entries if e["type"] == "usage"]


async def eventually(check: Any, within_s: float, what: str) -> None:
    for _ in range(int(within_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within_s} s: {what}")


def journal_records(journal: Path) -> list[dict[str, Any]]:
    path = journal / "journal.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_redis_down_serves_each_customer_at_most_its_allowance(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    async with data_plane(durable_redis.url, settings=fail_open(tmp_path, 5 * CENT)) as plane:
        await plane.apply_budget(budget("other", "10.00"), OTHER_KEY)
        await plane.sidecar.config.load()
        durable_redis.stop()
        served: dict[str, list[str]] = {}
        for customer, key in (("acme", ACME_KEY), ("other", OTHER_KEY)):
            # Concurrent: the allowance check and take are atomic within the process.
            responses = await asyncio.gather(
                *(plane.client.post("/echo", data=b"{}", headers=auth(key)) for _ in range(12))
            )
            statuses = Counter(r.status for r in responses)
            assert statuses == {200: 5, 503: 7}, statuses  # 5 x 0.01 = the 0.05 allowance
            for refused in (r for r in responses if r.status == 503):
                assert (await refused.json())["error"]["code"] == "billing_unavailable"
            served[customer] = [
                r.headers["X-Spendgate-Request-Id"] for r in responses if r.status == 200
            ]
        proxy = plane.sidecar.proxy
        assert proxy is not None
        assert proxy.fail_open.used("acme") == proxy.fail_open.used("other") == 5 * CENT
        charges = [r for r in journal_records(tmp_path) if r["op"] == "charge"]
        assert sorted(r["id"] for r in charges) == sorted(served["acme"] + served["other"])
        registry = plane.sidecar.metrics.registry
        refused = {"outcome": "fail_open_exhausted"}
        assert registry.get_sample_value("spendgate_decisions_total", refused) == 14
        assert registry.get_sample_value("spendgate_journal_pending") == 10

        durable_redis.start()

        async def reconciled() -> bool:
            return len(plane.sidecar.pending) == 0

        await eventually(reconciled, 15, "the fail-open charges reach the ledger")
        for customer, ids in served.items():
            assert sorted(await usage_ids(plane, customer)) == sorted(ids)  # each exactly once
            account = await plane.account(customer)
            assert account.balance == 10 * MICRO - 5 * CENT
            assert proxy.fail_open.used(customer) == 0  # reconciled: the allowance is back
        await plane.sidecar.journal.flush()
        assert journal_records(tmp_path) == []  # compacted once everything is acknowledged


async def test_the_allowance_counts_a_request_at_its_upper_bound(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    """A chat request with max_tokens 10 may cost 0.11: it does not fit an allowance of 0.10,
    whatever it would really cost; one of 0.11 fits once, and its actual cost replaces it."""
    async with data_plane(durable_redis.url, settings=fail_open(tmp_path, 10 * CENT)) as plane:
        durable_redis.stop()
        resp = await plane.post_chat(max_tokens=10)
        assert resp.status == 503
        assert plane.sidecar.proxy.fail_open.used("acme") == 0  # type: ignore[union-attr]
    durable_redis.start()
    async with data_plane(durable_redis.url, settings=fail_open(tmp_path, 11 * CENT)) as plane:
        assert plane.sidecar.journal.pending == {}
        durable_redis.stop()
        resp = await plane.post_chat(max_tokens=3)  # bound 0.04, fits
        assert resp.status == 200
        assert plane.sidecar.proxy.fail_open.used("acme") == 4 * CENT  # type: ignore[union-attr]
        resp = await plane.post_chat(max_tokens=10)  # 0.04 + 0.11 > 0.11
        assert resp.status == 503


async def test_allowance_zero_serves_nothing_unreserved(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    async with data_plane(durable_redis.url, settings=fail_open(tmp_path, 0)) as plane:
        durable_redis.stop()
        resp = await plane.client.post("/echo", data=b"{}", headers=auth(ACME_KEY))
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "billing_unavailable"
        assert journal_records(tmp_path) == []


async def test_local_exhaustion_never_takes_from_the_allowance(
    redis_url: str, tmp_path: Path
) -> None:
    settings = fail_open(tmp_path, 5 * CENT, redis_pool_size=1)
    async with data_plane(redis_url, settings=settings) as plane:
        release = asyncio.Event()
        entered = asyncio.Event()

        async def hold_the_only_slot() -> None:
            async with plane.sidecar.limiter.slot():
                entered.set()
                await release.wait()

        holder = asyncio.create_task(hold_the_only_slot())
        await entered.wait()
        resp = await plane.client.post("/echo", data=b"{}", headers=auth(ACME_KEY))
        release.set()
        await holder
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "billing_busy"
        assert plane.sidecar.proxy.fail_open.used("acme") == 0  # type: ignore[union-attr]
        assert journal_records(tmp_path) == []


async def test_a_failed_settle_is_journaled_and_reconciled_once(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    closed = lambda s: replace(s, journal_dir=str(tmp_path), redis_timeout_s=0.3)  # noqa: E731
    async with data_plane(durable_redis.url, settings=closed) as plane:
        assert (await plane.client.post("/echo", data=b"{}", headers=auth(ACME_KEY))).status == 200
        await plane.settled()
        # Admitted with a hold, then Redis goes away before the settle: kept on disk.
        charge = PendingCharge("acme", "req-after-response", 3 * CENT, "main", Usage(rule="echo"))
        durable_redis.stop()
        await plane.sidecar.pending.add(charge)
        (record,) = journal_records(tmp_path)
        assert (record["v"], record["op"], record["id"], record["cost"]) == (
            1, "charge", "req-after-response", 3 * CENT,
        )  # fmt: skip
        assert "allowance" not in record  # reserved: not fail-open
        durable_redis.start()

        async def reconciled() -> bool:
            return len(plane.sidecar.pending) == 0

        await eventually(reconciled, 15, "the deferred charge reaches the ledger")
        assert (await usage_ids(plane, "acme")).count("req-after-response") == 1
        assert (await plane.account()).balance == 10 * MICRO - CENT - 3 * CENT


async def test_waiting_charges_are_reported_for_spendgate_balance(
    redis_url: str, tmp_path: Path
) -> None:
    async with data_plane(redis_url, settings=fail_open(tmp_path, MICRO)) as plane:
        pending = plane.sidecar.pending
        assert pending._task is not None
        pending._task.cancel()  # this test drives report and flush itself
        pending.add(PendingCharge("acme", "req-a", 2 * CENT, "main", Usage(), unreserved=True))
        pending.add(PendingCharge("acme", "req-b", 3 * CENT, "main", Usage(), unreserved=True))
        await pending.report()
        state = await in_flight(plane.redis, "acme", 0)
        assert (state.unreconciled_count, state.unreconciled_amount) == (2, 5 * CENT)
        assert [w.pod for w in state.unreconciled] == ["test-pod"]
        assert not state.settled
        await pending.flush()
        await pending.report()
        state = await in_flight(plane.redis, "acme", 0)
        assert state.unreconciled == [] and state.settled


def test_a_time_priced_request_counts_all_the_time_its_timeout_allows() -> None:
    """Its hold is one window of GPU time; unreserved, nothing would extend (or stop) it."""
    timed = PriceRule.model_validate(
        {"name": "gpu", "price": {"flat": "0.01", "perSecond": "1.00"},
         "estimate": {"seconds": "1s"}, "timeout": "10s", "maximum": "5.00"}
    )  # fmt: skip
    pricing = RulePricing(timed)
    bound = pricing.bound(RequestFacts())
    assert (bound.hold, bound.window_ms) == (MICRO + CENT, 1_000)
    assert upper_bound(pricing, bound, timed.timeout) == 5 * MICRO  # 10.01, capped at 5.00
    short = PriceRule.model_validate(
        {"name": "gpu", "price": {"perSecond": "1.00"}, "timeout": "3s", "maximum": "9.00"}
    )
    short_bound = RulePricing(short).bound(RequestFacts())
    assert upper_bound(RulePricing(short), short_bound, short.timeout) == 3 * MICRO
    tokens = PriceRule.model_validate(
        {"name": "chat", "price": {"perMillionOutputTokens": "10000"}, "maximum": "5.00"}
    )
    token_bound = RulePricing(tokens).bound(RequestFacts(max_tokens=10))
    assert upper_bound(RulePricing(tokens), token_bound, tokens.timeout) == token_bound.hold


def overrunning_model(events: int) -> web.Application:
    """Streams ``events`` tokens whatever max_tokens says, slowly enough to lose Redis mid-way."""

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(events):
            chunk = {"choices": [{"delta": {"content": "x"}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize(("allowance", "cut"), [(5 * CENT, True), (2 * MICRO, False)])
async def test_a_stream_past_its_hold_without_redis_goes_on_only_within_the_allowance(
    durable_redis: RedisServer, tmp_path: Path, allowance: int, cut: bool
) -> None:
    settings = fail_open(tmp_path, allowance)
    async with data_plane(
        durable_redis.url, settings=settings, upstream_app=overrunning_model(20)
    ) as plane:
        resp = await plane.post_chat(max_tokens=2, stream=True)  # holds 0.03
        assert resp.status == 200
        await resp.content.readany()
        durable_redis.stop()  # admitted and streaming: now Redis goes away
        text = (await asyncio.wait_for(resp.read(), 15)).decode()
        proxy = plane.sidecar.proxy
        assert proxy is not None
        if cut:  # growing the hold by a step (1.25) does not fit 0.05: cut at the hold
            assert "insufficient_balance" in text
            assert proxy.fail_open.used("acme") == 0
        else:  # one step fits 2.00: served on, counted against the allowance until settled
            assert "insufficient_balance" not in text and text.endswith("data: [DONE]\n\n")
            assert proxy.fail_open.used("acme") == 125 * CENT
        durable_redis.start()

        async def reconciled() -> bool:
            return len(plane.sidecar.pending) == 0 and proxy.fail_open.used("acme") == 0

        await eventually(reconciled, 15, "settled and the allowance given back")
        assert len(await usage_ids(plane, "acme")) == 1
