"""Where usage export stands in Redis: the cursor per customer (``sg:stripe:export``, the last
ledger entry handled), how far behind it is, and the dead letters of entries Stripe refused.
Written by :mod:`.exporter`; read by the budgets' status (``exportLagSeconds``) and the audit.
"""

from __future__ import annotations

import time
from typing import Any

from spendgate.keys import STRIPE_EXPORT_CURSORS, for_customer

EXPORT_CURSORS = STRIPE_EXPORT_CURSORS


def deadletter_key(customer_id: str) -> str:
    """The stream of a customer's usage entries Stripe rejected for good."""
    return f"{for_customer(customer_id).tag}:deadletter"


def text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_ms(entry_id: str) -> int:
    """The time (ms) in a stream entry id."""
    return int(entry_id.split("-", 1)[0])


async def export_lag_seconds(redis: Any, customer_id: str, now: float | None = None) -> float:
    """Seconds since the oldest ledger entry after the export cursor (0: all exported)."""
    now = time.time() if now is None else now
    cursor = await redis.hget(EXPORT_CURSORS, customer_id)
    start = f"({text(cursor)}" if cursor is not None else "-"
    entries = await redis.xrange(for_customer(customer_id).ledger, min=start, count=1)
    if not entries:
        return 0.0
    return max(0.0, now - entry_ms(text(entries[0][0])) / 1000)


__all__ = ["EXPORT_CURSORS", "deadletter_key", "entry_ms", "export_lag_seconds", "text"]
