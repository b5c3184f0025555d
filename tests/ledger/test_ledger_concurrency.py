"""The ledger under concurrency: hundreds of coroutines racing on one customer, on a single
Redis and on the 3-master Redis Cluster. The Lua scripts are the only thing that makes these
exact; a read-modify-write in Python would overspend here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import redis.asyncio.cluster

from spendgate.ledger import Ledger, Outcome, Reservation, Settlement
from spendgate.models import CustomerBudgetSpec
from spendgate.money import format_amount
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
CUSTOMER = "racer"
CONCURRENCY = 500
T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z


def spec(**fields: Any) -> CustomerBudgetSpec:
    return CustomerBudgetSpec.model_validate({"customerId": CUSTOMER, "currency": "USD", **fields})


@pytest_asyncio.fixture
async def big_pool_ledger(ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    """A ledger whose client has a connection for every racing coroutine (redis-py's default
    pool of 100 would refuse the rest with 'Too many connections')."""
    client: Any
    if ledger_redis_target.cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(
            ledger_redis_target.url, max_connections=CONCURRENCY + 10
        )
    else:
        client = redis.asyncio.Redis.from_url(
            ledger_redis_target.url, max_connections=CONCURRENCY + 10
        )
    channel = ledger_redis_target.script_channel()
    ledger = Ledger(client, clock=lambda: T0, channel=channel)
    await ledger.load_scripts()
    yield ledger
    if channel is not None:
        await channel.close()
    await client.aclose()


async def race(count: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Start ``count`` coroutines together and gather them (any exception fails the test)."""
    start = asyncio.Event()

    async def one(i: int) -> Any:
        await start.wait()
        return await make(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    await asyncio.sleep(0)
    start.set()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize(("mode", "k"), [("prepaid", 37), ("capped", 23)])
async def test_exactly_k_of_500_reserve_and_settle(
    big_pool_ledger: Ledger, mode: str, k: int
) -> None:
    ledger = big_pool_ledger
    cost = 250_000
    if mode == "prepaid":
        await ledger.configure(spec(balance=format_amount(k * cost)))
    else:
        await ledger.configure(spec(mode="capped", limit=format_amount(k * cost), period="day"))

    async def request(i: int) -> tuple[Reservation, Settlement | None]:
        reservation = await ledger.reserve(
            CUSTOMER, f"req-{i}", cost, key_id="k", currency="USD", ttl_ms=60_000
        )
        if not reservation.ok:
            return reservation, None
        await asyncio.sleep(0)
        return reservation, await ledger.settle(CUSTOMER, f"req-{i}", cost)

    results = await race(CONCURRENCY, request)
    reserved = [r for r, _ in results if r.ok]
    refused = {r.outcome for r, _ in results if not r.ok}
    assert len(reserved) == k
    expected = Outcome.insufficient if mode == "prepaid" else Outcome.cap_reached
    assert refused == {expected}
    # No reservation ever promised money that was not there...
    assert all(r.available is not None and r.available >= 0 for r in reserved)
    settlements = [s for _, s in results if s is not None]
    assert len(settlements) == k and not any(s.duplicate for s in settlements)
    account = await ledger.account(CUSTOMER)
    if mode == "prepaid":
        # ...and no settle took the balance below zero.
        assert all(s.balance is not None and s.balance >= 0 for s in settlements)
        assert account.balance == 0
    else:
        assert all(s.spent is not None and s.spent <= k * cost for s in settlements)
        assert account.spent == k * cost
    assert (account.held, account.charged) == (0, k * cost)
    assert await ledger.holds(CUSTOMER) == {}
    usage = [e for e in await ledger.ledger_entries(CUSTOMER, 1000) if e["type"] == "usage"]
    assert len(usage) == k


async def test_concurrent_reserves_never_exceed_available(big_pool_ledger: Ledger) -> None:
    """Reservations alone (no settles): the sum held is exactly what the balance pays for."""
    ledger = big_pool_ledger
    await ledger.configure(spec(balance="10"))
    amounts = [(i % 7 + 1) * 10_000 for i in range(CONCURRENCY)]

    results = await race(
        CONCURRENCY,
        lambda i: ledger.reserve(
            CUSTOMER, f"r-{i}", amounts[i], key_id="k", currency="USD", ttl_ms=60_000
        ),
    )
    held = sum(amounts[i] for i, r in enumerate(results) if r.ok)
    account = await ledger.account(CUSTOMER)
    assert account.held == held <= 10 * UNIT
    assert account.available >= 0
    assert sum((await ledger.holds(CUSTOMER)).values()) == held
    # Whatever was refused really did not fit at the end.
    smallest_refused = min(amounts[i] for i, r in enumerate(results) if not r.ok)
    assert smallest_refused > account.available


async def test_exact_rate_limit_under_concurrency(big_pool_ledger: Ledger) -> None:
    ledger = big_pool_ledger
    await ledger.configure(spec(balance="1000", rateLimits=[{"requests": 100, "per": "minute"}]))
    results = await race(
        CONCURRENCY,
        lambda i: ledger.reserve(CUSTOMER, f"r-{i}", 1, key_id="k", currency="USD", ttl_ms=60_000),
    )
    outcomes = [r.outcome for r in results]
    assert outcomes.count(Outcome.reserved) == 100
    assert outcomes.count(Outcome.rate_limited) == CONCURRENCY - 100
    assert (await ledger.account(CUSTOMER)).held == 100


async def test_concurrent_replays_have_one_effect(big_pool_ledger: Ledger) -> None:
    ledger = big_pool_ledger
    await ledger.configure(spec(balance="10"))
    await ledger.reserve(CUSTOMER, "once", UNIT, key_id="k", currency="USD", ttl_ms=60_000)

    settles = await race(100, lambda i: ledger.settle(CUSTOMER, "once", UNIT))
    funds = await race(100, lambda i: ledger.fund(CUSTOMER, "in_once", 5 * UNIT))
    reserves = await race(
        100,
        lambda i: ledger.reserve(
            CUSTOMER, "twice", UNIT, key_id="k", currency="USD", ttl_ms=60_000
        ),
    )
    assert sum(not s.duplicate for s in settles) == 1
    assert sum(not f.duplicate for f in funds) == 1
    assert all(r.ok for r in reserves)
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held) == (14 * UNIT, UNIT)
    types = [e["type"] for e in await ledger.ledger_entries(CUSTOMER, 1000)]
    assert types.count("usage") == 1 and types.count("fund") == 1
