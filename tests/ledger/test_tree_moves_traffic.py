"""Re-parenting under traffic, on a single Redis and the 3-master Cluster: a few hundred
concurrent reserve/settle/release calls from keys of the moved subtree and of its old and new
parents (through a Ledger whose cached tree goes stale, as a sidecar's does) while the
operator's ConfigStore moves ``proj`` (with ``proj-x`` below it) inside its tree, to another
tree and back, and then moves ``team-a`` with its subtree to the other organisation.

Afterwards no level is below zero or past its cap, no hold is left, every level's ledger adds up
to its charged total, and the roots together charged exactly what the settles charged.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from spendgate.accounting.audit import audit_customer
from spendgate.config_store import ConfigStore, TreeConflict
from spendgate.ledger import Ledger, LedgerError
from tests.support.budget_trees import apply_tree, tree_budget
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
T0 = 1_710_331_200_000
WORKERS = 8
REQUESTS_PER_WORKER = 40  # 320 requests
PREPAID = {"org": 100 * UNIT, "proj": 10 * UNIT, "other": 50 * UNIT}
LIMITS = {"team-a": 30 * UNIT, "team-b": 20 * UNIT, "dept": 40 * UNIT, "proj-x": 5 * UNIT}
CUSTOMERS = ("proj", "proj-x", "team-a", "team-b", "org", "dept", "other")


def proj(parent: str) -> Any:
    return tree_budget("proj", parent, balance="10.00")


def team_a(parent: str) -> Any:
    return tree_budget("team-a", parent, mode="capped", limit="30.00", period="month")


ORGS = [
    tree_budget("org", balance="100.00"),
    team_a("org"),
    proj("team-a"),
    tree_budget("proj-x", "proj", mode="capped", limit="5.00", period="day"),
    tree_budget("team-b", "org", mode="capped", limit="20.00", period="day"),
    tree_budget("other", balance="50.00"),
    tree_budget("dept", "other", mode="capped", limit="40.00", period="month"),
]
MOVES = [proj("team-b"), proj("dept"), proj("team-a"), team_a("other")]


@pytest_asyncio.fixture
async def ledgers(
    ledger_redis: Any, ledger_redis_target: RedisTarget
) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """The operator's ledger (applies and moves) and a sidecar's (serves requests)."""
    channel = ledger_redis_target.script_channel()
    operator = Ledger(ledger_redis, clock=lambda: T0)
    sidecar = Ledger(ledger_redis, clock=lambda: T0, channel=channel)
    await sidecar.load_scripts()
    await apply_tree(ConfigStore(ledger_redis, operator), *ORGS)
    yield operator, sidecar
    if channel is not None:
        await channel.close()


async def _final(call: Any) -> Any:
    """A settle or release is retried until it lands (a sidecar journals and replays it)."""
    for _ in range(50):
        try:
            return await call()
        except LedgerError:
            await asyncio.sleep(0.01)
    raise AssertionError("a settle never landed")


async def test_moves_under_traffic_lose_no_money(ledgers: tuple[Ledger, Ledger]) -> None:
    operator, sidecar = ledgers
    store = ConfigStore(operator.redis, operator)
    charged: list[int] = []
    outcomes: dict[str, int] = {}
    moving, moved = asyncio.Event(), asyncio.Event()
    during: list[str] = []  # requests answered while the moves ran

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(REQUESTS_PER_WORKER):
            customer, rid = rng.choice(CUSTOMERS), f"w{seed}-{n}"
            amount = rng.randrange(10_000, 600_000)
            try:
                held = await sidecar.reserve(
                    customer, rid, amount, key_id="main", currency="USD", ttl_ms=600_000
                )
            except LedgerError:
                outcomes["error"] = outcomes.get("error", 0) + 1
                continue
            outcomes[held.outcome.value] = outcomes.get(held.outcome.value, 0) + 1
            if moving.is_set() and not moved.is_set():
                during.append(customer)
            if not held.ok:
                continue
            await asyncio.sleep(rng.random() * 0.003)
            if rng.random() < 0.2:
                await _final(lambda c=customer, r=rid: sidecar.release(c, r))
                continue
            cost = rng.randrange(0, held.estimate + 1)
            settled = await _final(lambda c=customer, r=rid, x=cost: sidecar.settle(c, r, x))
            assert (settled.charged, settled.absorbed) == (cost, 0)
            charged.append(settled.charged)
            moving.set()

    async def mover() -> int:
        await moving.wait()
        done = 0
        for budget in MOVES:
            for _ in range(100):
                try:
                    await apply_tree(store, budget)
                    done += 1
                    break
                except TreeConflict as error:  # the new parent is full of holds: retry
                    assert "holds in flight" in str(error)
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.01)
        moved.set()
        return done

    results = await asyncio.gather(mover(), *(worker(seed) for seed in range(WORKERS)))
    assert results[0] == len(MOVES)
    assert outcomes.get("ok", 0) > 100, outcomes
    assert len(during) > 50 and set(during) == set(CUSTOMERS), (len(during), outcomes)
    assert await operator.tree.ancestors("proj-x", fresh=True) == ("proj", "team-a", "other")

    totals = {}
    for customer in CUSTOMERS:
        account = await operator.account(customer)
        assert account.held == 0 and await operator.holds(customer) == {}, customer
        assert account.absorbed == 0, customer
        if customer in PREPAID:
            assert account.balance == PREPAID[customer] - account.charged >= 0, customer
        else:
            assert account.spent <= LIMITS[customer], customer
        entries = await operator.ledger_entries(customer, count=10_000)
        assert account.charged == sum(int(e["cost"]) for e in entries if e["type"] == "usage")
        totals[customer] = account.charged
        audit = await audit_customer(operator.redis, customer, "USD", now_ms=T0)
        assert audit.ok, audit.to_json()  # spendgate audit: every level adds up where it is
    assert totals["org"] + totals["other"] == sum(charged)
