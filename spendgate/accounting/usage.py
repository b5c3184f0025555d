"""Usage totals: requests, tokens, cost and refusals, grouped by customer, key, model, time.

Settled usage comes from the ledger (``usage`` entries; what a model used beyond the
request's bound is their ``absorbed`` field, never part of the cost), refusals from the
per-hour counters of ``refusals``.
The numbers cover what the ledger retains: a Stripe-linked budget's ledger is trimmed after
export (see docs/ledger.md).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..money import format_amount
from .entries import EntryFilter, LedgerEntry, read_entries
from .refusals import HOUR_MS, read_refusals

GROUPS = ("customer", "key", "model", "day", "hour")
DAY_MS = 24 * HOUR_MS


class UsageError(ValueError):
    """A usage query that cannot be answered as asked."""


@dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0
    absorbed: int = 0
    refusals: dict[str, int] = field(default_factory=dict)

    def add_usage(self, entry: LedgerEntry) -> None:
        self.requests += 1
        self.input_tokens += entry.input_tokens or 0
        self.output_tokens += entry.output_tokens or 0
        self.cost += entry.cost or 0
        self.absorbed += entry.absorbed or 0

    def add_absorbed(self, entry: LedgerEntry) -> None:
        self.absorbed += entry.amount if entry.amount is not None else (entry.cost or 0)

    def add_refusals(self, reason: str, count: int) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + count

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())


@dataclass(frozen=True)
class UsageRow:
    group: dict[str, str]
    currency: str | None
    totals: Totals

    def to_json(self) -> dict[str, Any]:
        t = self.totals
        return {
            **self.group,
            "currency": self.currency,
            "requests": t.requests,
            "inputTokens": t.input_tokens,
            "outputTokens": t.output_tokens,
            "cost": format_amount(t.cost),
            "absorbed": format_amount(t.absorbed),
            "refused": t.refused,
            "refusals": dict(sorted(t.refusals.items())),
        }


def check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"cannot group by {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
    if "day" in groups and "hour" in groups:
        raise UsageError("group by day or by hour, not both")
    return tuple(dict.fromkeys(groups))


def _bucket(ms: int, size: int) -> str:
    start = datetime.fromtimestamp((ms - ms % size) / 1000, UTC)
    return start.strftime("%Y-%m-%d") if size == DAY_MS else start.strftime("%Y-%m-%dT%H:00Z")


def _group_of(
    groups: Sequence[str], customer: str, key: str, model: str, ms: int
) -> tuple[str, ...]:
    values = {"customer": customer, "key": key, "model": model}
    out = []
    for name in groups:
        if name == "day":
            out.append(_bucket(ms, DAY_MS))
        elif name == "hour":
            out.append(_bucket(ms, HOUR_MS))
        else:
            out.append(values[name])
    return tuple(out)


async def usage_rows(
    redis: Any,
    customers: Iterable[tuple[str, str | None]],
    selection: EntryFilter,
    groups: Sequence[str],
    *,
    now_ms: int,
) -> list[UsageRow]:
    """Totals per group for ``(customer, currency)`` pairs; rows sorted by their group."""
    groups = check_groups(groups)
    since = selection.since_ms if selection.since_ms is not None else 0
    until = selection.until_ms if selection.until_ms is not None else now_ms + 1
    table: dict[tuple[str, ...], tuple[str | None, Totals]] = {}

    def totals_for(group: tuple[str, ...], currency: str | None) -> Totals:
        if group not in table:
            table[group] = (currency, Totals())
        return table[group][1]

    money_kinds = {"usage", "absorbed"}  # "absorbed": a kind of its own in older ledgers
    wanted = money_kinds
    scan_filter = EntryFilter(
        selection.since_ms, selection.until_ms, selection.keys, selection.models, frozenset(wanted)
    )
    for customer, currency in customers:
        async for entry in read_entries(redis, customer, scan_filter):
            group = _group_of(groups, customer, entry.key, entry.model, entry.ts_ms)
            if "customer" not in groups and currency is not None:
                group = (*group, currency)  # never add up two currencies
            totals = totals_for(group, currency)
            if entry.kind == "usage":
                totals.add_usage(entry)
            else:
                totals.add_absorbed(entry)
        for refusal, count in await read_refusals(redis, customer, since, until):
            if selection.keys and refusal.key not in selection.keys:
                continue
            if selection.models and refusal.model not in selection.models:
                continue
            group = _group_of(groups, customer, refusal.key, refusal.model, refusal.hour_ms)
            if "customer" not in groups and currency is not None:
                group = (*group, currency)
            totals_for(group, currency).add_refusals(refusal.reason, count)
    rows = []
    for group in sorted(table):
        currency, totals = table[group]
        rows.append(UsageRow(dict(zip(groups, group, strict=False)), currency, totals))
    return rows


# ----------------------------------------------------------------------------- output


def rows_json(rows: Sequence[UsageRow]) -> str:
    return "".join(json.dumps(row.to_json()) + "\n" for row in rows)


def _flat(row: UsageRow, groups: Sequence[str], reasons: Sequence[str]) -> list[str]:
    data = row.to_json()
    values = [data.get(name, "") for name in groups]
    values += [
        data["currency"] or "",
        str(data["requests"]),
        str(data["inputTokens"]),
        str(data["outputTokens"]),
        data["cost"],
        data["absorbed"],
        str(data["refused"]),
    ]
    return values + [str(row.totals.refusals.get(reason, 0)) for reason in reasons]


def _header(groups: Sequence[str], reasons: Sequence[str]) -> list[str]:
    return [
        *groups,
        "currency",
        "requests",
        "input_tokens",
        "output_tokens",
        "cost",
        "absorbed",
        "refused",
        *(f"refused_{reason}" for reason in reasons),
    ]


def _reasons(rows: Sequence[UsageRow]) -> list[str]:
    return sorted({reason for row in rows for reason in row.totals.refusals})


def rows_csv(rows: Sequence[UsageRow], groups: Sequence[str]) -> str:
    reasons = _reasons(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_header(groups, reasons))
    for row in rows:
        writer.writerow(_flat(row, groups, reasons))
    return buffer.getvalue()


def rows_table(rows: Sequence[UsageRow], groups: Sequence[str]) -> str:
    reasons = _reasons(rows)
    header = _header(groups, reasons)
    body = [_flat(row, groups, reasons) for row in rows]
    if not body:
        return "no usage in this range\n"
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = set(range(len(groups) + 1, len(header)))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "".join(line(cells) + "\n" for cells in [header, *body])
