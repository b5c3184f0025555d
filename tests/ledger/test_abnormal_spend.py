"""The abnormal-spend policy on simulated weeks of traffic, the clock driven by the test:
no false trip on a steady (diurnal) customer, a trip within minutes on a leaked-key burst,
small customers below the minimum never trip, and a resume counts only later spend."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from spendgate.accounting import abnormal
from spendgate.accounting.abnormal import HOUR_MS, MINUTE_MS, AbnormalPolicy, Action, evaluate
from spendgate.accounting.audit import audit_customer, trim_ledger
from spendgate.accounting.entries import last_id
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from tests.support.accounting_data import Clock, budget, client_for

UNIT = 1_000_000
DAY_MS = 24 * HOUR_MS
START = (10**12 // DAY_MS) * DAY_MS  # 2001-09-09, a midnight UTC: far in the past
POLICY = AbnormalPolicy(action=Action.suspend, minimum=5 * UNIT)


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False


class World:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.clock = Clock(START)
        self.ledger = Ledger(client, clock=self.clock)
        self.n = 0

    async def spend(self, customer: str, cost: int, key: str = "prod") -> None:
        self.n += 1
        await self.ledger.settle(customer, f"r{self.n}", cost, key_id=key)


@pytest_asyncio.fixture
async def world(target: tuple[str, bool]) -> AsyncIterator[World]:
    client = client_for(*target)
    w = World(client)
    await w.ledger.load_scripts()
    for customer, balance in (("steady", "100000.00"), ("small", "100.00")):
        await w.ledger.configure(budget(customer, balance))
    yield w
    await client.aclose()


def hourly_cost(hour_of_day: int, rng: random.Random) -> int:
    """A diurnal customer: ten times busier from 08:00 to 20:00 than at night, +-30 %."""
    base = 4 * UNIT if 8 <= hour_of_day < 20 else 400_000
    return int(base * rng.uniform(0.7, 1.3))


async def simulate_steady_week(world: World, days: int, rng: random.Random) -> list[Any]:
    """Spend in 5-minute steps; evaluate every 10 minutes after the first week."""
    verdicts = []
    for step in range(days * 24 * 12):
        now = world.clock.advance(5 * MINUTE_MS)
        hour = (now % DAY_MS) // HOUR_MS
        await world.spend("steady", hourly_cost(hour, rng) // 12)
        if now - START > 7 * DAY_MS and step % 2 == 0:
            verdict, _ = await abnormal.check(world.client, "steady", POLICY, now)
            verdicts.append(verdict)
    return verdicts


async def test_steady_customer_never_trips_and_a_leaked_key_trips_within_minutes(
    world: World,
) -> None:
    rng = random.Random(7)
    verdicts = await simulate_steady_week(world, 9, rng)
    assert verdicts and not any(v.tripped for v in verdicts)
    assert all(v.baseline is not None for v in verdicts)
    # A leaked key: 2.00 a minute on top of the normal traffic, starting now.
    started = world.clock.now
    tripped_at = None
    for _minute in range(30):
        now = world.clock.advance(MINUTE_MS)
        await world.spend("steady", 2 * UNIT, key="leaked")
        verdict, _ = await abnormal.check(world.client, "steady", POLICY, now)
        if verdict.tripped:
            tripped_at = now
            break
    assert tripped_at is not None
    assert tripped_at - started <= 15 * MINUTE_MS
    assert "baseline" in verdict.describe("USD")


async def test_small_customer_below_minimum_never_trips(world: World) -> None:
    for _ in range(8 * 24):
        world.clock.advance(HOUR_MS)
        await world.spend("small", 1_000)  # 0.001 an hour
    for _ in range(30):  # 100 times its normal, still below the 5.00 minimum
        now = world.clock.advance(MINUTE_MS)
        await world.spend("small", 100_000)
        verdict, _ = await abnormal.check(world.client, "small", POLICY, now)
        assert not verdict.tripped
    assert verdict.recent == 3 * UNIT + 1_000  # and the last hourly request


async def test_no_baseline_no_trip(world: World) -> None:
    now = world.clock.advance(MINUTE_MS)
    await world.spend("steady", 500 * UNIT)
    verdict, _ = await abnormal.check(world.client, "steady", POLICY, now)
    assert not verdict.tripped and verdict.baseline is None
    assert "no baseline yet" in verdict.describe(None)


async def test_resume_counts_only_later_spend(world: World) -> None:
    for _ in range(8 * 24):
        world.clock.advance(HOUR_MS)
        await world.spend("steady", UNIT)
    now = world.clock.advance(MINUTE_MS)
    await world.spend("steady", 50 * UNIT)
    verdict, _ = await abnormal.check(world.client, "steady", POLICY, now)
    assert verdict.tripped
    await abnormal.suspend(world.client, "steady", verdict.describe("USD"), now)
    assert await abnormal.is_suspended(world.client, "steady")
    assert await abnormal.resume(world.client, "steady", world.clock.advance(MINUTE_MS))
    assert await abnormal.is_suspended(world.client, "steady") is None
    verdict, state = await abnormal.check(world.client, "steady", POLICY, world.clock.now)
    assert not verdict.tripped and "resumed_ms" in state
    for _ in range(3):  # the abuse goes on: it trips again
        now = world.clock.advance(MINUTE_MS)
        await world.spend("steady", 20 * UNIT)
    verdict, _ = await abnormal.check(world.client, "steady", POLICY, now)
    assert verdict.tripped


async def test_trimming_keeps_what_the_rollup_has_not_read(world: World) -> None:
    for _ in range(3):
        world.clock.advance(MINUTE_MS)
        await world.spend("steady", UNIT)
    await abnormal.roll_up(world.client, "steady", POLICY, world.clock.now)
    world.clock.advance(MINUTE_MS)
    await world.spend("steady", 7 * UNIT)  # not rolled up yet
    ms, seq = (await last_id(world.client, "steady")).split("-")
    await trim_ledger(world.client, "steady", f"{ms}-{int(seq) + 1}")  # all it may
    remaining = await world.client.xrange(for_customer("steady").ledger)
    assert [f[b"cost"] for _, f in remaining] == [b"7000000"]
    verdict, _ = await abnormal.check(world.client, "steady", POLICY, world.clock.now)
    assert verdict.recent == 10 * UNIT
    assert (await audit_customer(world.client, "steady", "USD", now_ms=world.clock.now)).ok


def test_evaluate_window_and_percentile() -> None:
    now = 100 * DAY_MS + 30 * MINUTE_MS
    hours = {100 * DAY_MS - (i + 2) * HOUR_MS: (i % 10 + 1) * UNIT for i in range(100)}
    policy = AbnormalPolicy(minimum=UNIT, factor=2, percentile=50, min_active_hours=10)
    minutes = {now - 61 * MINUTE_MS: 100 * UNIT, now - 10 * MINUTE_MS: 9 * UNIT}
    verdict = evaluate(policy, minutes, hours, now)
    assert verdict.recent == 9 * UNIT  # the older minute is outside the hour
    assert verdict.baseline == 5 * UNIT and verdict.threshold == 10 * UNIT
    assert not verdict.tripped
    assert evaluate(policy, {now: 11 * UNIT}, hours, now).tripped
    p90 = AbnormalPolicy(minimum=UNIT, factor=2, min_active_hours=10)
    assert evaluate(p90, {now: 11 * UNIT}, hours, now).baseline == 9 * UNIT
