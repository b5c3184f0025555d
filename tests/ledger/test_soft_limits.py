"""Soft limits in the reserve script: a throttle's rate limits apply at its level once its
threshold is reached, a downgrade makes the request its cheaper model's amounts, and the hard
cap stays exact under 500 concurrent requests with both active. On a single Redis (plain and
pipelined) and the 3-master Cluster."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger, Outcome, Reservation
from tests.support.budget_trees import apply_tree, concurrent_ledger, target_ledger, tree_budget
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z
ONE_PER_MINUTE = [{"requests": 1, "per": "minute"}]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def soft(action: str, **trigger: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"action": action, **trigger}
    if action == "throttle":
        entry["rateLimits"] = ONE_PER_MINUTE
    return entry


@pytest_asyncio.fixture
async def ledger(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    async with target_ledger(ledger_redis, ledger_redis_target, Clock()) as ledger:
        yield ledger


async def organisation(ledger: Ledger, org: list[Any], team: list[Any]) -> None:
    await apply_tree(
        ConfigStore(ledger.redis, ledger),
        tree_budget("org", balance="100.00", policy={"softLimits": org}),
        tree_budget(
            "team", "org", mode="capped", limit="10.00", period="month",
            policy={"softLimits": team},
        ),
    )  # fmt: skip


async def reserve(
    ledger: Ledger, rid: str, amount: int, *, downgrade: tuple[int, int] | None = None
) -> Reservation:
    return await ledger.reserve(
        "team", rid, amount, key_id="main", currency="USD", ttl_ms=60_000, downgrade=downgrade
    )


async def spend(ledger: Ledger, rid: str, amount: int) -> None:
    assert (await reserve(ledger, rid, amount)).ok
    await ledger.settle("team", rid, amount)


async def test_a_throttle_applies_once_its_threshold_is_reached(ledger: Ledger) -> None:
    await organisation(ledger, [], [soft("throttle", at=50)])
    for i in range(5):  # below 50 %: no rate limit at all
        assert (await reserve(ledger, f"free{i}", UNIT)).ok
    # 5.00 held = 50 % of the cap: from now on one request a minute
    assert (await reserve(ledger, "first", 1)).ok
    throttled = await reserve(ledger, "second", 1)
    assert throttled.outcome is Outcome.rate_limited
    assert throttled.level == "team" and (throttled.limit_id or "").startswith("s0:")
    for i in range(5):
        await ledger.release("team", f"free{i}")
    assert (await reserve(ledger, "third", 1)).ok  # back below the threshold: unthrottled


async def test_a_parent_throttle_slows_every_child(ledger: Ledger) -> None:
    await organisation(ledger, [soft("throttle", below="95.00")], [])
    await spend(ledger, "big", 6 * UNIT)  # org: 94.00 left, below 95.00
    assert (await reserve(ledger, "a", 1)).ok
    throttled = await reserve(ledger, "b", 1)
    assert (throttled.outcome, throttled.level) == (Outcome.rate_limited, "org")
    assert ledger.clock is not None
    ledger.clock.now += 60_000  # type: ignore[attr-defined]
    assert (await reserve(ledger, "c", 1)).ok


async def test_a_downgrade_holds_the_cheaper_models_amounts(ledger: Ledger) -> None:
    await organisation(ledger, [], [soft("downgrade", at=80)])
    cheap = (UNIT // 10, UNIT // 20)
    before = await reserve(ledger, "before", UNIT, downgrade=cheap)
    assert (before.estimate, before.downgraded) == (UNIT, "")
    await ledger.settle("team", "before", UNIT)
    await spend(ledger, "more", 7 * UNIT)  # 8.00 of 10.00: 80 %
    after = await reserve(ledger, "after", UNIT, downgrade=cheap)
    assert (after.estimate, after.downgraded) == (UNIT // 10, "team")
    assert (await ledger.account("team")).held == UNIT // 10
    plain = await reserve(ledger, "plain", UNIT)  # no cheaper model: held as asked
    assert (plain.estimate, plain.downgraded) == (UNIT, "")


async def test_a_parent_downgrade_names_the_parent(ledger: Ledger) -> None:
    await organisation(ledger, [soft("downgrade", below="99.50")], [])
    await spend(ledger, "x", UNIT)
    downgraded = await reserve(ledger, "y", UNIT, downgrade=(1_000, 1_000))
    assert (downgraded.estimate, downgraded.downgraded) == (1_000, "org")


async def test_the_hard_cap_still_refuses_a_downgraded_request(ledger: Ledger) -> None:
    await organisation(ledger, [], [soft("downgrade", at=50)])
    await spend(ledger, "x", 9_900_000)
    refused = await reserve(ledger, "y", UNIT, downgrade=(200_000, 150_000))
    assert (refused.outcome, refused.level) == (Outcome.cap_reached, "team")
    fits = await reserve(ledger, "z", UNIT, downgrade=(200_000, 50_000))
    assert (fits.estimate, fits.downgraded) == (100_000, "team")  # clamped to what is left


async def test_a_throttle_cost_limit_is_corrected_at_settle(ledger: Ledger) -> None:
    cost_limit = {"action": "throttle", "at": 10, "rateLimits": [{"cost": "2.00", "per": "day"}]}
    await organisation(ledger, [], [cost_limit])
    await spend(ledger, "x", UNIT)  # 10 %: the throttle counts cost from now on
    assert (await reserve(ledger, "a", 2 * UNIT)).ok  # the whole day's 2.00
    assert (await reserve(ledger, "b", 1)).outcome is Outcome.rate_limited
    await ledger.settle("team", "a", UNIT // 2)  # it cost less: 1.50 is given back
    assert (await reserve(ledger, "c", UNIT)).ok


async def test_500_concurrent_requests_with_soft_limits_at_every_level(
    ledger_redis_target: RedisTarget,
) -> None:
    async with concurrent_ledger(ledger_redis_target, 500, Clock()) as ledger:
        await race_with_soft_limits(ledger)


async def race_with_soft_limits(ledger: Ledger) -> None:
    await apply_tree(
        ConfigStore(ledger.redis, ledger),
        tree_budget("org", balance="30.00", policy={"softLimits": [soft("downgrade", below="20")]}),
        tree_budget(
            "team", "org", mode="capped", limit="12.00", period="day",
            policy={"softLimits": [
                {"action": "throttle", "at": 60, "rateLimits": [{"requests": 20, "per": "day"}]},
                soft("downgrade", at=75),
            ]},
        ),
        tree_budget("proj", "team", balance="6.00"),
    )  # fmt: skip
    rng = random.Random(7)
    nodes = ("org", "team", "proj")
    plans = [(nodes[i % 3], rng.randrange(50_000, 300_000)) for i in range(500)]
    start = asyncio.Event()

    async def one(i: int) -> Reservation:
        node, bound = plans[i]
        await start.wait()
        got = await ledger.reserve(
            node, f"r{i}", bound, key_id="main", currency="USD", ttl_ms=60_000,
            minimum=bound // 4, downgrade=(bound // 3, bound // 6),
        )  # fmt: skip
        if got.ok:
            await ledger.settle(node, f"r{i}", got.estimate * (1 + i % 2) // 2 + i % 3)
        return got

    tasks = [asyncio.ensure_future(one(i)) for i in range(500)]
    start.set()
    results = await asyncio.gather(*tasks)
    outcomes = {r.outcome for r in results}
    assert outcomes <= {Outcome.reserved, Outcome.rate_limited, Outcome.cap_reached,
                        Outcome.insufficient}  # fmt: skip
    assert Outcome.rate_limited in outcomes and {r.downgraded for r in results} > {""}
    accounts = {node: await ledger.account(node) for node in nodes}
    assert all(account.held == 0 for account in accounts.values())
    assert accounts["team"].spent <= 12 * UNIT
    assert accounts["org"].balance >= 0 and accounts["proj"].balance >= 0
    own = {node: 0 for node in nodes}
    for node in nodes:
        for entry in await ledger.ledger_entries(node, 10_000):
            if entry["type"] == "usage" and entry.get("budget", node) == node:
                own[node] += int(entry["cost"])
    assert accounts["proj"].charged == own["proj"]
    assert accounts["team"].charged == own["team"] + accounts["proj"].charged
    assert accounts["org"].charged == own["org"] + accounts["team"].charged
    assert accounts["org"].balance == 30 * UNIT - accounts["org"].charged
