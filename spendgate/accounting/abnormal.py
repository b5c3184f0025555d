"""Abnormal spend: a customer spending far above its own normal, as a leaked key would.

The policy compares the spend of the last ``window`` (sliding, from per-minute buckets) with
the customer's baseline: a percentile of its *active* hours (hours with any spend) over the
last ``baseline_days`` before the window -- the median (50) or, the default, 90: traffic that
is ten times busier by day than by night then does not trip at nine in the morning. It trips
when the window's spend reaches ``minimum`` (so small customers never trip it) and exceeds
``factor`` times the baseline.
With fewer than ``min_active_hours`` hours of history there is no baseline and it does not
trip. After a person resumes the customer, only spend after the resume counts.

Spend buckets come from ``roll_up`` (run periodically by the operator's leader), which reads
the ledger after its own cursor; the ledger trimmer keeps what it has not read yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

from ..budget_tree import tree_keys
from ..keys import CustomerKeys
from ..money import format_amount

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
SUSPENSION_SOURCE = "abnormal-spend"
REASON = "AbnormalSpend"
ROLLUP_BATCH = 5_000


class Action(StrEnum):
    alert = "alert"
    suspend = "suspend"


@dataclass(frozen=True)
class AbnormalPolicy:
    action: Action = Action.alert
    minimum: int = 0  # micro-units the window must reach before anything trips
    factor: int = 5  # times the baseline
    percentile: int = 90  # of the active hours; 50 is the median
    window_ms: int = HOUR_MS
    baseline_days: int = 7
    min_active_hours: int = 24


@dataclass(frozen=True)
class Verdict:
    tripped: bool
    recent: int
    baseline: int | None
    threshold: int | None
    active_hours: int

    def describe(self, currency: str | None) -> str:
        unit = f" {currency}" if currency else ""
        if self.baseline is None:
            return (
                f"spent {format_amount(self.recent)}{unit} in the window; no baseline yet"
                f" ({self.active_hours} active hours of history)"
            )
        return (
            f"spent {format_amount(self.recent)}{unit} in the last window against a baseline of"
            f" {format_amount(self.baseline)}{unit} per hour (from {self.active_hours}"
            f" active hours); threshold {format_amount(self.threshold or 0)}{unit}"
        )


def evaluate(
    policy: AbnormalPolicy,
    minutes: Mapping[int, int],
    hours: Mapping[int, int],
    now_ms: int,
    *,
    counts_from_ms: int = 0,
) -> Verdict:
    """Pure: the verdict at ``now_ms`` from minute and hour spend buckets (start ms -> micros)."""
    # Minutes overlapping the window; after a resume, only whole minutes after it.
    recent = sum(
        cost
        for start, cost in minutes.items()
        if now_ms - policy.window_ms < start + MINUTE_MS
        and start <= now_ms
        and start >= counts_from_ms
    )
    baseline_end = now_ms - policy.window_ms
    baseline_end -= baseline_end % HOUR_MS  # complete hours only
    baseline_start = baseline_end - policy.baseline_days * 24 * HOUR_MS
    active = [
        cost for start, cost in hours.items() if baseline_start <= start < baseline_end and cost
    ]
    if len(active) < policy.min_active_hours:
        return Verdict(False, recent, None, None, len(active))
    active.sort()
    baseline = active[max(0, math.ceil(policy.percentile / 100 * len(active)) - 1)]
    threshold = max(policy.minimum, policy.factor * baseline)
    tripped = recent >= policy.minimum and recent > threshold
    return Verdict(tripped, recent, baseline, threshold, len(active))


# ----------------------------------------------------------------------------- Redis


# A budget in a tree keeps these under its tree's tag, next to its ledger and suspensions
# (``keys`` from ``spendgate.budget_tree.tree_keys``).


def state_key(keys: CustomerKeys) -> str:
    """Hash: ``cursor`` (rollup), ``resumed_ms``, ``tripped_ms``, ``alerted_ms``."""
    return f"{keys.tag}:abnormal"


def minute_buckets_key(keys: CustomerKeys) -> str:
    return f"{keys.tag}:spend:m"


def hour_buckets_key(keys: CustomerKeys) -> str:
    return f"{keys.tag}:spend:h"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def roll_up(redis: Any, customer_id: str, policy: AbnormalPolicy, now_ms: int) -> int:
    """Add the ledger's new usage into the spend buckets; returns entries read."""
    script = redis.register_script(
        resources.files("spendgate.accounting").joinpath("rollup.lua").read_text()
    )
    tree = await tree_keys(redis, customer_id)
    keys = [tree.ledger, state_key(tree), minute_buckets_key(tree), hour_buckets_key(tree)]
    keep_minutes = now_ms - 2 * policy.window_ms
    keep_hours = now_ms - (policy.baseline_days * 24 + 2) * HOUR_MS - policy.window_ms
    read = 0
    while True:
        count, done = await script(keys=keys, args=[ROLLUP_BATCH, keep_minutes, keep_hours])
        read += int(count)
        if int(done):
            return read


async def check(
    redis: Any, customer_id: str, policy: AbnormalPolicy, now_ms: int
) -> tuple[Verdict, dict[str, int]]:
    """Roll up, then evaluate; returns the verdict and the stored state (ms timestamps)."""
    await roll_up(redis, customer_id, policy, now_ms)
    keys = await tree_keys(redis, customer_id)
    minutes = await redis.hgetall(minute_buckets_key(keys))
    hours = await redis.hgetall(hour_buckets_key(keys))
    raw_state = await redis.hgetall(state_key(keys))
    state = {
        _text(k): int(_text(v))
        for k, v in raw_state.items()
        if _text(k).endswith("_ms") and _text(v).isdigit()
    }
    verdict = evaluate(
        policy,
        {int(_text(k)): int(_text(v)) for k, v in minutes.items()},
        {int(_text(k)): int(_text(v)) for k, v in hours.items()},
        now_ms,
        counts_from_ms=state.get("resumed_ms", 0),
    )
    return verdict, state


async def suspend(redis: Any, customer_id: str, message: str, now_ms: int) -> None:
    keys = await tree_keys(redis, customer_id)
    await redis.hset(keys.suspensions, SUSPENSION_SOURCE, message)
    await redis.hset(state_key(keys), "tripped_ms", now_ms)


async def mark_alerted(redis: Any, customer_id: str, now_ms: int) -> None:
    await redis.hset(state_key(await tree_keys(redis, customer_id)), "alerted_ms", now_ms)


async def resume(redis: Any, customer_id: str, now_ms: int) -> bool:
    """Lift an abnormal-spend suspension (a person decided); only spend after now counts
    towards the next trip. Returns whether the customer was suspended for abnormal spend."""
    keys = await tree_keys(redis, customer_id)
    removed = await redis.hdel(keys.suspensions, SUSPENSION_SOURCE)
    await redis.hset(state_key(keys), "resumed_ms", now_ms)
    await redis.hdel(state_key(keys), "tripped_ms", "alerted_ms")
    return bool(removed)


async def is_suspended(redis: Any, customer_id: str) -> str | None:
    reason = await redis.hget((await tree_keys(redis, customer_id)).suspensions, SUSPENSION_SOURCE)
    return _text(reason) if reason is not None else None
