"""Moving a budget (and its subtree) in its tree or to another tree (spendgate.tree_moves),
through ConfigStore (the path of the operator and of ``spendgate apply``), on a single Redis and
on the 3-master Cluster: holds in flight follow the budget, spent history stays where it was
spent, a cached path is read again, an interrupted move finishes when run again, and no money is
lost or counted twice (to the micro-unit).

Two organisations: ``org`` (prepaid 100.00) -> ``team-a`` (capped 30.00 a month) -> ``proj``
(prepaid 10.00, a rate limit), ``org`` -> ``team-b`` (capped 20.00 a day); ``other`` (prepaid
50.00) -> ``dept`` (capped 40.00 a month).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from redis.crc import key_slot

from spendgate.accounting.audit import audit_customer
from spendgate.accounting.refusals import RefusalKey, add_refusals, hour_of, read_refusals
from spendgate.accounting.settlement import in_flight, report_unreconciled
from spendgate.budget_tree import TreeIndex
from spendgate.config_store import ConfigStore, TreeConflict
from spendgate.keys import MOVES, TREE
from spendgate.ledger import Ledger, LedgerError, Outcome
from spendgate.tree_moves import TreeMoves
from tests.support.budget_trees import apply_tree, crashing_move, target_ledger, tree_budget
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z
TTL = 60_000
FAST_RETRIES = (0.0, 0.001)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def proj(parent: str | None = "team-a") -> Any:
    return tree_budget(
        "proj", parent, balance="10.00", rateLimits=[{"requests": 100, "per": "minute"}]
    )


def team_a(parent: str | None = "org") -> Any:
    return tree_budget("team-a", parent, mode="capped", limit="30.00", period="month")


ORGS = [
    tree_budget("org", balance="100.00"),
    team_a(),
    proj(),
    tree_budget("team-b", "org", mode="capped", limit="20.00", period="day"),
    tree_budget("other", balance="50.00"),
    tree_budget("dept", "other", mode="capped", limit="40.00", period="month"),
]


@pytest_asyncio.fixture
async def ledger(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    async with target_ledger(ledger_redis, ledger_redis_target, Clock()) as ledger:
        ledger.move_retry_pauses_s = FAST_RETRIES
        yield ledger


@pytest_asyncio.fixture
async def store(ledger: Ledger) -> ConfigStore:
    store = ConfigStore(ledger.redis, ledger)
    await apply_tree(store, *ORGS)
    return store


async def reserve(ledger: Ledger, customer: str, rid: str, amount: int) -> Any:
    return await ledger.reserve(customer, rid, amount, key_id="main", currency="USD", ttl_ms=TTL)


async def held_spent(ledger: Ledger, customer: str) -> tuple[int, int]:
    account = await ledger.account(customer)
    assert account.held == sum((await ledger.holds(customer)).values()), customer
    return account.held, account.spent


async def usage_ids(ledger: Ledger, customer: str) -> list[str]:
    entries = await ledger.ledger_entries(customer, count=1000)
    return [e["request_id"] for e in entries if e["type"] == "usage"]


async def test_a_move_within_a_tree_carries_its_holds(store: ConfigStore) -> None:
    ledger = store.ledger
    assert (await reserve(ledger, "proj", "before", UNIT)).ok
    await ledger.settle("proj", "before", UNIT)  # history, spent under team-a
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    assert (await reserve(ledger, "team-a", "a1", 3 * UNIT)).ok
    stale = Ledger(ledger.redis, clock=ledger.clock)
    assert await stale.tree.ancestors("proj") == ("team-a", "org")  # cached before the move

    await apply_tree(store, proj("team-b"))

    assert await ledger.redis.hget(TREE, "proj") == b"team-b,org"
    assert await ledger.redis.hget("sg:{org}@proj:cfg", "parent") == b"team-b"  # same keys
    assert await held_spent(ledger, "team-a") == (3 * UNIT, UNIT)  # its history stays
    assert await ledger.holds("team-b") == {"p1": 2 * UNIT}
    assert await held_spent(ledger, "org") == (5 * UNIT, UNIT)
    # The stale path (team-a, org) has the right shape: only the levels' parents tell.
    settled = await stale.settle("proj", "p1", 1_500_000)
    assert settled.charged == 1_500_000
    assert await held_spent(ledger, "team-b") == (0, 1_500_000)
    assert await held_spent(ledger, "team-a") == (3 * UNIT, UNIT)
    assert await held_spent(ledger, "org") == (3 * UNIT, 2_500_000)
    assert await stale.tree.ancestors("proj") == ("team-b", "org")
    assert await usage_ids(ledger, "team-a") == ["before"]
    assert await usage_ids(ledger, "team-b") == ["p1"]
    assert not await ledger.redis.hexists(MOVES, "proj")


async def test_a_stale_path_never_admits_against_the_old_parent(store: ConfigStore) -> None:
    ledger = store.ledger
    stale = Ledger(ledger.redis, clock=ledger.clock)
    await stale.tree.ancestors("proj")
    await apply_tree(store, proj("team-b"))
    assert (await reserve(ledger, "team-b", "b", 19 * UNIT)).ok
    refused = await reserve(stale, "proj", "p", 2 * UNIT)  # team-a has room, team-b has not
    assert (refused.outcome, refused.level) == (Outcome.cap_reached, "team-b")
    assert (await reserve(stale, "proj", "q", UNIT)).ok
    assert await held_spent(ledger, "team-a") == (0, 0)
    assert await stale.release("proj", "q") == UNIT
    assert await held_spent(ledger, "team-b") == (19 * UNIT, 0)


async def test_a_move_whose_holds_do_not_fit_is_refused(store: ConfigStore) -> None:
    ledger = store.ledger
    assert (await reserve(ledger, "team-b", "b", 19 * UNIT)).ok
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    with pytest.raises(TreeConflict, match=r"spec\.parent: moving 'proj' under 'team-b'") as err:
        await apply_tree(store, proj("team-b"))
    assert "1 holds in flight (2.00) to 'team-b', which has 1.00 available" in str(err.value)
    assert (await reserve(ledger, "dept", "d", 39 * UNIT)).ok
    with pytest.raises(TreeConflict, match=r"to 'dept', which has 1\.00 available"):
        await apply_tree(store, proj("dept"))
    assert await ledger.tree.ancestors("proj", fresh=True) == ("team-a", "org")
    assert await ledger.holds("team-a") == {"p1": 2 * UNIT}
    assert await held_spent(ledger, "dept") == (39 * UNIT, 0)
    assert await ledger.redis.hget("sg:{org}@proj:cfg", "moved") is None
    assert not await ledger.redis.hexists(MOVES, "proj")


async def test_a_move_to_another_tree_takes_every_key_along(store: ConfigStore) -> None:
    ledger, redis = store.ledger, store.redis
    await ledger.fund("proj", "f1", 5 * UNIT)
    assert (await reserve(ledger, "proj", "s1", UNIT)).ok
    await ledger.settle("proj", "s1", UNIT)
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    entries = await ledger.ledger_entries("proj")
    stale = Ledger(redis, clock=ledger.clock)
    stale.move_retry_pauses_s = FAST_RETRIES
    await stale.tree.ancestors("proj")

    await apply_tree(store, proj("dept"))

    assert await redis.hget(TREE, "proj") == b"dept,other"
    assert key_slot(b"sg:{other}@proj:acct") == key_slot(b"sg:{other}:acct")
    assert await redis.hget("sg:{other}@proj:cfg", "parent") == b"dept"
    assert await redis.hgetall("sg:{org}@proj:cfg") == {b"moved": b"other"}  # a tombstone
    assert await redis.pttl("sg:{org}@proj:cfg") > 0
    for name in ("acct", "holds", "holddl", "rl", "ledger", "req:s1", "fund:f1"):
        assert not await redis.exists(f"sg:{{org}}@proj:{name}"), name
        assert await redis.exists(f"sg:{{other}}@proj:{name}"), name
    assert await ledger.ledger_entries("proj") == entries  # the same entries, the same ids
    assert (await ledger.account("proj")).balance == 14 * UNIT
    assert await held_spent(ledger, "proj") == (2 * UNIT, UNIT)
    assert await held_spent(ledger, "team-a") == (0, UNIT)
    assert await held_spent(ledger, "org") == (0, UNIT)
    assert await ledger.holds("dept") == {"p1": 2 * UNIT}
    assert await held_spent(ledger, "other") == (2 * UNIT, 0)
    assert (await stale.settle("proj", "s1", UNIT)).duplicate  # idempotency keys moved too
    assert (await stale.fund("proj", "f1", 5 * UNIT)).duplicate
    assert (await stale.settle("proj", "p1", 1_200_000)).charged == 1_200_000
    assert await held_spent(ledger, "other") == (0, 1_200_000)
    assert await held_spent(ledger, "dept") == (0, 1_200_000)
    assert (await ledger.account("org")).charged == UNIT  # history stays where it was spent
    assert (await ledger.account("proj")).balance == 12_800_000
    for customer in ("org", "team-a", "proj", "other", "dept"):
        audit = await audit_customer(redis, customer, "USD", now_ms=T0)
        assert audit.ok, audit.to_json()


async def test_a_move_to_another_tree_takes_the_accounting_counters_along(
    store: ConfigStore,
) -> None:
    redis = store.redis
    now = int(time.time() * 1000)  # refusal counts expire by the wall clock
    refused = RefusalKey("proj", hour_of(now), "cap_reached", "k1", "m")
    await add_refusals(redis, {refused: 3}, TreeIndex(redis))
    await report_unreconciled(redis, "pod-a", {"proj": (2, 5 * UNIT, T0)}, T0, TreeIndex(redis))

    await apply_tree(store, proj("dept"))

    assert await read_refusals(redis, "proj", now - 1, now + 1) == [(refused, 3)]
    waiting = (await in_flight(redis, "proj", T0)).unreconciled
    assert [(w.pod, w.count, w.amount) for w in waiting] == [("pod-a", 2, 5 * UNIT)]
    assert not await redis.exists(f"sg:{{org}}@proj:refusals:{hour_of(now)}")
    assert not await redis.exists("sg:{org}@proj:unreconciled")


async def test_a_subtree_leaves_its_tree_and_a_single_budget_joins_one(
    store: ConfigStore,
) -> None:
    ledger, redis = store.ledger, store.redis
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    stale = Ledger(redis, clock=ledger.clock)
    assert await stale.tree.ancestors("team-a") == ("org",)
    await apply_tree(store, team_a(None))  # team-a and proj become their own tree
    assert (await reserve(stale, "team-a", "t1", UNIT)).ok
    assert stale.tree.cached("team-a") == ()  # a root now: the old path is not kept
    await stale.release("team-a", "t1")
    assert await redis.hget(TREE, "team-a") is None
    assert await redis.hget(TREE, "proj") == b"team-a"
    assert await redis.hget("sg:{team-a}:cfg", "parent") is None
    assert await redis.exists("sg:{team-a}@proj:cfg")
    assert await held_spent(ledger, "org") == (0, 0)
    assert await ledger.holds("team-a") == {"p1": 2 * UNIT}
    assert (await ledger.settle("proj", "p1", UNIT)).charged == UNIT
    assert await held_spent(ledger, "team-a") == (0, UNIT)
    assert (await ledger.account("org")).charged == 0

    await apply_tree(store, tree_budget("solo", balance="5.00"))
    assert (await reserve(ledger, "solo", "s1", UNIT)).ok
    await apply_tree(store, tree_budget("solo", "dept", balance="5.00"))
    assert (await ledger.keys_of("solo")).cfg == "sg:{other}@solo:cfg"
    assert await ledger.holds("other") == {"s1": UNIT}
    await ledger.settle("solo", "s1", UNIT)
    assert await held_spent(ledger, "other") == (0, UNIT)
    assert (await ledger.account("solo")).balance == 4 * UNIT
    # and back to a whole tree joining another one: team-a (with proj) under org again
    await apply_tree(store, team_a("org"))
    assert await redis.hget(TREE, "proj") == b"team-a,org"
    assert (await ledger.account("proj")).balance == 9 * UNIT


async def test_moves_keep_the_tree_rules(store: ConfigStore) -> None:
    await apply_tree(store, tree_budget("ci", "team-b", mode="capped", limit="5.00", period="day"))
    with pytest.raises(TreeConflict, match="budgets form a cycle through 'team-a'"):
        await apply_tree(store, team_a("proj"))
    with pytest.raises(
        TreeConflict,
        match=r"moving 'team-a' under 'ci' with the 1 budgets below it would make the tree 5"
        " levels deep; at most 4",
    ):
        await apply_tree(store, team_a("ci"))
    with pytest.raises(TreeConflict, match=r"spec\.limit: 45\.00 per month is above parent"):
        await apply_tree(
            store,
            tree_budget("team-a", "dept", mode="capped", limit="45.00", period="month"),
        )
    await apply_tree(store, team_a("team-b"))  # 4 levels: org, team-b, team-a, proj
    assert await store.redis.hget(TREE, "proj") == b"team-a,team-b,org"


STEPS_ACROSS = 5  # fenced, copied, arrived, switched, done


@pytest.mark.parametrize("crash_at", range(STEPS_ACROSS))
@pytest.mark.parametrize("recorded", [False, True], ids=["before-record", "after-record"])
async def test_an_interrupted_move_finishes_when_applied_again(
    store: ConfigStore, crash_at: int, recorded: bool
) -> None:
    ledger = store.ledger
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    assert (await reserve(ledger, "proj", "s1", UNIT)).ok
    await ledger.settle("proj", "s1", UNIT)
    crash = crashing_move(store.moves, at_step=crash_at, after_it=recorded)
    with crash, pytest.raises(ConnectionError):
        await apply_tree(store, proj("dept"))
    # Meanwhile nothing is admitted against the old state; the new place once it is live.
    try:
        mid = await reserve(ledger, "proj", "mid", UNIT)
    except LedgerError:
        mid = None
    if mid is not None:
        assert mid.ok and crash_at >= 3
        await ledger.settle("proj", "mid", UNIT)

    await apply_tree(store, proj("dept"))  # the operator's retry, or apply run again

    assert not await store.redis.hexists(MOVES, "proj")
    assert await store.redis.hget(TREE, "proj") == b"dept,other"
    assert (await ledger.settle("proj", "s1", UNIT)).duplicate
    assert (await ledger.settle("proj", "p1", 2 * UNIT)).charged == 2 * UNIT
    extra = UNIT if mid is not None else 0
    assert (await ledger.account("proj")).balance == 7 * UNIT - extra
    assert await held_spent(ledger, "proj") == (0, 3 * UNIT + extra)
    assert await held_spent(ledger, "team-a") == (0, UNIT)
    assert await held_spent(ledger, "org") == (0, UNIT)
    assert await held_spent(ledger, "dept") == (0, 2 * UNIT + extra)
    assert (await ledger.account("other")).balance == 48 * UNIT - extra


@pytest.mark.parametrize("recorded", [False, True], ids=["before-record", "after-record"])
async def test_an_interrupted_move_within_a_tree_finishes(
    store: ConfigStore, recorded: bool
) -> None:
    ledger = store.ledger
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    with crashing_move(store.moves, after_it=recorded), pytest.raises(ConnectionError):
        await apply_tree(store, proj("team-b"))
    with pytest.raises(LedgerError, match="a move that did not finish"):
        await reserve(ledger, "proj", "mid", UNIT)  # levels say team-b, sg:tree team-a
    assert (await TreeMoves(store.redis, ledger).pending()) == ["proj"]
    await apply_tree(store, proj("team-b"))
    assert await ledger.holds("team-b") == {"p1": 2 * UNIT}
    assert await held_spent(ledger, "team-a") == (0, 0)
    assert (await ledger.settle("proj", "p1", UNIT)).charged == UNIT
    assert await held_spent(ledger, "team-b") == (0, UNIT)
    assert await held_spent(ledger, "org") == (0, UNIT)


async def test_a_crash_in_the_middle_of_the_copy(store: ConfigStore) -> None:
    ledger, redis = store.ledger, store.redis
    assert (await reserve(ledger, "proj", "p1", 2 * UNIT)).ok
    restore, count = redis.restore, []

    async def crashing(*args: Any, **kwargs: Any) -> Any:
        count.append(1)
        if len(count) == 3:
            raise ConnectionError("crashed")
        return await restore(*args, **kwargs)

    redis.restore = crashing
    try:
        with pytest.raises(ConnectionError):
            await apply_tree(store, proj("dept"))
    finally:
        redis.restore = restore
    await apply_tree(store, proj("dept"))
    assert await held_spent(ledger, "proj") == (2 * UNIT, 0)
    assert await held_spent(ledger, "other") == (2 * UNIT, 0)
    assert await held_spent(ledger, "org") == (0, 0)
    assert (await ledger.settle("proj", "p1", UNIT)).charged == UNIT
    assert (await ledger.account("other")).balance == 49 * UNIT


async def test_a_configuration_write_never_lifts_a_fence(store: ConfigStore) -> None:
    """Re-applying a budget of the subtree while its move is fenced must not wipe the fence
    (configure replaces the cfg hash): it is refused until the move is done, then lands at the
    new place; a suspension lands at the new place too."""
    ledger = store.ledger
    with crashing_move(store.moves), pytest.raises(ConnectionError):
        await apply_tree(store, proj("dept"))  # fenced, not copied yet
    with pytest.raises(LedgerError, match="a move of its budget did not finish"):
        await ledger.configure(proj("team-a").spec, parent="team-a")
    assert await store.redis.hget("sg:{org}@proj:cfg", "moved") == b"other"
    with pytest.raises(LedgerError):
        await reserve(ledger, "proj", "r", UNIT)
    await store.moves.resume()
    await ledger.suspend("proj", "payment", "card declined")
    assert await store.redis.hgetall("sg:{other}@proj:susp") == {b"payment": b"card declined"}
    refused = await reserve(ledger, "proj", "r", UNIT)
    assert (refused.outcome, refused.level) == (Outcome.suspended, "proj")


async def test_concurrent_applies_during_a_move_do_not_interleave_it(store: ConfigStore) -> None:
    """Two processes: one moves proj to another tree, the other applies proj's child and proj
    itself at the same time; the move runs once, and the child follows it."""
    ledger = store.ledger
    child = tree_budget("proj-x", "proj", mode="capped", limit="5.00", period="day")
    await apply_tree(store, child)
    assert (await reserve(ledger, "proj-x", "x1", UNIT)).ok
    other = ConfigStore(store.redis, Ledger(store.redis, clock=ledger.clock))
    await asyncio.gather(
        apply_tree(store, proj("dept")), apply_tree(other, child), apply_tree(other, proj("dept"))
    )
    assert await store.redis.hget(TREE, "proj-x") == b"proj,dept,other"
    assert not await store.redis.hexists(MOVES, "proj")
    assert await ledger.holds("dept") == {"x1": UNIT}
    assert await held_spent(ledger, "other") == (UNIT, 0)
    assert await held_spent(ledger, "org") == (0, 0)
    assert (await ledger.settle("proj-x", "x1", UNIT)).charged == UNIT
    for customer in ("proj-x", "proj", "dept", "other"):
        assert await held_spent(ledger, customer) == (0, UNIT), customer
