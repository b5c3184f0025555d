"""The leader's audit as the ``LedgerConsistent`` condition of a budget: an invariant broken on
purpose in Redis turns it False (the mismatch named) with a Warning Event; repaired, it turns
True again with a Normal Event. Real Redis; reconcile and refresh called directly."""

from __future__ import annotations

from typing import Any

import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.budgets.audit import AuditLoop
from spendgate.operator.kube import conditions as cond
from tests.operator.test_operator_budgets import Secrets, budget_body, next_body, secret


def ledger_consistent(status: dict[str, Any]) -> dict[str, Any] | None:
    found = cond.find(status.get("conditions"), "LedgerConsistent")
    return dict(found) if found is not None else None


async def test_audit_mismatch_becomes_a_condition_with_events(
    redis_client: redis.asyncio.Redis,
) -> None:
    store = ConfigStore(redis_client)
    body = budget_body()
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    assert ledger_consistent(result.status) is None  # not audited yet
    body = next_body(body, result)
    audit = AuditLoop(redis_client, interval_s=300)

    await audit.pass_once()
    result = await b.refresh_budget(body, store=store, read_secret=Secrets(secret()))
    consistent = ledger_consistent(result.status)
    assert consistent is not None and consistent["status"] == "True"
    assert consistent["reason"] == "Consistent" and consistent["message"].startswith("audit at ")
    assert [e for e in result.events if "Ledger" in e.reason or "Mismatch" in e.reason] == []
    body = next_body(body, result)

    # Break an invariant: the balance no longer equals funding - usage.
    await redis_client.hincrby(for_customer("acme").acct, "balance", 7)
    await audit.pass_once()
    result = await b.refresh_budget(body, store=store, read_secret=Secrets(secret()))
    broken = ledger_consistent(result.status)
    assert broken is not None and broken["status"] == "False"
    assert broken["reason"] == "BalanceMismatch"
    assert "balance 100.000007 != funded 0.00 + adjusted 0.00 + opening 100.00" in broken["message"]
    [event] = [e for e in result.events if e.reason == "BalanceMismatch"]
    assert event.type == "Warning" and "off by 0.000007" in event.message
    assert "LedgerConsistent" in result.patch(body["status"])["conditions"][-1]["type"]
    body = next_body(body, result)

    # Still broken at the next refresh (and a full reconcile): no second Event.
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    assert ledger_consistent(result.status)["status"] == "False"  # type: ignore[index]
    assert [e for e in result.events if e.reason == "BalanceMismatch"] == []
    body = next_body(body, result)

    # Two invariants broken: MultipleMismatches.
    await redis_client.hincrby(for_customer("acme").acct, "held", 5)
    await audit.pass_once()
    result = await b.refresh_budget(body, store=store, read_secret=Secrets(secret()))
    assert ledger_consistent(result.status)["reason"] == "MultipleMismatches"  # type: ignore[index]
    body = next_body(body, result)

    # Repaired: True again, with a Normal Event.
    await redis_client.hincrby(for_customer("acme").acct, "balance", -7)
    await redis_client.hincrby(for_customer("acme").acct, "held", -5)
    await audit.pass_once()
    result = await b.refresh_budget(body, store=store, read_secret=Secrets(secret()))
    assert ledger_consistent(result.status)["status"] == "True"  # type: ignore[index]
    [event] = [e for e in result.events if e.reason == "LedgerConsistent"]
    assert event.type == "Normal"
