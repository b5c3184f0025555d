"""Bounded fail-open: how much a customer may be served unreserved while Redis is unreachable.

Each sidecar process gives every customer at most ``--fail-open-allowance`` (micro-units of
the customer's own budget currency) of requests served without a reservation and not yet on
the ledger. A request counts its *upper bound* from the moment it is admitted, so the allowance
is a hard bound, not an estimate; once it ends, its actual cost (at most that bound) takes its
place, until the charge is settled. The allowance in use lives in the journal, so a restarted
sidecar does not start with a fresh one.
"""

from __future__ import annotations

import asyncio

from spendgate.pricing import Bound, PricingForm

from .journal import Journal, JournalError, key_of


def upper_bound(form: PricingForm, bound: Bound, timeout_ms: int) -> int:
    """The most a request served without a reservation can cost: its hold, or — when the hold
    is a window of GPU time that a reserved request would extend while it runs — the cost of
    all the time the rule's timeout allows (at most the rule's maximum)."""
    if bound.window_ms == 0 or bound.window_ms >= timeout_ms:
        return bound.hold
    try:
        return max(bound.hold, form.hold_for_ms(bound, bound.output_limit, timeout_ms))
    except ValueError:  # a bound expression that cannot price that much time
        return max(bound.hold, form.max_cost)


class FailOpenAllowance:
    def __init__(self, limit: int, journal: Journal) -> None:
        self.limit = limit
        self.journal = journal

    def used(self, customer: str) -> int:
        return self.journal.allowance_used.get(customer, 0)

    async def admit(self, customer: str, request_id: str, amount: int, now_ms: int) -> bool:
        """Take ``amount`` of the customer's allowance and journal it (fsync'd) before the
        request is served; False when it does not fit (an allowance of 0 admits nothing)."""
        # Check and take with no await in between: atomic among this process' requests.
        if self.limit <= 0 or amount > self.limit - self.used(customer):
            return False
        record = {"op": "open", "id": request_id, "customer": customer, "allowance": amount}
        written = self.journal.append({**record, "ts": now_ms})
        try:
            await asyncio.shield(written)
        except JournalError:
            # Not durable: give the allowance back and refuse rather than serve unrecorded.
            self.journal.append_soon({"op": "done", "id": request_id, "customer": customer})
            raise
        return True

    async def extend(self, customer: str, request_id: str, amount: int, now_ms: int) -> bool:
        """A reserved request whose hold cannot grow (Redis went away while it ran) goes on
        past its hold only within the allowance; released once its settle is on the ledger."""
        if self.limit <= 0 or amount > self.limit - self.used(customer):
            return False
        entry = self.journal.pending.get(key_of(customer, request_id))
        total = (entry.allowance if entry is not None else 0) + amount
        record = {"op": "open", "id": request_id, "customer": customer, "allowance": total}
        try:
            await asyncio.shield(self.journal.append({**record, "ts": now_ms}))
        except JournalError:
            return False  # counted in memory until the request settles, never served further
        return True
