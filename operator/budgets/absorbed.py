"""Absorbed cost, surfaced (leader only): a model reported more than its request's bound, and
the ledger recorded the excess as ``absorbed`` -- the platform's measured loss, never charged.

Each pass compares the account's ``absorbed`` total with what was already reported
(``sg:{c}:absorbed:reported``: ``cursor``, the last ledger id examined, and ``total``, the
account's absorbed total at that point). When they are equal -- the normal case, absorbed should
stay zero -- the cursor just moves to the newest entry, without reading the ledger. Otherwise the
entries after the cursor are read and every one with ``absorbed > 0`` is reported once: a Warning
Event ``CostAbsorbed`` on its budget, an alert, and ``spendgate_operator_absorbed_micros_total``.
Absorbed cost in entries the exporter trimmed before they were read is reported as one sum.

The record moves after the reports, so a restart or a failover never repeats a completed pass
(a replica that dies in the middle of one repeats at most that pass's reports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from spendgate.accounting.entries import LedgerEntry, scan
from spendgate.keys import for_customer
from spendgate.money import format_amount

from .notify import BudgetNotifier, BudgetTarget

log = logging.getLogger("spendgate.operator.absorbed")

REASON = "CostAbsorbed"
MAX_REPORTS = 20  # per customer and pass; beyond, one summary Event and alert

ABSORBED_MICROS = Counter(
    "spendgate_operator_absorbed_micros",
    "Cost above the requests' bounds (absorbed, not charged) the operator reported, in micro-units",
    ["currency"],
)
ABSORBED_ENTRIES = Counter(
    "spendgate_operator_absorbed_entries",
    "Ledger entries with absorbed cost the operator reported",
    ["currency"],
)

# One snapshot: the account's absorbed total and the newest ledger id, atomically (one slot).
_SNAPSHOT = """
local absorbed = redis.call('HGET', KEYS[1], 'absorbed') or '0'
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last = ''
if #newest > 0 then last = newest[1][1] end
return {absorbed, last}
"""


def reported_key(customer_id: str) -> str:
    """Hash: ``cursor`` (last ledger id examined), ``total`` (absorbed micros up to it)."""
    return f"{for_customer(customer_id).tag}:absorbed:reported"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Finding:
    amount: int  # micro-units absorbed
    entry: LedgerEntry | None = None  # None: entries trimmed before they were read
    entries: int = 1

    def describe(self, currency: str | None) -> str:
        unit = f" {currency}" if currency else ""
        entry = self.entry
        if entry is None:
            return (
                f"{format_amount(self.amount)}{unit} of cost above the requests' bounds was"
                " absorbed (not charged) in ledger entries trimmed before the operator read them"
            )
        what = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("model", entry.model),
                ("key", entry.key),
                ("rule", entry.rule),
                ("pod", entry.pod),
            )
            if value
        )
        held = entry.estimate if entry.estimate is not None else 0
        charged = entry.cost or 0
        return (
            f"request {entry.request_id or entry.id}{f' ({what})' if what else ''} cost"
            f" {format_amount(charged + self.amount)}{unit}, {format_amount(self.amount)}{unit}"
            f" more than its bound (held {format_amount(held)}{unit}, charged"
            f" {format_amount(charged)}{unit}): absorbed, not charged. The PriceBook's bound"
            " is too low for this model (raise its overheads or output limit) or the server"
            " ignored max_tokens"
        )

    def fields(self, currency: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"absorbed": format_amount(self.amount), "currency": currency}
        if self.entry is not None:
            e = self.entry
            fields.update(
                entry=e.id,
                requestId=e.request_id,
                model=e.model,
                key=e.key,
                rule=e.rule,
                pod=e.pod,
                charged=format_amount(e.cost or 0),
                held=format_amount(e.estimate or 0),
            )
        else:
            fields["entries"] = self.entries
        return fields


def absorbed_of(entry: LedgerEntry) -> int:
    if entry.kind == "usage":
        return entry.absorbed or 0
    if entry.kind == "absorbed":
        return entry.amount if entry.amount is not None else entry.cost or 0
    return 0


async def new_findings(redis: Any, customer_id: str) -> tuple[list[Finding], str, int]:
    """What was absorbed since the last report: findings, the newest ledger id, the total."""
    keys = for_customer(customer_id)
    script = redis.register_script(_SNAPSHOT)
    total_raw, last_raw = await script(keys=[keys.acct, keys.ledger], args=[])
    total, last = int(_text(total_raw) or 0), _text(last_raw)
    raw = await redis.hgetall(reported_key(customer_id))
    record = {_text(k): _text(v) for k, v in raw.items()}
    cursor = record.get("cursor", "")
    reported = int(record.get("total") or 0)
    last = last or cursor  # an empty ledger (all trimmed) keeps the cursor where it was
    if total <= reported:
        return [], last, total  # nothing new (or the account was reset: start afresh)
    findings: list[Finding] = []
    found = 0
    start = f"({cursor}" if cursor else "-"
    if last:
        async for entry in scan(redis, customer_id, start):
            if _id(entry.id) > _id(last):
                break
            amount = absorbed_of(entry)
            if amount > 0:
                findings.append(Finding(amount, entry))
                found += amount
    if total - reported > found:
        findings.insert(0, Finding(total - reported - found, None, 0))
    return findings, last, total


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def mark_reported(redis: Any, customer_id: str, cursor: str, total: int) -> None:
    await redis.hset(reported_key(customer_id), mapping={"cursor": cursor, "total": total})


async def report_absorbed(
    redis: Any, target: BudgetTarget, notifier: BudgetNotifier | None
) -> list[Finding]:
    """One customer: report what was absorbed since the last pass, then move the record."""
    findings, last, total = await new_findings(redis, target.customer_id)
    currency = target.currency
    label = currency or ""
    shown = findings[:MAX_REPORTS]
    rest = findings[MAX_REPORTS:]
    for finding in findings:
        ABSORBED_MICROS.labels(label).inc(finding.amount)
        if finding.entry is not None:
            ABSORBED_ENTRIES.labels(label).inc()
    for finding in shown:
        message = finding.describe(currency)
        log.warning(
            "cost absorbed",
            extra={"customer": target.customer_id, "budget": target.ref, "detail": message},
        )
        if notifier is not None:
            await notifier.tell(target, REASON, message, alert_fields=finding.fields(currency))
    if rest and notifier is not None:
        amount = sum(f.amount for f in rest)
        unit = f" {currency}" if currency else ""
        message = (
            f"and {len(rest)} more ledger entries absorbed {format_amount(amount)}{unit} above"
            " their bounds (not charged): `spendgate ledger --kind absorbed` lists them"
        )
        await notifier.tell(
            target,
            REASON,
            message,
            alert_fields={
                "absorbed": format_amount(amount),
                "entries": len(rest),
                "currency": currency,
            },
        )
    await mark_reported(redis, target.customer_id, last, total)
    return findings


__all__ = [
    "ABSORBED_ENTRIES",
    "ABSORBED_MICROS",
    "MAX_REPORTS",
    "REASON",
    "Finding",
    "mark_reported",
    "new_findings",
    "report_absorbed",
    "reported_key",
]
