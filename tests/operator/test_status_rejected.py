"""A status patch the API server refuses (422, e.g. a CRD older than the operator) is logged,
counted, reported by an Event and a condition, and retried with backoff; the budget's periodic
status timer survives it (operator/kube/status_writer.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.money import parse_amount
from spendgate.operator.kube.status_writer import STATUS_PATCH_REJECTED
from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.kube_emulator import Kubectl, _error, started_emulator
from tests.support.operator_runs import operator_on_emulator

pytestmark = pytest.mark.timeout(60)
BUDGETS = "spendgate.dev/v1alpha1/customerbudgets"


def rejected_count() -> float:
    return STATUS_PATCH_REJECTED.labels("CustomerBudget")._value.get()


async def test_a_rejected_status_patch_is_reported_retried_and_the_timer_survives(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spendgate")
    client = redis.asyncio.Redis.from_url(redis_url)
    store = ConfigStore(client)
    settings = OperatorSettings(
        redis_url=redis_url,
        status_interval_s=0.3,
        retry_delay_s=0.3,
        kube_timeout_s=3.0,
        leader_election=False,
        pod_name="operator-test-0",
    )
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        await kubectl.create("v1/namespaces", {"metadata": {"name": "default"}})
        reject = {"on": False}
        mutate = emulator._mutate

        async def mutating(request: Any) -> None:
            data = request.data if isinstance(request.data, dict) else {}
            changes = set((data.get("status") or {}) if "status" in data else ())
            if reject["on"] and request.subresource == "status" and changes - {"conditions"}:
                raise _error(422, "Invalid", 'status.balance: Invalid value: "x": an old CRD')
            await mutate(request)

        emulator._mutate = mutating  # type: ignore[method-assign]

        def status() -> dict[str, Any]:
            body = kubectl.get(BUDGETS, "default", "acme") or {}
            return dict(body.get("status") or {})

        def ready_condition() -> dict[str, Any]:
            return next((c for c in status().get("conditions") or [] if c["type"] == "Ready"), {})

        async with operator_on_emulator(settings, client, url):
            await kubectl.create(
                BUDGETS,
                {
                    "apiVersion": "spendgate.dev/v1alpha1",
                    "kind": "CustomerBudget",
                    "metadata": {"name": "acme", "namespace": "default"},
                    "spec": {"customerId": "acme", "currency": "USD", "balance": "5.00"},
                },
            )
            await kubectl.wait_for(lambda: status().get("state") == "Active", what="Active")
            before = rejected_count()
            reject["on"] = True
            await store.ledger.fund("acme", "top-up-1", parse_amount("1.00"))
            await kubectl.wait_for(
                lambda: ready_condition().get("reason") == "StatusRejected",
                within=20,
                what="Ready=Unknown StatusRejected",
            )
            assert ready_condition()["status"] == "Unknown"
            assert status()["balance"] == "5.00"  # refused, not written
            events = [
                e for e in kubectl.events("default", "acme") if e["reason"] == "StatusRejected"
            ]
            assert events and events[0]["type"] == "Warning"
            assert events[0]["action"] == "Refresh"
            assert "an old CRD" in events[0]["message"] and "retrying in" in events[0]["message"]
            assert rejected_count() > before
            [record, *_] = [
                r for r in caplog.records if r.getMessage().startswith("the API server rejected")
            ]
            assert record.levelno == logging.ERROR
            assert record.object == "default/acme" and "balance" in record.fields  # type: ignore[attr-defined]
            assert record.retry_in_s > 0  # type: ignore[attr-defined]

            # The server accepts it again: the held status is written after the backoff...
            reject["on"] = False
            await kubectl.wait_for(
                lambda: status().get("balance") == "6.00", within=20, what="balance 6.00"
            )
            await kubectl.wait_for(
                lambda: ready_condition().get("status") == "True", within=20, what="Ready again"
            )
            # ...and the periodic timer is still alive: a later change reaches the status too.
            await store.ledger.fund("acme", "top-up-2", parse_amount("1.00"))
            await kubectl.wait_for(
                lambda: status().get("balance") == "7.00", within=20, what="balance 7.00"
            )
            assert any("accepts the status again" in r.getMessage() for r in caplog.records)
