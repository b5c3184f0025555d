"""A three-level tree under 500 concurrent requests from keys at every level, on a single Redis
and the 3-master Cluster; and random operation sequences (Hypothesis) on one tree.

After everything: no level below zero (prepaid) or past its cap (capped), every level's held =
the sum of its holds, and each level's charged = its own requests' + its children's charged,
to the micro-unit.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import redis.asyncio.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger, Outcome
from tests.support.budget_trees import apply_tree, concurrent_ledger, tree_budget
from tests.support.redis_servers import RedisServer, RedisTarget

CONCURRENCY = 500
T0 = 1_710_331_200_000
UNIT = 1_000_000
# child -> parent; org is prepaid, the teams capped, the projects prepaid allocations or capped
PARENTS = {"team-a": "org", "team-b": "org", "proj-a1": "team-a", "proj-b1": "team-b"}
NODES = ("org", "team-a", "team-b", "proj-a1", "proj-b1")


def organisation() -> list[Any]:
    return [
        tree_budget("org", balance="40.00"),
        tree_budget("team-a", "org", mode="capped", limit="25.00", period="month"),
        tree_budget("team-b", "org", mode="capped", limit="12.00", period="day"),
        tree_budget("proj-a1", "team-a", balance="9.00"),
        tree_budget("proj-b1", "team-b", mode="capped", limit="7.00", period="day"),
    ]


LIMITS = {"team-a": 25 * UNIT, "team-b": 12 * UNIT, "proj-b1": 7 * UNIT}


async def check_tree(ledger: Ledger) -> dict[str, int]:
    """The invariants; returns charged per level."""
    accounts = {node: await ledger.account(node) for node in NODES}
    for node, account in accounts.items():
        assert account.held == sum((await ledger.holds(node)).values()), node
        if node in LIMITS:
            assert account.spent + account.held <= LIMITS[node], node
        else:
            assert account.balance - account.held >= 0, node
            assert account.balance >= 0, node
    own: dict[str, int] = {node: 0 for node in NODES}
    for node in NODES:
        for entry in await ledger.ledger_entries(node, 100_000):
            if entry["type"] == "usage" and entry.get("budget", node) == node:
                own[node] += int(entry["cost"])
    for node in NODES:
        children = [child for child, parent in PARENTS.items() if parent == node]
        expected = own[node] + sum(accounts[child].charged for child in children)
        assert accounts[node].charged == expected, node
    return {node: account.charged for node, account in accounts.items()}


@pytest_asyncio.fixture
async def big_ledger(ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    async with concurrent_ledger(ledger_redis_target, CONCURRENCY, lambda: T0) as ledger:
        await apply_tree(ConfigStore(ledger.redis, ledger), *organisation())
        yield ledger


async def test_500_concurrent_requests_at_every_level(big_ledger: Ledger) -> None:
    ledger = big_ledger
    rng = random.Random(12)
    plans = [(NODES[i % len(NODES)], rng.randrange(50_000, 400_000)) for i in range(CONCURRENCY)]
    start = asyncio.Event()

    async def one(i: int) -> Outcome:
        node, bound = plans[i]
        await start.wait()
        reservation = await ledger.reserve(
            node, f"r{i}", bound, key_id="main", currency="USD", ttl_ms=60_000, minimum=bound // 4
        )
        if not reservation.ok:
            return reservation.outcome
        await asyncio.sleep(0)
        if i % 7 == 0:
            await ledger.release(node, f"r{i}")
        elif i % 5 == 0:  # reports more than it held: absorbed at every level
            await ledger.settle(node, f"r{i}", reservation.estimate + 1_000)
        else:
            await ledger.settle(node, f"r{i}", reservation.estimate * 3 // 4)
        return reservation.outcome

    tasks = [asyncio.ensure_future(one(i)) for i in range(CONCURRENCY)]
    await asyncio.sleep(0)
    start.set()
    outcomes = await asyncio.gather(*tasks)
    refused = {o for o in outcomes if o is not Outcome.reserved}
    assert refused <= {Outcome.insufficient, Outcome.cap_reached}
    assert refused, "the tree's money ran out during the race"
    charged = await check_tree(ledger)
    assert charged["org"] > 10 * UNIT  # real money moved at every level
    assert (await ledger.account("org")).held == 0


@pytest.fixture(scope="module")
def property_server() -> Any:
    server = RedisServer()
    server.start()
    yield server
    server.close()


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(("reserve", "settle", "release", "extend", "expire")),
        st.sampled_from(NODES),
        st.integers(min_value=0, max_value=30),  # request slot
        st.integers(min_value=0, max_value=15 * UNIT),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_random_operations_keep_every_level_exact(
    property_server: RedisServer, operations: list[tuple[str, str, int, int]]
) -> None:
    property_server.flushall()

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(property_server.url)
        now = [T0]
        ledger = Ledger(client, clock=lambda: now[0])
        await apply_tree(ConfigStore(client, ledger), *organisation())
        owner: dict[int, str] = {}
        for op, node, slot, amount in operations:
            rid = f"q{slot}"
            node = owner.setdefault(slot, node)  # a request id belongs to one budget
            if op == "reserve":
                await ledger.reserve(
                    node, rid, amount, key_id="main", currency="USD", ttl_ms=1_000,
                    minimum=amount // 2,
                )  # fmt: skip
            elif op == "settle":
                await ledger.settle(node, rid, amount)
            elif op == "release":
                await ledger.release(node, rid)
            elif op == "extend" and amount > 0:
                await ledger.extend(node, rid, amount, ttl_ms=1_000)
            elif op == "expire":
                now[0] += 1_001
                await ledger.sweep(node)
            await check_tree(ledger)
        await client.aclose()

    asyncio.run(run())
