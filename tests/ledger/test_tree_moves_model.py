"""Random sequences of requests (reserve, extend, settle, release) from every level and moves of
``proj`` (with ``proj-x`` below it) between team-a, team-b, another organisation and no parent,
checked after every step against an exact model (Hypothesis, single Redis): each level's held
is the holds in flight whose budget is below it now, its charged what was settled while the
budget was below it; no prepaid level below zero, no capped level past its cap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.config_store import ConfigStore, TreeConflict
from spendgate.keys import TREE, decode_ancestors
from spendgate.ledger import Ledger
from tests.support.budget_trees import apply_tree, tree_budget
from tests.support.redis_servers import RedisServer

UNIT = 1_000_000
T0 = 1_710_331_200_000
PARENTS: dict[str, str | None] = {
    "org": None,
    "team-a": "org",
    "team-b": "org",
    "proj": "team-a",
    "proj-x": "proj",
    "other": None,
    "dept": "other",
}
PREPAID = {"org": 30 * UNIT, "proj": 10 * UNIT, "other": 20 * UNIT}
LIMITS = {"team-a": 15 * UNIT, "team-b": 8 * UNIT, "proj-x": 6 * UNIT, "dept": 12 * UNIT}
NODES = tuple(PARENTS)
PLACES = ("team-a", "team-b", "dept", None)


def budget(name: str, parent: str | None) -> Any:
    if name in PREPAID:
        return tree_budget(name, parent, balance=str(PREPAID[name] // UNIT))
    return tree_budget(name, parent, mode="capped", limit=str(LIMITS[name] // UNIT), period="month")


def path(parents: dict[str, str | None], node: str) -> list[str]:
    levels = [node]
    while (parent := parents[levels[-1]]) is not None:
        levels.append(parent)
    return levels


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(("reserve", "extend")),
            st.sampled_from(("proj", "proj-x", *NODES)),  # the moved subtree more often
            st.integers(0, 12),
            st.integers(1, 6 * UNIT),
        ),
        st.tuples(
            st.sampled_from(("settle", "release")),
            st.just(""),
            st.integers(0, 12),
            st.integers(0, 100),
        ),
        st.tuples(st.just("move"), st.sampled_from(PLACES), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@pytest.fixture(scope="module")
def model_server() -> Any:
    server = RedisServer()
    server.start()
    yield server
    server.close()


async def check(ledger: Ledger, parents: dict, holds: dict, charged: dict) -> None:
    for node in NODES:
        account = await ledger.account(node)
        below = [a for origin, a in holds.values() if node in path(parents, origin)]
        assert (account.held, account.charged, account.spent) == (
            sum(below),
            charged[node],
            charged[node],
        ), node
        assert account.held == sum((await ledger.holds(node)).values()), node
        if node in PREPAID:
            assert account.balance == PREPAID[node] - charged[node]
            assert account.balance - account.held >= 0, node
        else:
            assert account.spent + account.held <= LIMITS[node], node
    for node in NODES:
        recorded = decode_ancestors(await ledger.redis.hget(TREE, node))
        assert recorded == tuple(path(parents, node)[1:]), node


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_moves_and_requests_match_the_model(
    model_server: RedisServer, operations: list[tuple[str, Any, int, int]]
) -> None:
    model_server.flushall()

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(model_server.url)
        operator = Ledger(client, clock=lambda: T0)
        sidecar = Ledger(client, clock=lambda: T0)  # its cached tree goes stale
        store = ConfigStore(client, operator)
        parents = dict(PARENTS)
        await apply_tree(store, *(budget(n, p) for n, p in parents.items()))
        holds: dict[str, tuple[str, int]] = {}  # request id -> (its budget, amount held)
        done: set[str] = set()
        owners: dict[str, str] = {}
        charged = dict.fromkeys(NODES, 0)
        for op, arg, slot, amount in operations:
            rid = f"q{slot}"
            if op == "move":
                try:
                    await apply_tree(store, budget("proj", arg))
                except TreeConflict as error:
                    assert "holds in flight" in str(error)
                else:
                    parents["proj"] = arg
            elif op == "reserve" and rid not in owners:
                owners[rid] = arg
                held = await sidecar.reserve(
                    arg, rid, amount, key_id="main", currency="USD", ttl_ms=600_000
                )
                if held.ok:
                    holds[rid] = (arg, held.estimate)
                else:
                    done.add(rid)
            elif op == "extend" and rid in holds:
                origin, hold = holds[rid]
                grown = await sidecar.extend(origin, rid, amount, ttl_ms=600_000)
                if grown.ok:
                    holds[rid] = (origin, hold + amount)
            elif op == "settle" and rid in holds:
                origin, hold = holds.pop(rid)
                cost = hold * amount // 100
                settled = await sidecar.settle(origin, rid, cost)
                assert (settled.charged, settled.absorbed) == (cost, 0)
                for level in path(parents, origin):
                    charged[level] += cost
                done.add(rid)
            elif op == "release" and rid in holds:
                origin, hold = holds.pop(rid)
                assert await sidecar.release(origin, rid) == hold
                done.add(rid)
            elif op in ("settle", "release") and rid in done:
                assert (await sidecar.settle(owners[rid], rid, UNIT)).duplicate
            await check(operator, parents, holds, charged)
        await client.aclose()

    asyncio.run(run())
