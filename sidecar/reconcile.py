"""Charges that could not reach Redis yet, settled as soon as it is back.

They come from requests served in fail-open mode while Redis was down, and from settlements
that failed after the response was sent. Each one is in the journal (sidecar/journal.py) before
it is acknowledged, so a crash loses none: the next start replays it. ``settle`` charges even
without a hold and is idempotent by request id, so retrying — after a crash too — is always
safe: replay until acknowledged gives each charge exactly one ledger effect.

A fail-open request the process did not see end (it was killed meanwhile) was charged nothing,
as a crashed reserved request's hold is released: once Redis answers, it is released by request
id (so the id can never be charged later) and its allowance is given back.

While charges wait, the sidecar reports them per customer in ``sg:{c}:unreconciled`` (see
spendgate/accounting/settlement.py), so ``spendgate balance`` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass

from spendgate.accounting.settlement import report_unreconciled
from spendgate.ledger import Ledger, Usage

from .journal import Journal, Pending, key_of
from .metrics import SidecarMetrics

log = logging.getLogger("spendgate.sidecar.reconcile")
REPORT_EVERY_S = 10.0  # refresh the unreconciled markers this often while charges wait


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class PendingCharge:
    customer_id: str
    request_id: str
    cost: int
    key_id: str
    usage: Usage
    unreserved: bool = False  # served fail-open: its cost counts against the allowance


class PendingCharges:
    def __init__(
        self,
        ledger: Ledger,
        metrics: SidecarMetrics,
        journal: Journal | None = None,
        *,
        pod: str = "",
        interval_s: float = 0.5,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.journal = journal if journal is not None else Journal(None)
        self.pod = pod or "sidecar"
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._written: dict[str, asyncio.Future[None]] = {}  # unreserved charges being written
        self._reported: dict[str, tuple[int, int, int]] = {}
        self._reported_at = 0.0
        self._update_metrics()

    def __len__(self) -> int:
        """Charges (and interrupted fail-open requests) waiting for Redis."""
        return sum(1 for entry in self.journal.pending.values() if self._waiting(entry))

    @staticmethod
    def _waiting(entry: Pending) -> bool:
        return entry.charge is not None or entry.interrupted

    def add(self, charge: PendingCharge) -> asyncio.Future[None]:
        """Journal ``charge``; the future is done once it is on disk. A fail-open request
        that cost nothing just gives its allowance back."""
        customer, request_id = charge.customer_id, charge.request_id
        if charge.cost <= 0:
            self.journal.append_soon({"op": "done", "id": request_id, "customer": customer})
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        record = {
            "op": "charge", "id": request_id, "customer": customer, "cost": charge.cost,
            "key": charge.key_id, "usage": asdict(charge.usage), "ts": _now_ms(),
        }  # fmt: skip
        if charge.unreserved:
            record["allowance"] = charge.cost
        written = self.journal.append(record)
        name = f"{customer}/{request_id}"
        self._written[name] = written
        written.add_done_callback(lambda _: self._written.pop(name, None))
        self._update_metrics()
        return written

    async def durable(self, customer: str, request_id: str) -> None:
        """Wait until the charge of this request is on disk (before its response is released)."""
        written = self._written.get(f"{customer}/{request_id}")
        if written is None:
            return
        try:
            await asyncio.shield(written)
        except Exception as error:
            log.error(
                "charge not journaled; it is kept in memory only",
                extra={"customer": customer, "request_id": request_id, "error": str(error)},
            )  # fmt: skip

    def settled(self, customer: str, request_id: str) -> None:
        """A reserved request settled directly: give back what it took from the fail-open
        allowance (a stream that went on past its hold while Redis was away)."""
        entry = self.journal.pending.get(key_of(customer, request_id))
        if entry is not None and entry.charge is None:
            self._acknowledge(entry)

    def _acknowledge(self, entry: Pending) -> None:
        self.journal.append_soon({"op": "done", "id": entry.request_id, "customer": entry.customer})

    async def flush(self) -> int:
        """Settle what is pending, oldest first; stops at the first Redis failure."""
        settled = 0
        for entry in list(self.journal.pending.values()):
            if not self._waiting(entry):
                continue  # a fail-open request still being served by this process
            try:
                if entry.charge is None:
                    await self.ledger.release(entry.customer, entry.request_id)
                else:
                    usage = entry.charge.get("usage") or {}
                    await self.ledger.settle(
                        entry.customer,
                        entry.request_id,
                        int(entry.charge["cost"]),
                        key_id=str(entry.charge.get("key", "")),
                        usage=Usage(**usage),
                    )
            except Exception as error:
                self.metrics.redis_errors.labels("reconcile").inc()
                log.debug("reconcile deferred", extra={"error": repr(error)})
                break
            self._acknowledge(entry)
            settled += 1
        self._update_metrics()
        if settled:
            log.info("reconciled charges", extra={"settled": settled, "pending": len(self)})
        return settled

    def waiting(self) -> dict[str, tuple[int, int, int]]:
        """Per customer: (charges, amount, oldest ms) not on the ledger yet."""
        out: dict[str, tuple[int, int, int]] = {}
        for entry in self.journal.pending.values():
            if entry.charge is None:
                continue
            count, amount, oldest = out.get(entry.customer, (0, 0, entry.since_ms))
            cost = int(entry.charge["cost"])
            out[entry.customer] = (count + 1, amount + cost, min(oldest, entry.since_ms))
        return out

    async def report(self, *, force: bool = False) -> None:
        """Publish the unreconciled markers when they changed (or are getting old)."""
        waiting = self.waiting()
        stale = time.monotonic() - self._reported_at > REPORT_EVERY_S
        if waiting == self._reported and not (force or (waiting and stale)):
            return
        changes = {**{c: (0, 0, 0) for c in self._reported if c not in waiting}, **waiting}
        try:
            await report_unreconciled(
                self.ledger.redis, self.pod, changes, _now_ms(), self.ledger.tree
            )
        except Exception as error:
            log.debug("unreconciled markers not reported", extra={"error": repr(error)})
            return
        self._reported, self._reported_at = waiting, time.monotonic()

    def _update_metrics(self) -> None:
        self.metrics.pending_settlements.set(len(self))
        self.metrics.journal_pending.set(len(self.journal.pending))
        self.metrics.journal_bytes.set(self.journal.size)
        self.metrics.fail_open_used.set(sum(self.journal.allowance_used.values()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconcile")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if len(self):
                await self.report()
                await self.flush()
            await self.report()
            self._update_metrics()

    async def stop(self, timeout_s: float) -> None:
        """Stop the loop and try once more, for up to ``timeout_s``, to settle everything."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if len(self):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.report(), timeout_s)
        await self.journal.flush()
        await self.journal.compact_if_due()
        if len(self):
            log.error(
                "charges not settled at shutdown"
                + ("; kept in the journal" if self.journal.durable else ""),
                extra={
                    "pending": len(self),
                    "request_ids": [e.request_id for e in self.journal.pending.values()][:50],
                },
            )
        self.journal.close()
