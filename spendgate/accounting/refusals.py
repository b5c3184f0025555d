"""Refusal counters: how many requests a customer's keys had refused, by hour, reason and key.

Refusals never touch the balance, so they are not on the ledger. The sidecar counts them in
memory and adds its counts here in one pipelined round trip per flush (see
``spendgate.sidecar.refusal_counts``); a refused request therefore costs the hot path nothing.

Layout: ``sg:{c}:refusals:<hour start ms>`` hashes (a budget in a tree: under its root's tag,
``sg:{root}@c:refusals:...``), field ``reason\\tkey\\tmodel`` -> count,
expiring ``RETENTION_MS`` after their hour. A crashed sidecar loses at most one flush interval
of counts: they are statistics, not money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..budget_tree import TreeIndex, tree_keys

HOUR_MS = 3_600_000
RETENTION_MS = 35 * 86_400_000
MAX_HOURS_READ = RETENTION_MS // HOUR_MS + 1


@dataclass(frozen=True)
class RefusalKey:
    customer_id: str
    hour_ms: int
    reason: str
    key: str = ""
    model: str = ""

    @property
    def field(self) -> str:
        return "\t".join((self.reason, self.key, self.model))


def hour_of(ms: int) -> int:
    return ms - ms % HOUR_MS


async def add_refusals(redis: Any, counts: Mapping[RefusalKey, int], tree: TreeIndex) -> None:
    """Add counts (from one flush) in a single pipeline; each customer's keys share a slot.
    ``tree`` names where each customer sits (one read for those it has not cached)."""
    if not counts:
        return
    keys = await tree.keys_of_many(refusal.customer_id for refusal in counts)
    pipe = redis.pipeline(transaction=False)
    touched: set[str] = set()
    for refusal, count in counts.items():
        name = keys[refusal.customer_id].refusals(refusal.hour_ms)
        pipe.hincrby(name, refusal.field, count)
        if name not in touched:
            touched.add(name)
            pipe.pexpireat(name, refusal.hour_ms + HOUR_MS + RETENTION_MS)
    await pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_refusals(
    redis: Any, customer_id: str, since_ms: int, until_ms: int
) -> list[tuple[RefusalKey, int]]:
    """Counts of every hour that overlaps [since, until), at most the retention window."""
    first = hour_of(max(since_ms, until_ms - MAX_HOURS_READ * HOUR_MS))
    hours = list(range(first, until_ms, HOUR_MS))
    if not hours:
        return []
    keys = await tree_keys(redis, customer_id)
    pipe = redis.pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(keys.refusals(hour))
    found: list[tuple[RefusalKey, int]] = []
    for hour, raw in zip(hours, await pipe.execute(), strict=True):
        for name, count in raw.items():
            reason, _, rest = _text(name).partition("\t")
            key, _, model = rest.partition("\t")
            found.append((RefusalKey(customer_id, hour, reason, key, model), int(_text(count))))
    return found
