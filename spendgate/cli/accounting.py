"""``spendgate ledger | usage | audit | resume``: reading and checking the money.

Wired into ``spendgate.cli`` by ``add_commands``; the logic is in ``spendgate.accounting``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from .. import cli
from ..accounting import abnormal
from ..accounting.audit import audit_customer
from ..accounting.entries import KINDS, LedgerEntry, follow, last_id, make_filter, read_entries
from ..accounting.settlement import InFlight, SettleTimeout, in_flight, wait_settled
from ..accounting.usage import GROUPS, UsageError, rows_csv, rows_json, rows_table, usage_rows
from ..config_store import ConfigStore
from ..durations import parse_duration
from ..keys import check_customer_id
from ..ledger import Ledger
from ..money import format_amount

AUDIT_MISMATCH_EXIT = 3


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_time(text: str, *, now: int, flag: str) -> int:
    """An instant: ISO 8601 (``2026-12-01``, ``2026-12-01T10:00Z``; UTC unless it says
    otherwise), ``now``, or a duration ago (``90m``, ``24h``, ``7d``)."""
    if text == "now":
        return now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise cli.UsageError(
            f"{flag} {text!r}: expected an ISO 8601 time like 2026-12-01T10:00Z, 'now',"
            " or a duration ago like 24h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _customer(text: str) -> str:
    try:
        return check_customer_id(text)
    except ValueError as error:
        raise cli.UsageError(str(error)) from None


def _range(ns: argparse.Namespace, now: int) -> tuple[int | None, int | None]:
    since = parse_time(ns.since, now=now, flag="--since") if ns.since else None
    until = parse_time(ns.until, now=now, flag="--until") if ns.until else None
    if since is not None and until is not None and since >= until:
        raise cli.UsageError("--since must be before --until")
    return since, until


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# --------------------------------------------------------------------------- ledger


def entry_line(entry: LedgerEntry, currency: str | None) -> str:
    unit = f" {currency}" if currency else ""
    parts = [_iso(entry.ts_ms), f"{entry.kind:<7}"]
    if entry.kind == "usage":
        parts.append(f"-{format_amount(entry.cost or 0)}{unit}")
        parts.append(f"request={entry.request_id}")
        if entry.key:
            parts.append(f"key={entry.key}")
        if entry.model:
            parts.append(f"model={entry.model}")
        parts.append(f"tokens={entry.input_tokens or 0}/{entry.output_tokens or 0}")
        if entry.outcome and entry.outcome != "ok":
            parts.append(f"outcome={entry.outcome}")
    else:
        amount = entry.amount if entry.amount is not None else entry.cost or 0
        sign = "+" if amount > 0 and entry.kind != "absorbed" else ""
        parts.append(f"{sign}{format_amount(amount)}{unit}")
        if entry.funding_id:
            parts.append(f"id={entry.funding_id}")
        if entry.request_id:
            parts.append(f"request={entry.request_id}")
        if entry.balance is not None:
            parts.append(f"balance={format_amount(entry.balance)}")
        if entry.source:
            parts.append(f"source={entry.source}")
        if entry.note:
            parts.append(f"note={json.dumps(entry.note)}")
    return "  ".join(parts)


async def cmd_ledger(ns: argparse.Namespace) -> int:
    customer = _customer(ns.customer)
    since, until = _range(ns, now_ms())
    unknown = sorted(set(ns.kind or ()) - set(KINDS))
    if unknown:
        raise cli.UsageError(f"--kind {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    if ns.limit is not None and ns.limit <= 0:
        raise cli.UsageError("--limit must be positive")
    if ns.follow and until is not None:
        raise cli.UsageError("--follow cannot be combined with --until")
    selection = make_filter(
        since_ms=since, until_ms=until, keys=ns.key or (), models=ns.model or (),
        kinds=ns.kind or (),
    )  # fmt: skip

    def show(entry: LedgerEntry) -> None:
        if ns.json:
            print(json.dumps(entry.to_json(customer, currency)), flush=ns.follow)
        else:
            print(entry_line(entry, currency), flush=ns.follow)

    async with cli.connect(ns) as client:
        account = await cli._configured(Ledger(client), customer)
        currency = account.currency
        start = await last_id(client, customer)
        async for entry in read_entries(client, customer, selection, limit=ns.limit):
            show(entry)
        if ns.follow:
            async for entry in follow(client, customer, selection, start):
                show(entry)
    return 0


# --------------------------------------------------------------------------- usage


async def _currencies(client: Any, customers: list[str]) -> list[tuple[str, str | None]]:
    ledger = Ledger(client)
    found = []
    for customer in customers:
        account = await ledger.account(customer)
        if not account.configured:
            raise cli.Failure(f"unknown customer {customer!r}: no CustomerBudget configures it")
        found.append((customer, account.currency))
    return found


async def _all_customers(client: Any) -> list[str]:
    return sorted(await ConfigStore(client).list_customers())


async def cmd_usage(ns: argparse.Namespace) -> int:
    customers = [_customer(c) for c in ns.customers]
    now = now_ms()
    since, until = _range(ns, now)
    if since is None:
        since = now - parse_duration("24h")
    groups = [g.strip() for g in (ns.by or "customer").split(",") if g.strip()]
    selection = make_filter(
        since_ms=since, until_ms=until, keys=ns.key or (), models=ns.model or ()
    )
    async with cli.connect(ns) as client:
        pairs = await _currencies(client, customers or await _all_customers(client))
        try:
            rows = await usage_rows(client, pairs, selection, groups, now_ms=now)
        except UsageError as error:
            raise cli.UsageError(str(error)) from None
    if ns.format == "json":
        sys.stdout.write(rows_json(rows))
    elif ns.format == "csv":
        sys.stdout.write(rows_csv(rows, groups))
    else:
        window = f"{_iso(since)} .. {_iso(until) if until is not None else 'now'}"
        print(f"usage {window}")
        sys.stdout.write(rows_table(rows, groups))
    return 0


# --------------------------------------------------------------------------- audit


async def cmd_audit(ns: argparse.Namespace) -> int:
    customers = [_customer(c) for c in ns.customers]
    now = now_ms()
    async with cli.connect(ns) as client:
        pairs = await _currencies(client, customers or await _all_customers(client))
        audits = [await audit_customer(client, c, cur, now_ms=now) for c, cur in pairs]
    for audit in audits:
        if ns.json:
            print(json.dumps(audit.to_json()))
            continue
        unit = f" {audit.currency}" if audit.currency else ""
        figures = audit.figures
        verdict = "ok" if audit.ok else f"MISMATCH ({len(audit.mismatches)})"
        print(
            f"{audit.customer_id}: {verdict}  balance {figures['balance']}{unit}"
            f"  held {figures['held']}{unit} in {figures['liveHolds']} holds"
            f"  entries {figures['entries']['retained']} (+{figures['entries']['trimmed']}"
            " trimmed)"
        )
        stripe = figures.get("stripe")
        if stripe is not None:
            exported = stripe.get("exported")
            shown = f"exported {exported}{unit}" if exported is not None else "no export totals"
            print(f"  stripe: {shown}, cursor {stripe['cursor']}, lag {stripe['lagSeconds']} s")
        for mismatch in audit.mismatches:
            print(f"  {mismatch.check}: {mismatch.message}")
    failed = [a.customer_id for a in audits if not a.ok]
    if failed:
        print(f"spendgate audit: mismatch for {', '.join(failed)}", file=sys.stderr)
        return AUDIT_MISMATCH_EXIT
    return 0


# --------------------------------------------------------------------------- resume


async def cmd_resume(ns: argparse.Namespace) -> int:
    customer = _customer(ns.customer)
    async with cli.connect(ns) as client:
        ledger = Ledger(client)
        await cli._configured(ledger, customer)
        lifted = await abnormal.resume(client, customer, now_ms())
        others = (await ledger.account(customer)).suspensions
    if lifted:
        print(f"{customer}: abnormal-spend suspension lifted")
    else:
        print(f"{customer}: was not suspended for abnormal spend; nothing lifted")
    if others:
        listed = "; ".join(f"{source}: {reason}" for source, reason in sorted(others.items()))
        print(f"{customer}: still suspended ({listed})")
    return 0


# --------------------------------------------------------------------------- balance


def in_flight_report(state: InFlight) -> dict[str, Any]:
    """The ``inFlight`` part of ``spendgate balance``."""
    return {
        "pendingSettlements": state.holds,
        "pendingHeld": format_amount(state.held),
        "expiredHolds": state.expired_holds,
        "unreconciledCharges": state.unreconciled_count,
        "unreconciledAmount": format_amount(state.unreconciled_amount),
        "unreconciledBy": [
            {
                "pod": w.pod,
                "charges": w.count,
                "amount": format_amount(w.amount),
                "since": _iso(w.oldest_ms),
                "reported": _iso(w.updated_ms),
            }
            for w in state.unreconciled
        ],
        "settled": state.settled,
    }


def in_flight_lines(report: dict[str, Any], unit: str) -> list[str]:
    pending = f"{report['pendingSettlements']} requests holding {report['pendingHeld']}{unit}"
    if report["expiredHolds"]:
        pending += f" (+{report['expiredHolds']} expired holds awaiting release)"
    lines = [f"{'in flight':<11} {pending}"]
    waiting = f"{report['unreconciledCharges']} charges, {report['unreconciledAmount']}{unit}"
    lines.append(f"{'unreconciled':<11} {waiting}")
    for item in report["unreconciledBy"]:
        lines.append(f"{'':<11}   {item['pod']}: {item['charges']} since {item['since']}")
    return lines


# --------------------------------------------------------------------------- parsers


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="TIME", help="ISO 8601 time (UTC by default) or a duration ago: 24h"
    )
    parser.add_argument("--until", metavar="TIME", help="exclusive end; same forms as --since")
    parser.add_argument("--key", action="append", metavar="NAME", help="API key name, repeatable")
    parser.add_argument("--model", action="append", metavar="MODEL", help="repeatable")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    ledger = sub.add_parser("ledger", parents=[common], help="show a customer's ledger entries")
    ledger.add_argument("customer", metavar="CUSTOMER", help="customerId")
    _add_filters(ledger)
    ledger.add_argument("--kind", action="append", choices=KINDS, help="entry kind, repeatable")
    ledger.add_argument("--limit", type=int, metavar="N", help="only the newest N entries")
    ledger.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    ledger.add_argument("--json", action="store_true", help="one JSON object per line")

    usage = sub.add_parser("usage", parents=[common], help="usage totals for a time range")
    usage.add_argument(
        "customers", nargs="*", metavar="CUSTOMER", help="customerIds (default: all)"
    )
    _add_filters(usage)
    usage.add_argument(
        "--by",
        metavar="GROUPS",
        help=f"comma-separated, from {','.join(GROUPS)} (default customer)",
    )
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table")

    audit = sub.add_parser(
        "audit",
        parents=[common],
        help=f"check that the money adds up (exit {AUDIT_MISMATCH_EXIT} on a mismatch)",
    )
    audit.add_argument("customers", nargs="*", metavar="CUSTOMER", help="default: all")
    audit.add_argument("--json", action="store_true", help="one JSON object per customer")

    resume = sub.add_parser("resume", parents=[common], help="lift an abnormal-spend suspension")
    resume.add_argument("customer", metavar="CUSTOMER", help="customerId")


COMMANDS = {"ledger": cmd_ledger, "usage": cmd_usage, "audit": cmd_audit, "resume": cmd_resume}

__all__ = ["COMMANDS", "add_commands", "in_flight_lines", "in_flight_report"]


async def settlement_state(client: Any, ns: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """``spendgate balance``'s in-flight report, after waiting if ``--wait-settled``."""
    if not ns.wait_settled:
        return in_flight_report(await in_flight(client, ns.customer, now_ms())), True
    try:
        timeout_s = parse_duration(ns.timeout) / 1000
    except ValueError as error:
        raise cli.UsageError(f"--timeout: {error}") from None
    try:
        state = await wait_settled(client, ns.customer, timeout_s)
    except SettleTimeout as timeout:
        return in_flight_report(timeout.state), False
    return in_flight_report(state), True
