"""The money surfaced by the running operator (kopf and the leader's work on the kmock emulator,
a real Redis): an abnormal-spend suspension in the status and lifted by the resume annotation,
absorbed cost as an Event and an alert, a broken ledger invariant as ``LedgerConsistent``."""

from __future__ import annotations

from typing import Any

from spendgate.accounting import abnormal
from spendgate.keys import for_customer
from spendgate.ledger import Outcome
from spendgate.operator.budgets.abnormal import RESUME_ANNOTATION
from spendgate.operator.kube import conditions as cond
from tests.operator.test_operator_e2e import BUDGETS, NS, Env, created_budget, running_operator


def condition(env: Env, type_: str) -> dict[str, Any]:
    found = cond.find(env.status().get("conditions"), type_)
    return dict(found) if found is not None else {}


def events(env: Env, reason: str) -> list[dict[str, Any]]:
    return [e for e in env.kubectl.events(NS, "acme") if e["reason"] == reason]


async def test_abnormal_spend_absorbed_cost_and_audit_through_the_operator(
    redis_url: str,
) -> None:
    fast = {"audit_interval_s": 0.5, "spend_watch_interval_s": 0.3}
    async with running_operator(redis_url, **fast) as env:
        await created_budget(env)
        redis = env.store.redis
        await env.wait(
            lambda: condition(env, "LedgerConsistent").get("status") == "True", "audited"
        )

        # A model reports more than was held: one CostAbsorbed Event and alert.
        ledger = env.store.ledger
        held = await ledger.reserve("acme", "r1", 1_000_000, key_id="main", currency="USD",
                                    ttl_ms=60_000)  # fmt: skip
        assert held.outcome is Outcome.reserved
        await ledger.settle("acme", "r1", 1_400_000, key_id="main")
        await env.wait(lambda: events(env, "CostAbsorbed"), "a CostAbsorbed Event")
        [event] = events(env, "CostAbsorbed")
        assert event["type"] == "Warning" and "0.40 USD more than its bound" in event["message"]
        await env.wait(
            lambda: any(a["spendgate"]["kind"] == "CostAbsorbed" for a in env.alerts.received),
            "a CostAbsorbed alert",
        )

        # The policy suspended the customer: the status says why; a person lifts it.
        await abnormal.suspend(redis, "acme", "spend far above its normal: ...", 1)
        await env.wait(lambda: env.status().get("state") == "Suspended", "Suspended")
        assert condition(env, "Suspended")["reason"] == "AbnormalSpend"
        await env.kubectl.patch(
            BUDGETS, NS, "acme", {"metadata": {"annotations": {RESUME_ANNOTATION: "alice"}}}
        )
        await env.wait(lambda: env.status().get("state") == "Active", "Active again")
        assert await abnormal.is_suspended(redis, "acme") is None
        [resumed] = events(env, "AbnormalSpendResumed")
        assert resumed["type"] == "Normal" and "lifted" in resumed["message"]

        # A ledger invariant broken on purpose: LedgerConsistent False, a Warning Event.
        await redis.hincrby(for_customer("acme").acct, "balance", 3)
        await env.wait(
            lambda: condition(env, "LedgerConsistent").get("reason") == "BalanceMismatch",
            "LedgerConsistent=False",
        )
        broken = condition(env, "LedgerConsistent")
        assert broken["status"] == "False" and "off by 0.000003" in broken["message"]
        await env.wait(lambda: events(env, "BalanceMismatch"), "a BalanceMismatch Event")
        assert len(events(env, "CostAbsorbed")) == 1  # never repeated
