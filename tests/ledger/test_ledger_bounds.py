"""Holds as bounds: reserving down to a minimum, settling never past the hold, refunds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from spendgate.ledger import Ledger, LedgerError, Outcome
from spendgate.models import CustomerBudgetSpec
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
CUSTOMER = "acme"
TTL = 60_000


@pytest_asyncio.fixture
async def ledger(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    channel = ledger_redis_target.script_channel()
    ledger = Ledger(ledger_redis, channel=channel)
    await ledger.load_scripts()
    yield ledger
    if channel is not None:
        await channel.close()


def spec(**fields: Any) -> CustomerBudgetSpec:
    return CustomerBudgetSpec.model_validate({"customerId": CUSTOMER, "currency": "USD", **fields})


async def reserve(ledger: Ledger, rid: str, amount: int, minimum: int | None = None) -> Any:
    return await ledger.reserve(
        CUSTOMER, rid, amount, minimum=minimum, key_id="default", currency="USD", ttl_ms=TTL
    )


async def test_reserve_holds_what_is_available_down_to_the_minimum(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="1"))
    first = await reserve(ledger, "r1", 3 * UNIT, minimum=100_000)
    assert first.ok and first.estimate == UNIT  # all there is
    refused = await reserve(ledger, "r2", 3 * UNIT, minimum=1)
    assert refused.outcome is Outcome.insufficient
    assert (refused.estimate, refused.available) == (1, 0)
    await ledger.release(CUSTOMER, "r1")
    exact = await reserve(ledger, "r3", 400_000, minimum=100_000)
    assert exact.estimate == 400_000  # enough money: the whole amount


async def test_reserve_clamps_to_the_spend_limit_and_the_cost_cap(ledger: Ledger) -> None:
    await ledger.configure(spec(mode="capped", limit="2", period="month"))
    assert (await reserve(ledger, "r1", 5 * UNIT, minimum=UNIT)).estimate == 2 * UNIT
    assert (await reserve(ledger, "r2", 5 * UNIT, minimum=1)).outcome is Outcome.cap_reached
    await ledger.configure(spec(balance="10", policy={"maxRequestCost": "0.50"}))
    assert (await reserve(ledger, "r3", 5 * UNIT, minimum=UNIT // 4)).estimate == UNIT // 2
    refused = await reserve(ledger, "r4", 5 * UNIT, minimum=UNIT)
    assert refused.outcome is Outcome.cost_cap


async def test_reserve_refuses_a_minimum_above_the_amount(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="minimum"):
        await reserve(ledger, "r1", 10, minimum=11)


async def test_release_gives_back_the_cost_limit(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "hour"}]))
    for i in range(5):
        assert (await reserve(ledger, f"free-{i}", 600_000)).ok
        await ledger.release(CUSTOMER, f"free-{i}")
    assert (await reserve(ledger, "paid", 900_000)).ok


async def test_cheaper_settle_gives_back_the_cost_limit(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "hour"}]))
    assert (await reserve(ledger, "r1", 900_000)).ok
    await ledger.settle(CUSTOMER, "r1", 100_000)
    assert (await reserve(ledger, "r2", 850_000)).ok


async def test_capped_settle_without_hold_stops_at_the_limit(ledger: Ledger) -> None:
    await ledger.configure(spec(mode="capped", limit="1", period="month"))
    settled = await ledger.settle(CUSTOMER, "unreserved", 3 * UNIT)
    assert (settled.charged, settled.absorbed, settled.spent) == (UNIT, 2 * UNIT, UNIT)
