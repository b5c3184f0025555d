"""The ``LedgerConsistent`` condition of a CustomerBudget: the last result of the leader's audit
(:mod:`.audit`, ``spendgate audit`` every ``SPENDGATE_AUDIT_INTERVAL``).

The audit writes a record per customer in Redis; each status computation (reconcile and the
periodic refresh, kopf's handlers) turns it into the condition, so the status is written in
one place only:

- ``True``, reason ``Consistent``: balance = funding - usage to the micro-unit, held = the live
  holds, every usage entry unique, Stripe export = usage settled up to its cursor;
- ``False``, the failed check as the reason (``BalanceMismatch``, ``LedgerMismatch``,
  ``LedgerGap``, ``HeldMismatch``, ``HoldIndexMismatch``, ``DuplicateUsage``,
  ``StripeExportMismatch``, ``AuditInconclusive``; ``MultipleMismatches`` for several) and the
  mismatch in the message;
- absent until the first audit of the customer.

A change to False is a Warning Event with the reason and message; back to True, a Normal Event
``LedgerConsistent``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..kube import conditions as cond
from ..kube.objects import EventSpec
from .audit import audit_record_key

LEDGER_CONSISTENT = "LedgerConsistent"
CONSISTENT = "Consistent"
MULTIPLE = "MultipleMismatches"
CHECK_REASONS = {
    "balance": "BalanceMismatch",
    "ledger": "LedgerMismatch",
    "ledger_gap": "LedgerGap",
    "held": "HeldMismatch",
    "hold_index": "HoldIndexMismatch",
    "duplicate_usage": "DuplicateUsage",
    "stripe_export": "StripeExportMismatch",
    "inconclusive": "AuditInconclusive",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_audit_record(redis: Any, customer_id: str) -> dict[str, str]:
    """The customer's last audit record (empty before its first audit)."""
    raw = await redis.hgetall(audit_record_key(customer_id))
    return {_text(k): _text(v) for k, v in raw.items()}


def ledger_condition(
    record: Mapping[str, str], generation: int | None, now: datetime
) -> cond.Condition | None:
    if "ok" not in record:
        return None
    when = ""
    if record.get("ts", "").isdigit():
        when = cond.now_iso(datetime.fromtimestamp(int(record["ts"]) / 1000, UTC))
    prefix = f"audit at {when}: " if when else ""
    if record["ok"] == "1":
        return cond.make_condition(
            LEDGER_CONSISTENT,
            "True",
            CONSISTENT,
            prefix + "balance = funding - usage to the micro-unit; held = the live holds;"
            " every usage entry unique; Stripe export matches",
            generation=generation,
            now=now,
        )
    checks = [c for c in record.get("checks", "").split(",") if c]
    reason = MULTIPLE if len(checks) > 1 else CHECK_REASONS.get(checks[0] if checks else "", "")
    return cond.make_condition(
        LEDGER_CONSISTENT,
        "False",
        reason or "AuditMismatch",
        prefix + (record.get("message") or "the audit found a mismatch"),
        generation=generation,
        now=now,
    )


def set_ledger_condition(
    record: Mapping[str, str],
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    generation: int | None,
    now: datetime,
) -> list[EventSpec]:
    """Put the condition into ``status``; the Events of a transition."""
    condition = ledger_condition(record, generation, now)
    if condition is None:
        return []
    status["conditions"] = cond.set_condition(status.get("conditions"), condition)
    old = cond.find(old_status.get("conditions"), LEDGER_CONSISTENT)
    if not cond.transitioned(old_status.get("conditions"), condition):
        return []
    if condition["status"] == "False":
        return [EventSpec("Warning", condition["reason"], condition["message"])]
    if old is not None:
        return [EventSpec("Normal", LEDGER_CONSISTENT, condition["message"])]
    return []


__all__ = [
    "CHECK_REASONS",
    "LEDGER_CONSISTENT",
    "ledger_condition",
    "read_audit_record",
    "set_ledger_condition",
]
