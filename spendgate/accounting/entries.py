"""Ledger entries as typed records: parsing the stream, filtering, paging and following it.

The field names are a versioned contract, documented in ``docs/ledger.md``
(``LEDGER_SCHEMA_VERSION``). Entry times are the ``ts`` field (the script's clock, Redis'
``TIME`` in production); a stream id is never earlier than its ``ts``, so a time range can
start its scan at the range's first millisecond.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..budget_tree import tree_keys
from ..money import format_amount

LEDGER_SCHEMA_VERSION = 1
PAGE = 1000

# Every kind a ledger entry can have today. Unknown kinds are kept and shown as they are:
# a newer writer may add one before this reader knows it. "absorbed" selects usage entries
# whose cost went beyond the request's bound (the excess is their ``absorbed`` field).
KINDS = ("fund", "adjust", "usage", "absorbed")

# Fields with a meaning of their own in an entry; everything else stays in ``extra``.
_MONEY_FIELDS = ("cost", "estimate", "absorbed", "amount", "balance")
_INT_FIELDS = ("input_tokens", "output_tokens", "upstream_ms")
_TEXT_FIELDS = (
    "request_id", "funding_id", "key", "model", "outcome", "pod", "rule", "source", "note",
)  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _int(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger stream entry. Money fields are micro-units; absent fields are None/""."""

    id: str
    kind: str
    ts_ms: int
    request_id: str = ""
    funding_id: str = ""
    key: str = ""
    model: str = ""
    outcome: str = ""
    pod: str = ""
    rule: str = ""
    source: str = ""
    note: str = ""
    cost: int | None = None
    estimate: int | None = None
    absorbed: int | None = None
    amount: int | None = None
    balance: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    upstream_ms: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def balance_change(self) -> int:
        """What this entry did to the balance: +amount for money in, -cost for usage."""
        if self.kind == "usage":
            return -(self.cost or 0)
        if self.kind in ("fund", "adjust"):
            return self.amount or 0
        return 0

    def to_json(self, customer_id: str, currency: str | None) -> dict[str, Any]:
        """The entry as documented in docs/ledger.md: amounts as exact decimal strings."""
        out: dict[str, Any] = {
            "v": LEDGER_SCHEMA_VERSION,
            "id": self.id,
            "customer": customer_id,
            "kind": self.kind,
            "ts": self.ts_ms,
            "currency": currency,
        }
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = value
        for name in _MONEY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = format_amount(value)
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.extra:
            out["extra"] = dict(sorted(self.extra.items()))
        return out


def parse_entry(entry_id: Any, raw: Mapping[Any, Any]) -> LedgerEntry:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    eid = _text(entry_id)
    kind = fields.pop("type", "") or "unknown"
    ts = _int(fields.pop("ts", None))
    values: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if name in fields:
            values[name] = fields.pop(name)
    for name in (*_MONEY_FIELDS, *_INT_FIELDS):
        if name in fields:
            number = _int(fields[name])
            if number is not None:
                values[name] = number
                del fields[name]
    return LedgerEntry(
        id=eid, kind=kind, ts_ms=ts if ts is not None else entry_ms(eid), extra=fields, **values
    )


@dataclass(frozen=True)
class EntryFilter:
    """Which entries to show; empty collections mean "any"."""

    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    keys: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()

    def matches(self, entry: LedgerEntry) -> bool:
        if self.since_ms is not None and entry.ts_ms < self.since_ms:
            return False
        if self.until_ms is not None and entry.ts_ms >= self.until_ms:
            return False
        over_bound = "absorbed" in self.kinds and entry.kind == "usage" and bool(entry.absorbed)
        if self.kinds and entry.kind not in self.kinds and not over_bound:
            return False
        if self.keys and entry.key not in self.keys:
            return False
        return not self.models or entry.model in self.models

    @property
    def scan_start(self) -> str:
        return "-" if self.since_ms is None else f"{max(self.since_ms, 0)}-0"


def make_filter(
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    keys: Iterable[str] = (),
    models: Iterable[str] = (),
    kinds: Iterable[str] = (),
) -> EntryFilter:
    return EntryFilter(since_ms, until_ms, frozenset(keys), frozenset(models), frozenset(kinds))


async def scan(
    redis: Any, customer_id: str, start: str = "-", *, page: int = PAGE
) -> AsyncIterator[LedgerEntry]:
    """Every retained entry from ``start`` (an id, inclusive, or "-"), oldest first, paged."""
    ledger = (await tree_keys(redis, customer_id)).ledger
    low = start
    while True:
        batch = await redis.xrange(ledger, min=low, max="+", count=page)
        for entry_id, raw in batch:
            yield parse_entry(entry_id, raw)
        if len(batch) < page:
            return
        low = f"({_text(batch[-1][0])}"


async def read_entries(
    redis: Any, customer_id: str, selection: EntryFilter, *, limit: int | None = None
) -> AsyncIterator[LedgerEntry]:
    """Matching entries, oldest first; with ``limit``, only the newest ``limit`` of them."""
    if limit is None:
        async for entry in scan(redis, customer_id, selection.scan_start):
            if selection.matches(entry):
                yield entry
        return
    newest: list[LedgerEntry] = []
    async for entry in scan(redis, customer_id, selection.scan_start):
        if selection.matches(entry):
            newest.append(entry)
            if len(newest) > limit:
                del newest[0]
    for entry in newest:
        yield entry


async def last_id(redis: Any, customer_id: str) -> str:
    """The newest entry's id ("0-0" for an empty ledger): where ``follow`` starts."""
    newest = await redis.xrevrange((await tree_keys(redis, customer_id)).ledger, count=1)
    return _text(newest[0][0]) if newest else "0-0"


async def follow(
    redis: Any,
    customer_id: str,
    selection: EntryFilter,
    after_id: str,
    *,
    block_ms: int = 1000,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[LedgerEntry]:
    """New matching entries after ``after_id`` as they are appended, until ``stop`` is set."""
    ledger = (await tree_keys(redis, customer_id)).ledger
    cursor = after_id
    while stop is None or not stop.is_set():
        answer = await redis.xread({ledger: cursor}, count=PAGE, block=block_ms)
        for _stream, batch in answer or []:
            for entry_id, raw in batch:
                cursor = _text(entry_id)
                entry = parse_entry(entry_id, raw)
                if selection.matches(entry):
                    yield entry
