"""Spend periods (UTC day, ISO week, month) as the Lua scripts compute them (prelude.lua)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from .ledger import Account

_DAY_MS = 86_400_000


def period_start_ms(period: str | None, now_ms: int) -> int:
    """Start (UTC) of the day, ISO week or month containing ``now_ms``; as the Lua prelude."""
    day = now_ms // _DAY_MS
    if period == "day":
        return day * _DAY_MS
    if period == "week":
        return (day - (day + 3) % 7) * _DAY_MS
    if period == "month":
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        return int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp()) * 1000
    return 0


def current_period(account: Account, now_ms: int) -> Account:
    """``account`` at ``now_ms``: nothing spent yet if a new period began since its last request
    (Redis resets ``spent`` and ``dspent`` lazily, at the first request of a period)."""
    if account.period and account.period_start_ms != period_start_ms(account.period, now_ms):
        return replace(account, spent=0, descendants_spent=0)
    return account


__all__ = ["current_period", "period_start_ms"]
