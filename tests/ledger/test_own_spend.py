"""Own spend and subtree spend of each level of a budget tree (settle's ``dspent``), exact to
the micro-unit and across a period rollover, on a single Redis and on the 3-master Cluster.

The tree: ``acme`` (capped 1000.00 a month) -> ``eng`` (capped 500.00 a month) -> ``ml``
(capped 200.00 a month); every level's key makes requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from spendgate.accounting.balance import balance_view
from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.money import format_amount
from spendgate.operator.budgets.status import account_fields
from spendgate.periods import current_period
from tests.support.budget_trees import apply_tree, target_ledger, tree_budget
from tests.support.redis_servers import RedisTarget

T0 = 1_710_331_200_000  # 2024-03-13T12:00:00Z
NEXT_MONTH = 1_711_929_600_000 + 3_600_000  # 2024-04-01T01:00:00Z
PATH = {"ml": ("ml", "eng", "acme"), "eng": ("eng", "acme"), "acme": ("acme",)}
CHILD = {"acme": "eng", "eng": "ml", "ml": None}


class Clock:
    now = T0

    def __call__(self) -> int:
        return self.now


@pytest_asyncio.fixture
async def tree(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    async with target_ledger(ledger_redis, ledger_redis_target, Clock()) as ledger:
        await apply_tree(
            ConfigStore(ledger.redis, ledger),
            tree_budget("acme", mode="capped", limit="1000.00", period="month"),
            tree_budget("eng", "acme", mode="capped", limit="500.00", period="month"),
            tree_budget("ml", "eng", mode="capped", limit="200.00", period="month"),
        )
        yield ledger


async def traffic(ledger: Ledger, round_: int) -> dict[str, int]:
    """Odd amounts at every level, each reserved and settled; returns each budget's own spend."""
    own = dict.fromkeys(PATH, 0)
    for n in range(12):
        customer = ("ml", "eng", "acme")[n % 3]
        cost = 1_234_567 + 7_919 * n + round_
        rid = f"r{round_}-{n}"
        outcome = await ledger.reserve(
            customer, rid, cost + 11, key_id="main", currency="USD", ttl_ms=60_000
        )
        assert outcome.ok, outcome
        settled = await ledger.settle(customer, rid, cost, key_id="main")
        assert settled.charged == cost
        own[customer] += cost
    return own


async def check(ledger: Ledger, own: dict[str, int], now: int) -> None:
    accounts = {c: current_period(await ledger.account(c), now) for c in PATH}
    for customer, account in accounts.items():
        assert account.own_spent == own[customer], customer
        child = CHILD[customer]
        children = accounts[child].spent if child else 0
        assert account.own_spent + children == account.spent, customer
        assert account.spent == sum(own[c] for c, path in PATH.items() if customer in path)
        view = balance_view(account, now)
        assert view["spentThisPeriod"] == format_amount(account.spent)
        assert view["ownSpentThisPeriod"] == format_amount(own[customer])
        status = account_fields(account, now)  # the CustomerBudget's status
        assert status["spentThisPeriod"] == format_amount(account.spent)
        assert status["ownSpentThisPeriod"] == format_amount(own[customer])


async def test_own_plus_children_is_the_subtree_across_a_rollover(tree: Ledger) -> None:
    clock = tree.clock
    assert isinstance(clock, Clock)
    await check(tree, dict.fromkeys(PATH, 0), T0)
    own = await traffic(tree, 1)
    await check(tree, own, T0)

    clock.now = NEXT_MONTH  # nothing spent yet in April, though Redis resets lazily
    await check(tree, dict.fromkeys(PATH, 0), NEXT_MONTH)
    own = await traffic(tree, 2)  # every level rolls over at its first April request
    await check(tree, own, NEXT_MONTH)


async def test_a_leaf_keeps_no_descendants_counter(tree: Ledger) -> None:
    await traffic(tree, 3)
    leaf = await tree.redis.hgetall(for_customer("ml", ("eng", "acme")).acct)
    assert b"dspent" not in leaf and "dspent" not in leaf  # a leaf pays no extra write
    root = await tree.redis.hgetall(for_customer("acme").acct)
    assert b"dspent" in root or "dspent" in root
