"""Per-key spend caps (``apiKeys[].limit``/``period``): checked in the same script as the
budget's levels, charged at settle, freed with the hold, rolled over with the key's period;
and two sidecars (two ledgers, each with its own connections) sharing a capped key never pass
it. On a single Redis and the 3-master Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger, Outcome
from tests.support.budget_trees import apply_tree, target_ledger, tree_budget
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z
DAY = 86_400_000
CI_KEY = {"name": "ci", "secretRef": {"name": "ci-keys"}, "limit": "5.00", "period": "day"}
MAIN_KEY = {"name": "main", "secretRef": {"name": "main-keys"}}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest_asyncio.fixture
async def capped(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    async with target_ledger(ledger_redis, ledger_redis_target, Clock()) as ledger:
        await apply_tree(
            ConfigStore(ledger_redis, ledger),
            tree_budget("org", balance="100.00"),
            tree_budget(
                "team",
                "org",
                mode="capped",
                limit="50.00",
                period="month",
                apiKeys=[MAIN_KEY, CI_KEY],
            ),
        )
        yield ledger


async def reserve(ledger: Ledger, rid: str, amount: int, key: str = "ci", **kw: Any):
    return await ledger.reserve(
        "team", rid, amount, key_id=key, currency="USD", ttl_ms=60_000, **kw
    )


async def test_a_key_cap_holds_settles_and_rolls_over(capped: Ledger) -> None:
    assert (await reserve(capped, "a", 4 * UNIT)).ok
    refused = await reserve(capped, "b", 2 * UNIT)
    assert (refused.outcome, refused.level, refused.available) == (
        Outcome.cap_reached, "key", UNIT
    )  # fmt: skip
    assert (await reserve(capped, "b", 2 * UNIT, key="main")).ok  # other keys are not capped
    await capped.settle("team", "a", 3 * UNIT)
    assert (await reserve(capped, "c", 2 * UNIT)).ok  # 3.00 spent + 2.00 held = the cap
    assert not (await reserve(capped, "d", 1)).ok
    assert await capped.release("team", "c") == 2 * UNIT
    grown = await capped.extend("team", "b", UNIT, ttl_ms=60_000)  # main's hold: not capped
    assert grown.ok
    assert (await reserve(capped, "e", 2 * UNIT)).ok
    assert not (await capped.extend("team", "e", 1, ttl_ms=60_000)).ok  # the key's cap
    await capped.release("team", "e")
    assert capped.clock is not None
    capped.clock.now += DAY  # type: ignore[attr-defined]
    assert (await reserve(capped, "f", 5 * UNIT)).ok  # a new day: the cap again in full
    late = await capped.settle("team", "f", 6 * UNIT)
    assert (late.charged, late.absorbed) == (5 * UNIT, UNIT)


async def test_a_settle_without_hold_stays_within_the_key_cap(capped: Ledger) -> None:
    settled = await capped.settle("team", "served-open", 7 * UNIT, key_id="ci")
    assert (settled.charged, settled.absorbed) == (5 * UNIT, 2 * UNIT)
    assert (await capped.account("org")).charged == 5 * UNIT


async def test_two_sidecars_sharing_a_capped_key_never_pass_it(
    capped: Ledger, ledger_redis_target: RedisTarget
) -> None:
    sidecars = []
    for _ in range(2):
        client = ledger_redis_target.async_client()
        sidecars.append((Ledger(client, clock=capped.clock), client))
    cost = 130_000  # 5.00 / 0.13: 38 requests fit, with 0.06 left

    async def one(i: int) -> bool:
        ledger = sidecars[i % 2][0]
        reservation = await ledger.reserve(
            "team", f"s{i}", cost, key_id="ci", currency="USD", ttl_ms=60_000
        )
        if reservation.ok:
            await ledger.settle("team", f"s{i}", cost)
        return reservation.ok

    admitted = await asyncio.gather(*(one(i) for i in range(90)))
    for _, client in sidecars:
        await client.aclose()
    assert sum(admitted) == 38
    account = await capped.account("team")
    assert (account.charged, account.held) == (38 * cost, 0)
    spent = await capped.redis.hget((await capped.keys_of("team")).acct, "k:ci:spent")
    assert int(spent) == 38 * cost <= 5 * UNIT
