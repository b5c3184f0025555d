"""The operator's Prometheus metrics, served at ``/metrics`` on the health port.

All in prometheus_client's default registry, next to the Stripe exporter's own
(``spendgate_stripe_export_lag_seconds``, ``spendgate_stripe_meter_events_total``) and the
process collector. No metric has a per-customer label: with thousands of budgets that would be
thousands of series; the export lag is a maximum (gauge) and a summary over budgets instead.

==============================================  ===================================================
metric                                          meaning
==============================================  ===================================================
spendgate_operator_reconciles_total             reconciliations by ``kind`` (CustomerBudget,
                                                PriceBook) and ``outcome``: ``ready``, ``problem``
                                                (Ready=False: a spec or reference to fix),
                                                ``retry`` (Redis or the API unavailable), ``error``
spendgate_operator_reconcile_duration_seconds   histogram by ``kind``
spendgate_operator_leader                       1 while this replica holds the leader Lease
spendgate_operator_leader_acquired_total        times this replica became the leader
spendgate_stripe_export_lag_seconds             (exporter, leader) oldest unexported usage, max
                                                over budgets
spendgate_budget_export_lag_seconds             summary of the budgets' ``status.exportLagSeconds``
                                                as the status refresh sees them
spendgate_stripe_webhook_requests_total         requests to the Stripe webhook receiver by
                                                ``outcome``: ``accepted`` (2xx, recorded),
                                                ``rejected`` (4xx: bad signature, stale, too
                                                large), ``failed`` (5xx: Stripe retries)
spendgate_stripe_configured                     1 once the Stripe keys are loaded (0: enabled, but
                                                the Secret is missing; retried)
spendgate_stripe_events_posted_total            Kubernetes Events posted on budgets for Stripe
                                                events, by ``outcome`` (posted, no_budget, failed)
spendgate_stripe_imports_total                  budgets synced from Stripe: marked customers by
                                                ``outcome``: ``created``, ``skipped`` (a budget
                                                names the customer already), ``failed``
spendgate_stripe_import_last_success_timestamp  end of the last complete import pass (unix time)
spendgate_meter_bypasses                        Service ports that reach injected pods' model port
                                                directly, at the last check (leader)
spendgate_operator_redis_up                     1 if Redis answered the last ``/readyz/full``
==============================================  ===================================================
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

# Metrics defined beside the code that updates them, imported so that all are registered
# before the first scrape: the Stripe receiver's, importer's and exporter's, and the bypass check's.
from ..admission import services as _admission  # noqa: F401
from ..kube.conditions import status_of
from ..stripe import exporter as _exporter  # noqa: F401
from ..stripe import metrics as _stripe  # noqa: F401

RECONCILES = Counter(
    "spendgate_operator_reconciles",
    "Reconciliations by kind and outcome (ready, problem, retry, error)",
    ["kind", "outcome"],
)
RECONCILE_SECONDS = Histogram(
    "spendgate_operator_reconcile_duration_seconds",
    "Time one reconciliation took",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LEADER = Gauge("spendgate_operator_leader", "1 while this replica holds the leader Lease")
LEADER_ACQUIRED = Counter(
    "spendgate_operator_leader_acquired", "Times this replica became the leader"
)
BUDGET_EXPORT_LAG = Summary(
    "spendgate_budget_export_lag_seconds",
    "Export lag of Stripe-linked budgets (status.exportLagSeconds) at each status refresh",
)
REDIS_UP = Gauge("spendgate_operator_redis_up", "1 if Redis answered the last deep readiness check")


def outcome_of(status: Mapping[str, Any], error: Any) -> str:
    if error is not None:
        return "retry"
    ready = status_of(status.get("conditions"), "Ready")
    return "ready" if ready == "True" else "problem"


@contextlib.contextmanager
def counted(kind: str) -> Iterator[list[str]]:
    """Count one reconciliation (``spendgate_operator_reconciles_total``) and time it; the
    block appends its outcome, an exception counts as ``retry`` (timeouts) or ``error``."""
    outcome: list[str] = []
    started = time.monotonic()
    try:
        yield outcome
    except kopf.TemporaryError:
        outcome.append("retry")
        raise
    except Exception:
        outcome.append("error")
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
        RECONCILES.labels(kind, outcome[-1] if outcome else "error").inc()


def leader_changed(leading: bool) -> None:
    LEADER.set(1 if leading else 0)
    if leading:
        LEADER_ACQUIRED.inc()


async def serve_metrics(_request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


__all__ = [
    "BUDGET_EXPORT_LAG",
    "LEADER",
    "RECONCILES",
    "RECONCILE_SECONDS",
    "REDIS_UP",
    "counted",
    "leader_changed",
    "outcome_of",
    "serve_metrics",
]
