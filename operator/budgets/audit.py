"""The periodic audit (leader only): ``spendgate audit`` over every customer, as metrics, a
per-customer record in Redis and an ``on_mismatch`` callback (a Warning Event and an alert).

    loop = AuditLoop(redis, interval_s=300, on_mismatch=emit)   # emit(customerId, message)
    await loop.run(stop)
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Gauge

from spendgate.accounting.audit import CustomerAudit, audit_customer
from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.loops import run_every

log = logging.getLogger("spendgate.operator.audit")

MISMATCHED = Gauge(
    "spendgate_audit_mismatched_budgets",
    "Budgets whose money did not add up in the last audit pass, by failed check",
    ["check"],
)
AUDITED = Gauge("spendgate_audit_budgets", "Budgets checked by the last audit pass")
LAST_PASS = Gauge(
    "spendgate_audit_last_pass_timestamp_seconds", "When the last audit pass finished"
)
CHECKS = (
    "balance", "ledger", "ledger_gap", "held", "hold_index", "duplicate_usage", "stripe_export",
    "inconclusive",
)  # fmt: skip

OnMismatch = Callable[[str, str], Awaitable[None] | None]


def audit_record_key(customer_id: str) -> str:
    """Hash: ``ok`` (1/0), ``checks`` (comma-separated), ``message``, ``ts`` (ms)."""
    return f"{for_customer(customer_id).tag}:audit"


class AuditLoop:
    def __init__(
        self, redis: Any, *, interval_s: float, on_mismatch: OnMismatch | None = None
    ) -> None:
        self.redis = redis
        self.interval_s = interval_s
        self.on_mismatch = on_mismatch
        self._failing: set[str] = set()  # told once per mismatch, again after it cleared

    async def pass_once(self) -> list[CustomerAudit]:
        now_ms = int(time.time() * 1000)
        ledger = Ledger(self.redis)
        results = []
        for customer in sorted(await ConfigStore(self.redis).list_customers()):
            account = await ledger.account(customer)
            if not account.configured:
                continue
            audit = await audit_customer(self.redis, customer, account.currency, now_ms=now_ms)
            results.append(audit)
            await self._record(audit, now_ms)
        counts = dict.fromkeys(CHECKS, 0)
        for audit in results:
            for check in {m.check for m in audit.mismatches}:
                counts[check] = counts.get(check, 0) + 1
        for check, count in counts.items():
            MISMATCHED.labels(check).set(count)
        AUDITED.set(len(results))
        LAST_PASS.set(time.time())
        return results

    async def _record(self, audit: CustomerAudit, now_ms: int) -> None:
        message = "; ".join(f"{m.check}: {m.message}" for m in audit.mismatches)
        await self.redis.hset(
            audit_record_key(audit.customer_id),
            mapping={
                "ok": "1" if audit.ok else "0",
                "checks": ",".join(sorted({m.check for m in audit.mismatches})),
                "message": message[:2000],
                "ts": str(now_ms),
            },
        )
        if audit.ok:
            self._failing.discard(audit.customer_id)
            return
        if audit.customer_id in self._failing:
            return
        self._failing.add(audit.customer_id)
        log.error("audit mismatch", extra={"customer": audit.customer_id, "detail": message})
        if self.on_mismatch is not None:
            try:
                outcome = self.on_mismatch(audit.customer_id, f"Ledger audit failed: {message}")
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("audit mismatch callback failed")

    async def run(self, stop: Any) -> None:
        await run_every(stop, self.interval_s, self.pass_once, log=log, failed="audit pass failed")
