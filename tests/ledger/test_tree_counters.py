"""A child budget's refusal counts, unreconciled markers and abnormal-spend state live under its
tree's keys (the root's hash tag) and are read back from there, on a single Redis and on the
3-master Cluster."""

from __future__ import annotations

import time
from typing import Any

from redis.crc import key_slot

from sidecar.refusal_counts import RefusalCounter
from spendgate.accounting import abnormal
from spendgate.accounting.abnormal import AbnormalPolicy, Action
from spendgate.accounting.refusals import hour_of, read_refusals
from spendgate.accounting.settlement import in_flight, report_unreconciled
from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger, Outcome
from tests.support.budget_trees import apply_tree, tree_budget

T0 = int(time.time() * 1000)  # refusal counts expire after their retention: now
ANCESTORS = ("team", "org")


async def _tree(ledger_redis: Any) -> Ledger:
    ledger = Ledger(ledger_redis, clock=lambda: T0)
    await ledger.load_scripts()
    await apply_tree(
        ConfigStore(ledger.redis, ledger),
        tree_budget("org", balance="100.00"),
        tree_budget("team", "org", mode="capped", limit="30.00", period="month"),
        tree_budget("proj", "team", balance="10.00"),
    )
    return ledger


async def test_a_childs_refusals_land_and_are_read_under_its_tree(ledger_redis: Any) -> None:
    ledger = await _tree(ledger_redis)
    counter = RefusalCounter(ledger.redis, clock=lambda: T0 / 1000, tree=ledger.tree)
    counter.count("proj", "main", "insufficient", "llama")
    counter.count("proj", "main", "insufficient", "llama")
    counter.count("org", "main", "rate_limited", "llama")
    await counter.flush()
    hour = hour_of(T0)
    tree_key = for_customer("proj", ANCESTORS).refusals(hour)
    assert key_slot(tree_key.encode()) == key_slot(for_customer("org").acct.encode())
    assert await ledger.redis.hgetall(tree_key)
    assert not await ledger.redis.exists(f"sg:{{proj}}:refusals:{hour}")
    found = await read_refusals(ledger.redis, "proj", T0 - 1, T0 + 1)
    assert [(r.customer_id, r.reason, n) for r, n in found] == [("proj", "insufficient", 2)]
    found = await read_refusals(ledger.redis, "org", T0 - 1, T0 + 1)
    assert [(r.reason, n) for r, n in found] == [("rate_limited", 1)]


async def test_a_childs_unreconciled_and_holds_are_read_under_its_tree(ledger_redis: Any) -> None:
    ledger = await _tree(ledger_redis)
    outcome = await ledger.reserve(
        "proj", "r1", 250_000, key_id="main", currency="USD", ttl_ms=60_000
    )
    assert outcome.ok
    await report_unreconciled(ledger.redis, "pod-0", {"proj": (2, 700_000, T0)}, T0, ledger.tree)
    assert await ledger.redis.hgetall(for_customer("proj", ANCESTORS).unreconciled)
    assert not await ledger.redis.exists("sg:{proj}:unreconciled")
    state = await in_flight(ledger.redis, "proj", T0 + 1)
    assert (state.holds, state.held) == (1, 250_000)
    assert (state.unreconciled_count, state.unreconciled_amount) == (2, 700_000)
    await report_unreconciled(ledger.redis, "pod-0", {"proj": (0, 0, 0)}, T0, ledger.tree)
    assert (await in_flight(ledger.redis, "proj", T0 + 1)).settled is False  # the hold remains
    assert not (await in_flight(ledger.redis, "proj", T0 + 1)).unreconciled


async def test_a_childs_abnormal_spend_is_watched_and_suspended_in_its_tree(
    ledger_redis: Any,
) -> None:
    ledger = await _tree(ledger_redis)
    for n, cost in enumerate((1_000_000, 2_000_000, 3)):
        held = await ledger.reserve(
            "proj", f"a{n}", cost, key_id="main", currency="USD", ttl_ms=60_000
        )
        assert held.ok, held
        await ledger.settle("proj", f"a{n}", cost, key_id="main")
    policy = AbnormalPolicy(action=Action.suspend, minimum=1)
    verdict, _ = await abnormal.check(ledger.redis, "proj", policy, T0 + 1)
    assert verdict.recent == 3_000_003  # the child's own ledger, under its tree's tag
    await abnormal.suspend(ledger.redis, "proj", "spend far above its normal", T0 + 1)
    assert await abnormal.is_suspended(ledger.redis, "proj") == "spend far above its normal"
    refused = await ledger.reserve("proj", "b1", 1, key_id="main", currency="USD", ttl_ms=60_000)
    assert refused.outcome is Outcome.suspended and refused.level == "proj"
    assert await abnormal.resume(ledger.redis, "proj", T0 + 2)
    served = await ledger.reserve("proj", "b2", 1, key_id="main", currency="USD", ttl_ms=60_000)
    assert served.ok
