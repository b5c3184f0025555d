"""What is still in flight for a customer: live holds and charges waiting to be reconciled.

- A live hold is a request admitted and not yet settled or released (it may be streaming).
- An *unreconciled* charge is one a sidecar has measured but could not settle yet: served
  fail-open while Redis was down, or a settle that failed after the response. Each sidecar
  reports its own per customer in ``sg:{c}:unreconciled`` (``CustomerKeys.unreconciled``,
  under the root's tag for a budget in a tree; field: pod, value
  ``count|amount|oldest ms|updated ms``) and clears it once everything is settled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..budget_tree import TreeIndex, tree_keys

UNRECONCILED_TTL_MS = 7 * 86_400_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Waiting:
    """Charges one sidecar (``pod``) holds for the customer, not yet on the ledger."""

    pod: str
    count: int
    amount: int
    oldest_ms: int
    updated_ms: int


@dataclass(frozen=True)
class InFlight:
    holds: int = 0
    held: int = 0
    expired_holds: int = 0  # past their deadline, released on the customer's next request
    oldest_hold_deadline_ms: int | None = None
    unreconciled: list[Waiting] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        return self.holds == 0 and not self.unreconciled

    @property
    def unreconciled_count(self) -> int:
        return sum(w.count for w in self.unreconciled)

    @property
    def unreconciled_amount(self) -> int:
        return sum(w.amount for w in self.unreconciled)


def _waiting(pod: str, raw: str) -> Waiting | None:
    parts = raw.split("|")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    count, amount, oldest, updated = (int(p) for p in parts)
    return Waiting(pod, count, amount, oldest, updated)


async def in_flight(redis: Any, customer_id: str, now_ms: int) -> InFlight:
    keys = await tree_keys(redis, customer_id)
    holds = await redis.hgetall(keys.holds)
    waiting_raw = await redis.hgetall(keys.unreconciled)
    live, expired, held, oldest = 0, 0, 0, None
    for value in holds.values():
        parts = _text(value).split("|")
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        amount, deadline = int(parts[0]), int(parts[1])
        if deadline <= now_ms:
            expired += 1
            continue
        live += 1
        held += amount
        oldest = deadline if oldest is None else min(oldest, deadline)
    waiting = [
        w
        for pod, raw in sorted(waiting_raw.items())
        if (w := _waiting(_text(pod), _text(raw))) is not None and w.count > 0
    ]
    return InFlight(live, held, expired, oldest, waiting)


async def report_unreconciled(
    redis: Any,
    pod: str,
    waiting: Mapping[str, tuple[int, int, int]],
    now_ms: int,
    tree: TreeIndex,
) -> None:
    """One sidecar's unreconciled charges per customer: ``(count, amount, oldest ms)``; a
    customer with nothing left waiting has its field removed. ``tree`` names where each
    customer sits."""
    keys = await tree.keys_of_many(waiting)
    pipe = redis.pipeline(transaction=False)
    for customer_id, (count, amount, oldest) in waiting.items():
        name = keys[customer_id].unreconciled
        if count <= 0:
            pipe.hdel(name, pod)
            continue
        pipe.hset(name, pod, f"{count}|{amount}|{oldest}|{now_ms}")
        pipe.pexpire(name, UNRECONCILED_TTL_MS)
    if waiting:
        await pipe.execute()


class SettleTimeout(TimeoutError):
    def __init__(self, state: InFlight, timeout_s: float) -> None:
        super().__init__(f"still in flight after {timeout_s:g} s")
        self.state = state


async def wait_settled(
    redis: Any,
    customer_id: str,
    timeout_s: float,
    *,
    poll_s: float = 0.2,
    now_ms: Callable[[], int] | None = None,
) -> InFlight:
    """Return once nothing is in flight for the customer; ``SettleTimeout`` after the timeout."""
    clock = now_ms or (lambda: int(time.time() * 1000))
    deadline = time.monotonic() + timeout_s
    while True:
        state = await in_flight(redis, customer_id, clock())
        if state.settled:
            return state
        left = deadline - time.monotonic()
        if left <= 0:
            raise SettleTimeout(state, timeout_s)
        await asyncio.sleep(min(poll_s, left))
