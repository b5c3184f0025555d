"""The operator's periodic audit: metrics, a record per customer, one callback per mismatch."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from spendgate.keys import for_customer
from spendgate.operator.budgets.audit import AuditLoop, audit_record_key
from tests.support.accounting_data import Clock, client_for, populate


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_audit_pass_reports_each_mismatch_once(redis_url: str) -> None:
    client = client_for(redis_url, False)
    try:
        await populate(client, Clock())
        told: list[tuple[str, str]] = []
        loop = AuditLoop(client, interval_s=60, on_mismatch=lambda c, m: told.append((c, m)))
        results = await loop.pass_once()
        assert [r.ok for r in results] == [True, True]
        assert gauge("spendgate_audit_budgets") == 2
        assert gauge("spendgate_audit_mismatched_budgets", check="balance") == 0
        assert (await client.hget(audit_record_key("acme"), "ok")) == b"1"

        await client.hincrby(for_customer("acme").acct, "balance", 7)
        await loop.pass_once()
        await loop.pass_once()  # still broken: not told twice
        assert [c for c, _ in told] == ["acme"]
        assert "balance: balance 114.250007" in told[0][1]
        assert gauge("spendgate_audit_mismatched_budgets", check="balance") == 1
        record: dict[Any, Any] = await client.hgetall(audit_record_key("acme"))
        assert record[b"ok"] == b"0" and record[b"checks"] == b"balance"

        await client.hincrby(for_customer("acme").acct, "balance", -7)
        await loop.pass_once()
        assert gauge("spendgate_audit_mismatched_budgets", check="balance") == 0
        await client.hincrby(for_customer("acme").acct, "balance", 7)
        await loop.pass_once()  # broken again after it was fixed: told again
        assert [c for c, _ in told] == ["acme", "acme"]
    finally:
        await client.aclose()
