"""Budget trees in the ledger: every level from a budget to its root is checked, held, settled
and released by one script, on a single Redis and on the 3-master Cluster.

The organisation: ``org`` (prepaid, 100.00) -> ``team-a`` (capped 30.00 a month) -> ``proj``
(prepaid allocation 10.00), and ``team-b`` (capped 20.00 a day, 2 requests a second) under
``org``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from redis.crc import key_slot

from spendgate.accounting.audit import audit_customer
from spendgate.accounting.entries import scan
from spendgate.config_store import ConfigStore
from spendgate.keys import TREE, for_customer
from spendgate.ledger import Ledger, LedgerError, Outcome, Usage
from tests.support.budget_trees import apply_tree, target_ledger, tree_budget
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z, a Wednesday
TTL = 60_000
LEVELS = {"proj": ("proj", "team-a", "org"), "team-a": ("team-a", "org"), "org": ("org",)}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def ledger(
    ledger_redis: Any, ledger_redis_target: RedisTarget, clock: Clock
) -> AsyncIterator[Ledger]:
    async with target_ledger(ledger_redis, ledger_redis_target, clock) as ledger:
        yield ledger


@pytest_asyncio.fixture
async def org(ledger: Ledger) -> Ledger:
    store = ConfigStore(ledger.redis, ledger)
    await apply_tree(
        store,
        tree_budget("org", balance="100.00"),
        tree_budget("team-a", "org", mode="capped", limit="30.00", period="month"),
        tree_budget("proj", "team-a", balance="10.00"),
        tree_budget(
            "team-b",
            "org",
            mode="capped",
            limit="20.00",
            period="day",
            rateLimits=[{"requests": 2, "per": "second"}],
        ),
    )
    return ledger


async def reserve(ledger: Ledger, customer: str, rid: str, amount: int, **kw: Any):
    return await ledger.reserve(
        customer, rid, amount, key_id="main", currency="USD", ttl_ms=TTL, **kw
    )


async def state(ledger: Ledger, customer: str) -> tuple[int, int, int, int]:
    account = await ledger.account(customer)
    return account.balance, account.held, account.spent, account.charged


async def test_a_tree_lives_in_its_roots_slot_and_single_budgets_keep_their_keys(
    org: Ledger,
) -> None:
    assert await org.tree.ancestors("proj") == ("team-a", "org")
    assert await org.tree.ancestors("org") == ()
    proj = await org.keys_of("proj")
    assert proj.cfg == "sg:{org}@proj:cfg"
    assert (await org.keys_of("org")).cfg == "sg:{org}:cfg" == for_customer("org").cfg
    slots = {key_slot(k.encode()) for c in ("org", "team-a", "proj", "team-b")
             for k in (await org.keys_of(c)).level_keys()}  # fmt: skip
    assert slots == {key_slot(b"sg:{org}:cfg")}
    assert await org.redis.hget(TREE, "proj") == b"team-a,org"
    assert await org.redis.hget("sg:{org}@proj:cfg", "parent") == b"team-a"
    assert not await org.redis.exists("sg:{proj}:cfg")


async def test_a_hold_is_taken_and_settled_at_every_level(org: Ledger) -> None:
    held = await reserve(org, "proj", "r1", 2 * UNIT)
    assert held.ok and held.estimate == 2 * UNIT
    for customer in LEVELS["proj"]:
        assert (await state(org, customer))[1] == 2 * UNIT
        assert await org.holds(customer) == {"r1": 2 * UNIT}
    settled = await org.settle("proj", "r1", 1_500_000, usage=Usage(model="m"))
    assert (settled.charged, settled.absorbed) == (1_500_000, 0)
    assert await state(org, "proj") == (10 * UNIT - 1_500_000, 0, 1_500_000, 1_500_000)
    assert await state(org, "team-a") == (-1_500_000, 0, 1_500_000, 1_500_000)
    assert await state(org, "org") == (100 * UNIT - 1_500_000, 0, 1_500_000, 1_500_000)
    for customer in LEVELS["proj"]:
        (entry,) = [e for e in await org.ledger_entries(customer) if e["type"] == "usage"]
        assert (entry["request_id"], entry["cost"], entry["budget"]) == ("r1", "1500000", "proj")
        assert entry["model"] == "m"
    # Idempotent by request id: a replay charges no level again.
    assert (await org.settle("proj", "r1", 1_500_000)).duplicate
    assert (await state(org, "org"))[3] == 1_500_000


async def test_the_tightest_level_refuses_and_is_named(org: Ledger, clock: Clock) -> None:
    # proj's allocation (10.00) is the tightest: a request asking for more is held down to it.
    partial = await reserve(org, "proj", "big", 12 * UNIT, minimum=UNIT)
    assert partial.ok and partial.estimate == 10 * UNIT
    refused = await reserve(org, "proj", "more", UNIT)
    assert (refused.outcome, refused.level, refused.available) == (Outcome.insufficient, "proj", 0)
    await org.release("proj", "big")
    # team-a's monthly cap (30.00) binds a request made with team-a's own key.
    assert (await reserve(org, "team-a", "a1", 25 * UNIT)).ok
    capped = await reserve(org, "proj", "p1", 6 * UNIT)
    assert (capped.outcome, capped.level) == (Outcome.cap_reached, "team-a")
    # The root's balance binds team-b.
    assert (await reserve(org, "team-b", "b1", 20 * UNIT)).ok
    await org.settle("team-b", "b1", 20 * UNIT)
    clock.now += 86_400_000  # team-b's day is over; org has 80.00, of which 25.00 held
    assert (await reserve(org, "team-b", "b2", 20 * UNIT)).ok
    await org.settle("team-b", "b2", 20 * UNIT)
    clock.now += 86_400_000
    assert (await reserve(org, "team-b", "b3", 20 * UNIT)).ok
    await org.settle("team-b", "b3", 20 * UNIT)
    clock.now += 86_400_000
    short = await reserve(org, "team-b", "b4", 20 * UNIT)
    assert (short.outcome, short.level, short.available) == (Outcome.insufficient, "org", 15 * UNIT)


async def test_rate_limits_of_every_level_apply(org: Ledger) -> None:
    team_b = tree_budget("team-b-ci", "team-b", mode="capped", limit="5.00", period="day")
    await apply_tree(ConfigStore(org.redis, org), team_b)
    assert (await reserve(org, "team-b-ci", "c1", 1)).ok
    assert (await reserve(org, "team-b", "c2", 1)).ok
    limited = await reserve(org, "team-b-ci", "c3", 1)
    assert (limited.outcome, limited.level) == (Outcome.rate_limited, "team-b")
    assert (await state(org, "org"))[1] == 2  # the refused request held nothing anywhere


async def test_suspending_a_parent_refuses_its_subtree_but_settles(org: Ledger) -> None:
    assert (await reserve(org, "proj", "in-flight", UNIT)).ok
    await org.suspend("team-a", "spec", "suspended in the CustomerBudget spec")
    refused = await reserve(org, "proj", "new", UNIT)
    assert (refused.outcome, refused.level) == (Outcome.suspended, "team-a")
    assert not (await org.extend("proj", "in-flight", UNIT, ttl_ms=TTL)).ok
    assert (await reserve(org, "team-b", "other-team", UNIT)).ok  # a sibling is not affected
    assert (await org.settle("proj", "in-flight", UNIT)).charged == UNIT
    assert (await state(org, "org"))[3] == UNIT


async def test_extend_must_fit_every_level(org: Ledger) -> None:
    assert (await reserve(org, "proj", "s", 9 * UNIT)).ok
    grown = await org.extend("proj", "s", UNIT, ttl_ms=TTL)
    assert grown.ok and grown.hold == 10 * UNIT
    for customer in LEVELS["proj"]:
        assert await org.holds(customer) == {"s": 10 * UNIT}
    refused = await org.extend("proj", "s", 1, ttl_ms=TTL)
    assert (refused.ok, refused.level) == (False, "proj")


async def test_release_and_expiry_free_every_level(org: Ledger, clock: Clock) -> None:
    assert (await reserve(org, "proj", "gone", UNIT)).ok
    assert await org.release("proj", "gone") == UNIT
    assert (await reserve(org, "proj", "crashed", 2 * UNIT)).ok
    clock.now += TTL + 1
    assert await org.sweep("proj") == (1, 0)
    for customer in LEVELS["proj"]:
        assert (await state(org, customer))[1] == 0
        assert await org.holds(customer) == {}
    # A settle after expiry still charges, within every level's available amount.
    late = await org.settle("proj", "crashed", 50 * UNIT)
    assert (late.charged, late.absorbed) == (10 * UNIT, 40 * UNIT)
    assert (await org.account("org")).absorbed == 40 * UNIT
    assert (await state(org, "proj"))[0] == 0


async def test_funding_a_child_raises_its_allocation_only(org: Ledger) -> None:
    result = await org.fund("proj", "top-up-1", 5 * UNIT)
    assert result.balance == 15 * UNIT
    assert (await state(org, "org"))[0] == 100 * UNIT  # no money entered the tree
    assert (await reserve(org, "proj", "r", 15 * UNIT)).ok


async def test_a_stale_view_of_the_tree_is_read_again(org: Ledger, ledger_redis: Any) -> None:
    other = Ledger(ledger_redis, clock=org.clock)
    assert await other.tree.ancestors("late") == ()  # looked up before it was applied
    await apply_tree(ConfigStore(org.redis, org), tree_budget("late", "org", balance="5.00"))
    assert (await reserve(other, "late", "r", UNIT)).ok
    assert (await state(other, "org"))[1] == UNIT


async def test_moved_is_an_error_not_a_silent_charge(org: Ledger) -> None:
    await org.redis.hdel("sg:{org}@proj:cfg", "parent")  # Redis edited by hand
    with pytest.raises(LedgerError, match="does not match its configuration"):
        await reserve(org, "proj", "r", UNIT)


async def test_an_expired_hold_is_not_grown_back(org: Ledger, clock: Clock) -> None:
    """Found by Hypothesis: extend reaped the expired hold, then wrote it back grown, counting
    only the extra in held."""
    assert (await reserve(org, "team-a", "q1", 1)).ok
    clock.now += TTL + 1
    refused = await org.extend("team-a", "q1", 1, ttl_ms=TTL)
    assert (refused.ok, refused.reason) == (False, "no_hold")
    for customer in ("team-a", "org"):
        assert (await state(org, customer))[1] == 0
        assert await org.holds(customer) == {}


async def test_every_level_of_a_tree_passes_the_audit_with_holds_in_flight(org: Ledger) -> None:
    assert (await reserve(org, "proj", "in-flight", UNIT)).ok
    assert (await reserve(org, "team-b", "b", 2 * UNIT)).ok
    await org.settle("team-b", "b", UNIT)
    assert (await reserve(org, "proj", "p", UNIT)).ok
    assert (await org.extend("proj", "p", UNIT, ttl_ms=TTL)).ok
    await org.settle("proj", "p", 1_500_000)
    await org.fund("proj", "allocation-1", UNIT)
    for customer in ("org", "team-a", "proj", "team-b"):
        audit = await audit_customer(org.redis, customer, "USD", now_ms=T0)
        assert audit.ok, audit.to_json()
    entries = [e async for e in scan(org.redis, "proj")]
    assert [e.kind for e in entries] == ["adjust", "usage", "fund"]


async def test_a_parent_is_found_by_its_name_until_it_is_deleted(org: Ledger) -> None:
    store = ConfigStore(org.redis, org)
    assert await org.redis.hget("sg:budgetrefs", "default/team-a") == b"team-a"
    await org.redis.hdel("sg:budgetrefs", "default/team-b")  # applied before the index
    level = await store.applied_level("default/team-b")
    assert level is not None and (level.customer_id, level.ancestors) == ("team-b", ("org",))
    await store.revoke_customer("team-b", "budget deleted")
    with pytest.raises(ValueError, match="default/team-b is neither in the input nor applied"):
        await apply_tree(store, tree_budget("team-b-ci", "team-b", balance="1.00"))
