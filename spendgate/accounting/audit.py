"""The audit: does a customer's money add up, to the micro-unit?

For each customer, from one atomic snapshot of its Redis state plus the ledger up to it:

- ``balance``: balance = funded + adjusted + opening balances (spec) - charged (account totals);
- ``ledger``: each of those totals = the ledger base (what trimming removed, see ``trim``) + the
  entries the ledger still holds; ``ledger_gap``: no entry left without being counted;
- ``held``: held = the sum of live holds; ``hold_index``: holds and their deadlines agree;
- ``duplicate_usage``: every usage entry has its own request id;
- ``stripe_export`` (Stripe-linked budgets): usage the exporter sent or dead-lettered =
  usage settled up to the exporter's cursor; the export lag is reported alongside.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..budget_tree import tree_keys
from ..keys import STRIPE_EXPORT_CURSORS, for_customer
from ..money import format_amount
from .abnormal import state_key
from .entries import LedgerEntry, entry_ms, scan

TRIM_BATCH = 5_000
AUDIT_ATTEMPTS = 10


def ledger_base_key(customer_id: str) -> str:
    """Hash: totals of the entries trimmed from the ledger (funded, adjusted, spec, charged,
    absorbed, entries) and ``upto``, the last trimmed id."""
    return f"{for_customer(customer_id).tag}:ledger:base"


def exported_key(customer_id: str) -> str:
    """Hash written by the Stripe exporter: ``cursor``, ``sent`` and ``rejected`` (micro-units
    of usage accepted / permanently refused by Stripe up to the cursor)."""
    return f"{for_customer(customer_id).tag}:exported"


def _script(name: str) -> str:
    return resources.files("spendgate.accounting").joinpath(f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def trim_ledger(redis: Any, customer_id: str, minid: str) -> int:
    """Remove entries older than ``minid``, counting them into the ledger base; returns how
    many. The only way spendgate trims a ledger, so the audit still sees the whole history."""
    tree = await tree_keys(redis, customer_id)
    keys = [tree.ledger, f"{tree.tag}:ledger:base", state_key(tree)]
    script = redis.register_script(_script("trim"))
    removed = 0
    while True:
        count, done = await script(keys=keys, args=[minid, TRIM_BATCH])
        removed += int(count)
        if int(done):
            return removed


@dataclass(frozen=True)
class Mismatch:
    check: str
    message: str


@dataclass
class CustomerAudit:
    customer_id: str
    currency: str | None
    mismatches: list[Mismatch] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def fail(self, check: str, message: str) -> None:
        self.mismatches.append(Mismatch(check, message))

    def to_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer_id,
            "currency": self.currency,
            "ok": self.ok,
            "mismatches": [{"check": m.check, "message": m.message} for m in self.mismatches],
            **self.figures,
        }


@dataclass
class _Sums:
    funded: int = 0
    adjusted: int = 0
    spec: int = 0
    charged: int = 0
    absorbed: int = 0
    entries: int = 0

    def add(self, entry: LedgerEntry) -> None:
        self.entries += 1
        if entry.kind == "usage":
            self.charged += entry.cost or 0
            self.absorbed += entry.absorbed or 0
        elif entry.kind == "fund":
            self.funded += entry.amount or 0
        elif entry.kind == "adjust" and entry.source == "spec":
            self.spec += entry.amount or 0
        elif entry.kind == "adjust":
            self.adjusted += entry.amount or 0
        elif entry.kind == "absorbed":
            self.absorbed += entry.amount if entry.amount is not None else entry.cost or 0


def _held_here(hold: str) -> bool:
    """A hold record is ``amount|deadline|key|estimate``; an ancestor's copy of a hold taken
    below it names ``origin/key`` and has no deadline of its own."""
    parts = hold.split("|")
    return len(parts) < 3 or "/" not in parts[2]


def _money(value: int) -> str:
    return format_amount(value)


async def _snapshot(redis: Any, customer_id: str) -> list[Any]:
    keys = await tree_keys(redis, customer_id)  # a budget in a tree: under its root's tag
    script = redis.register_script(_script("snapshot"))
    names = [
        keys.acct,
        keys.holds,
        keys.deadlines,
        keys.ledger,
        f"{keys.tag}:ledger:base",
        f"{keys.tag}:stripe",
        f"{keys.tag}:exported",
    ]
    return list(await script(keys=names, args=[]))


async def audit_customer(
    redis: Any, customer_id: str, currency: str | None, *, now_ms: int
) -> CustomerAudit:
    """Check every invariant of one customer; read again if the ledger was trimmed while it
    was being read (the exporter trims concurrently)."""
    for attempt in range(AUDIT_ATTEMPTS):
        audit, base_upto = await _audit_once(redis, customer_id, currency, now_ms)
        after = await redis.hget(f"{(await tree_keys(redis, customer_id)).tag}:ledger:base", "upto")
        if (_text(after) if after is not None else "") == base_upto:
            return audit
        await asyncio.sleep(0.02 * (attempt + 1))
    audit.fail(
        "inconclusive",
        f"the ledger was trimmed during each of {AUDIT_ATTEMPTS} attempts to read it",
    )
    return audit


async def _audit_once(
    redis: Any, customer_id: str, currency: str | None, now_ms: int
) -> tuple[CustomerAudit, str]:
    (
        acct_raw,
        holds_raw,
        deadlines,
        _length,
        added,
        last,
        base_raw,
        linked,
        exp_raw,
    ) = await _snapshot(redis, customer_id)
    audit = CustomerAudit(customer_id, currency)
    acct = {k: int(v) for k, v in _pairs(acct_raw).items() if v.lstrip("-").isdigit()}
    base = _pairs(base_raw)
    base_sums = _Sums(
        **{name: int(base.get(name, 0)) for name in _Sums.__dataclass_fields__},
    )
    last_id = _text(last)

    # Account totals.
    balance = acct.get("balance", 0)
    funded, adjusted, spec = (
        acct.get("funded", 0),
        acct.get("adjusted", 0),
        acct.get("spec_granted", 0),
    )
    charged = acct.get("charged", 0)
    expected = funded + adjusted + spec - charged
    if balance != expected:
        audit.fail(
            "balance",
            f"balance {_money(balance)} != funded {_money(funded)} + adjusted {_money(adjusted)}"
            f" + opening {_money(spec)} - charged {_money(charged)} = {_money(expected)}"
            f" (off by {_money(balance - expected)})",
        )

    # The ledger, up to the snapshot.
    retained = _Sums()
    usage_ids: Counter[str] = Counter()
    settled_upto: list[tuple[tuple[int, int], int]] = []
    oldest_unexported: int | None = None
    exp = _pairs(exp_raw)
    cursor_raw = await redis.hget(STRIPE_EXPORT_CURSORS, customer_id) if linked else None
    cursor = exp.get("cursor") or (_text(cursor_raw) if cursor_raw is not None else "")
    cursor_key = _id_key(cursor) if cursor else (-1, -1)
    last_key = _id_key(last_id)
    async for entry in scan(redis, customer_id):
        key = _id_key(entry.id)
        if key > last_key:
            break
        retained.add(entry)
        if entry.kind == "usage":
            usage_ids[entry.request_id] += 1
            if linked and (entry.cost or 0) > 0:
                settled_upto.append((key, entry.cost or 0))
                if key > cursor_key and oldest_unexported is None:
                    oldest_unexported = entry_ms(entry.id)
    for name, account_value in (
        ("funded", funded),
        ("adjusted", adjusted),
        ("spec", spec),
        ("charged", charged),
        ("absorbed", acct.get("absorbed", 0)),
    ):
        on_ledger = getattr(base_sums, name) + getattr(retained, name)
        if on_ledger != account_value:
            label = "opening" if name == "spec" else name
            audit.fail(
                "ledger",
                f"{label} on the ledger {_money(on_ledger)} != account {_money(account_value)}"
                f" (off by {_money(account_value - on_ledger)})",
            )
    counted = base_sums.entries + retained.entries
    if int(added) != counted:
        audit.fail(
            "ledger_gap",
            f"{int(added)} entries were appended but {counted} are accounted for"
            f" ({base_sums.entries} trimmed into the base, {retained.entries} retained):"
            " entries were removed without being counted",
        )

    # Holds.
    holds = _pairs(holds_raw)
    hold_sum = 0
    for rid, value in holds.items():
        amount = value.split("|", 1)[0]
        if not amount.isdigit():
            audit.fail("held", f"hold {rid} is malformed: {value!r}")
            continue
        hold_sum += int(amount)
    held = acct.get("held", 0)
    if held != hold_sum:
        audit.fail(
            "held",
            f"held {_money(held)} != sum of {len(holds)} live holds {_money(hold_sum)}"
            f" (off by {_money(held - hold_sum)})",
        )
    indexed = {_text(rid) for rid in deadlines}
    # A hold taken for a budget below this one ("origin/key") has its deadline there.
    own = {rid for rid, value in holds.items() if _held_here(value)}
    if indexed != own:
        missing = sorted(own - indexed)[:5]
        orphans = sorted(indexed - own)[:5]
        audit.fail(
            "hold_index",
            f"holds without a deadline: {missing or 'none'}; deadlines without a hold:"
            f" {orphans or 'none'}",
        )

    # Unique usage.
    duplicates = sorted(rid for rid, n in usage_ids.items() if n > 1)
    if duplicates:
        shown = ", ".join(f"{rid} ({usage_ids[rid]}x)" for rid in duplicates[:10])
        audit.fail(
            "duplicate_usage", f"{len(duplicates)} request ids settled more than once: {shown}"
        )

    audit.figures = {
        "balance": _money(balance),
        "held": _money(held),
        "funded": _money(funded),
        "adjusted": _money(adjusted),
        "opening": _money(spec),
        "charged": _money(charged),
        "absorbed": _money(acct.get("absorbed", 0)),
        "liveHolds": len(holds),
        "entries": {"retained": retained.entries, "trimmed": base_sums.entries},
    }
    if linked:
        _audit_stripe(audit, base_sums, settled_upto, cursor, exp, oldest_unexported, now_ms)
    return audit, base.get("upto", "")


def _audit_stripe(
    audit: CustomerAudit,
    base_sums: _Sums,
    settled_upto: list[tuple[tuple[int, int], int]],
    cursor: str,
    exported: dict[str, str],
    oldest_unexported: int | None,
    now_ms: int,
) -> None:
    lag_s = 0.0 if oldest_unexported is None else max(0.0, (now_ms - oldest_unexported) / 1000)
    figures: dict[str, Any] = {"cursor": cursor or None, "lagSeconds": round(lag_s, 3)}
    if "cursor" in exported:
        cursor_key = _id_key(exported["cursor"])
        settled = base_sums.charged + sum(c for key, c in settled_upto if key <= cursor_key)
        sent, rejected = int(exported.get("sent", 0)), int(exported.get("rejected", 0))
        figures.update(
            settledUpToCursor=_money(settled), exported=_money(sent), rejected=_money(rejected)
        )
        if sent + rejected != settled:
            audit.fail(
                "stripe_export",
                f"usage settled up to the export cursor {exported['cursor']} is"
                f" {_money(settled)}, but {_money(sent)} was exported and {_money(rejected)}"
                f" rejected (off by {_money(settled - sent - rejected)})",
            )
    audit.figures["stripe"] = figures


async def record_export(
    redis: Any, customer_id: str, cursor: str, sent: int, rejected: int
) -> None:
    """The exporter's totals (micro-units of usage Stripe accepted / refused for good), moved
    with its cursor in one write. Only the leader's exporter writes it."""
    key = exported_key(customer_id)
    old = _pairs([item for pair in (await redis.hgetall(key)).items() for item in pair])
    await redis.hset(
        key,
        mapping={
            "cursor": cursor,
            "sent": int(old.get("sent", 0)) + sent,
            "rejected": int(old.get("rejected", 0)) + rejected,
        },
    )
