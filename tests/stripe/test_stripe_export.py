"""Usage out: ledger streams to Stripe meter events, against the recording double."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import stripe

from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger, Usage
from spendgate.operator.stripe.client import StripeGateway
from spendgate.operator.stripe.export_state import (
    EXPORT_CURSORS,
    deadletter_key,
    export_lag_seconds,
)
from spendgate.operator.stripe.exporter import Exporter
from spendgate.operator.stripe.settings import StripeSettings
from tests.support.budget_trees import apply_tree, tree_budget
from tests.support.stripe_fakes import (  # noqa: F401  (fixtures)
    API_KEY,
    StripeDouble,
    apply_linked_budget,
    stripe_double,
)


@dataclass
class Env:
    redis: Any
    ledger: Ledger
    double: StripeDouble
    gateways: list[StripeGateway] = field(default_factory=list)
    events: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def exporter(self, **overrides: Any) -> Exporter:
        values: dict[str, Any] = {
            "api_base": self.double.url,
            "max_attempts": 4,
            "backoff_base_s": 0.001,
            "backoff_cap_s": 0.01,
            "export_requests_per_s": 10_000,
        }
        settings = StripeSettings(**{**values, **overrides})
        gateway = StripeGateway.create(API_KEY, settings)
        self.gateways.append(gateway)
        return Exporter(self.redis, settings, gateway, on_event=lambda *a: self.events.append(a))

    async def usage(self, count: int, cost: int = 12_345, start: int = 0) -> list[str]:
        ids = []
        for i in range(start, start + count):
            rid = f"req{i:04d}"
            await self.ledger.settle("acme", rid, cost, key_id="main", usage=Usage(model="m"))
            ids.append(rid)
        return ids

    async def ledger_length(self) -> int:
        return await self.redis.xlen(for_customer("acme").ledger)


@pytest_asyncio.fixture
async def env(redis_url: str, stripe_double: StripeDouble) -> AsyncIterator[Env]:  # noqa: F811
    client = redis.asyncio.Redis.from_url(redis_url)
    ledger = Ledger(client)
    await apply_linked_budget(client, ledger, "100")
    environment = Env(client, ledger, stripe_double)
    try:
        yield environment
    finally:
        for gateway in environment.gateways:
            await gateway.close()
        await client.aclose()


async def test_usage_becomes_meter_events_once_and_the_ledger_is_trimmed(env: Env) -> None:
    ids = await env.usage(5)
    # A usage entry of zero cost: nothing to bill. (Written directly: Ledger.settle with
    # cost 0 currently fails in settle.lua, HINCRBY by -0; reported separately.)
    await env.redis.xadd(
        for_customer("acme").ledger, {"type": "usage", "request_id": "free-one", "cost": "0"}
    )
    lag = await export_lag_seconds(env.redis, "acme", now=time.time() + 10)
    assert lag >= 10
    exporter = env.exporter()
    results = await exporter.export_all()
    assert results["acme"].sent == 5 and results["acme"].skipped == 2  # the fund + zero cost
    assert sorted(env.double.meter_events) == ids
    event = env.double.meter_events["req0000"]
    assert event["event_name"] == "spendgate_usage"
    assert event["payload"] == {"stripe_customer_id": "cus_ACME", "value": "12345"}
    assert abs(int(event["timestamp"]) - time.time()) < 60
    posts = [r for r in env.double.requests if r.path == "/v1/billing/meter_events"]
    assert all(r.headers.get("Idempotency-Key", "").startswith("sg-meter") for r in posts)
    assert await export_lag_seconds(env.redis, "acme") == 0
    # Trimmed up to the cursor: only the last handled entry is left.
    assert await env.ledger_length() == 1
    assert (await exporter.export_all())["acme"].sent == 0
    assert len(env.double.meter_event_posts) == 5


async def test_meter_keys_and_minor_units_are_configurable(env: Env) -> None:
    await env.usage(2, cost=12_345)
    exporter = env.exporter(
        meter_event_name="gpu_spend",
        meter_customer_key="customer",
        meter_value_key="cents",
        meter_value_unit="minor",
    )
    await exporter.export_all()
    event = env.double.meter_events["req0001"]
    assert event["event_name"] == "gpu_spend"
    assert event["payload"] == {"customer": "cus_ACME", "cents": "2"}  # 1.2345 cents -> 2


async def test_429_and_500_are_retried_without_double_billing(env: Env) -> None:
    ids = await env.usage(4)
    env.double.fail("meter_events", 429, 500, 429)
    await env.exporter(export_concurrency=1).export_all()
    assert sorted(env.double.meter_event_posts) == ids  # each accepted exactly once
    statuses = [r.status for r in env.double.requests if r.path == "/v1/billing/meter_events"]
    assert statuses.count(429) == 2 and statuses.count(500) == 1


async def test_exporter_restart_neither_drops_nor_duplicates(env: Env) -> None:
    ids = await env.usage(6)
    # Stripe is down from the third event on, beyond the retry budget: the cursor stops
    # before it and nothing after it is attempted.
    first = env.exporter(export_concurrency=1, max_attempts=2)
    calls = {"n": 0}
    real_call = first.gateway.call

    async def flaky(op: Any, what: str = "") -> Any:
        calls["n"] += 1
        if calls["n"] >= 3:  # the 3rd event onwards: Stripe is down
            raise stripe.APIError("down", http_status=503)
        return await real_call(op, what)

    first.gateway.call = flaky  # type: ignore[method-assign]
    result = (await first.export_all())["acme"]
    assert result.sent == 2 and result.failed >= 1
    cursor = (await env.redis.hget(EXPORT_CURSORS, "acme")).decode()
    entries = await env.ledger.ledger_entries("acme")
    # Trimmed to the cursor (the last exported entry stays), nothing unexported removed.
    assert entries[0]["id"] == cursor and entries[0]["request_id"] == "req0001"
    assert [e["request_id"] for e in entries[1:]] == ids[2:]
    # The operator restarts: a new exporter continues from the cursor.
    await env.exporter().export_all()
    assert sorted(env.double.meter_event_posts) == ids  # none twice, none missing


async def test_crash_after_stripe_accepted_resends_what_stripe_deduplicates(env: Env) -> None:
    ids = await env.usage(3)

    class Crash(BaseException):
        pass

    first = env.exporter()
    real_hset = env.redis.hset

    async def crashing_hset(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == EXPORT_CURSORS:
            raise Crash()
        return await real_hset(name, *args, **kwargs)

    first.redis = type("R", (), {})()  # a proxy whose hset crashes
    for attr in ("hget", "xrange", "xtrim", "xadd", "hgetall"):
        setattr(first.redis, attr, getattr(env.redis, attr))
    first.redis.hset = crashing_hset
    with pytest.raises(Crash):
        await first.export_customer("acme")
    assert await env.redis.hget(EXPORT_CURSORS, "acme") is None
    await env.exporter().export_all()
    # Stripe saw each request twice with the same identifier and idempotency key, and keeps one.
    assert sorted(env.double.meter_event_posts) == sorted(ids * 2)
    assert sorted(env.double.meter_events) == ids
    keys = {}
    for r in env.double.requests:
        if r.path == "/v1/billing/meter_events":
            keys.setdefault(r.params["identifier"], set()).add(r.headers["Idempotency-Key"])
    assert all(len(v) == 1 for v in keys.values())


async def test_a_rejected_event_is_dead_lettered_and_does_not_block(env: Env) -> None:
    ids = await env.usage(3)
    env.double.rejected_identifiers.add("req0001")
    result = (await env.exporter().export_all())["acme"]
    assert result.sent == 2 and result.dead == 1
    assert sorted(env.double.meter_events) == ["req0000", "req0002"]
    dead = await env.redis.xrange(deadletter_key("acme"))
    assert len(dead) == 1 and dead[0][1][b"request_id"] == b"req0001"
    assert b"400" in dead[0][1][b"error"]
    assert [(c, r) for c, r, _, _ in env.events] == [("acme", "StripeUsageRejected")]
    assert await export_lag_seconds(env.redis, "acme") == 0
    assert ids


async def test_v2_meter_event_stream(env: Env) -> None:
    ids = await env.usage(150)
    env.double.rejected_identifiers.add("req0120")
    result = (await env.exporter(export_v2_stream=True, export_batch=200).export_all())["acme"]
    assert result.sent == 149 and result.dead == 1
    sessions = [r for r in env.double.requests if r.path == "/v2/billing/meter_event_session"]
    streams = [r for r in env.double.requests if r.path == "/v2/billing/meter_event_stream"]
    assert len(sessions) == 1
    assert all(len(r.params["events"]) <= 100 for r in streams)
    assert all(r.headers["Authorization"].startswith("Bearer ek_test_") for r in streams)
    # The batch with the bad event went event by event over v1, so only it is dead.
    assert set(env.double.meter_events) == set(ids) - {"req0120"}
    first = env.double.stream_events[0]
    assert first["timestamp"].endswith("Z") and first["payload"]["value"] == "12345"


async def test_rate_limit_paces_requests(env: Env) -> None:
    await env.usage(6)
    exporter = env.exporter(export_requests_per_s=20.0)
    started = time.monotonic()
    await exporter.export_all()
    assert time.monotonic() - started >= 5 / 20.0 - 0.02
    assert len(env.double.meter_events) == 6


async def test_retention_keeps_recent_entries(env: Env) -> None:
    await env.usage(3)
    await env.exporter(ledger_retention_s=3600).export_all()
    assert await env.ledger_length() == 4  # exported but younger than the retention window
    assert await export_lag_seconds(env.redis, "acme") == 0


async def test_export_totals_and_trimming_keep_the_audit_exact(env: Env) -> None:
    from spendgate.accounting.audit import audit_customer, exported_key, ledger_base_key

    await env.usage(3)
    env.double.rejected_identifiers.add("req0001")
    await env.exporter().export_all()
    totals = await env.redis.hgetall(exported_key("acme"))
    assert (totals[b"sent"], totals[b"rejected"]) == (b"24690", b"12345")
    assert int((await env.redis.hgetall(ledger_base_key("acme")))[b"entries"]) >= 3
    await env.usage(2, start=3)  # not exported yet: the audit reports the lag, no mismatch
    result = await audit_customer(env.redis, "acme", "USD", now_ms=int(time.time() * 1000) + 5000)
    assert result.ok, result.mismatches
    assert result.figures["stripe"]["exported"] == "0.02469"
    assert result.figures["stripe"]["lagSeconds"] >= 5
    await env.redis.hincrby(exported_key("acme"), "sent", -1)  # an export that went missing
    result = await audit_customer(env.redis, "acme", "USD", now_ms=int(time.time() * 1000))
    assert [m.check for m in result.mismatches] == ["stripe_export"]


async def test_a_trees_usage_goes_to_the_roots_customer_with_the_budget_as_dimension(
    env: Env,
) -> None:
    """Children's usage is billed once, to the root's Stripe customer, naming the child."""
    store = ConfigStore(env.redis, env.ledger)
    await apply_tree(
        store,
        tree_budget("team", "acme", mode="capped", limit="50.00", period="month"),
        tree_budget("proj", "team", mode="capped", limit="20.00", period="month"),
    )
    costs = {"acme": 1_000_001, "team": 20_002, "proj": 303}
    for customer, cost in costs.items():
        for i in range(2):
            rid = f"{customer}-{i}"
            held = await env.ledger.reserve(
                customer, rid, cost, key_id="main", currency="USD", ttl_ms=60_000
            )
            assert held.ok, held
            await env.ledger.settle(customer, rid, cost, key_id="main", usage=Usage(model="m"))
    results = await env.exporter().export_all()
    assert set(results) == {"acme"}  # only the root links a Stripe customer
    events = env.double.meter_events
    assert sorted(events) == sorted(f"{c}-{i}" for c in costs for i in range(2))
    assert all(e["payload"]["stripe_customer_id"] == "cus_ACME" for e in events.values())
    assert events["proj-0"]["payload"]["spendgate_budget"] == "proj"
    assert events["team-1"]["payload"]["spendgate_budget"] == "team"
    assert "spendgate_budget" not in events["acme-0"]["payload"]  # the root's own usage
    billed = sum(int(e["payload"]["value"]) for e in events.values())
    assert billed == (await env.ledger.account("acme")).charged == 2 * sum(costs.values())
    assert len(env.double.meter_event_posts) == 6
