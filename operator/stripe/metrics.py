"""The Stripe integration's own Prometheus metrics (the exporter's are in :mod:`.exporter`);
the operator's catalogue of all metrics is :mod:`spendgate.operator.runtime.metrics`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter, Gauge

STRIPE_WEBHOOKS = Counter(
    "spendgate_stripe_webhook_requests",
    "Requests to the Stripe webhook receiver by outcome (accepted, rejected, failed)",
    ["outcome"],
)
STRIPE_CONFIGURED = Gauge(
    "spendgate_stripe_configured", "1 once the Stripe API key and signing secrets are loaded"
)
STRIPE_EVENTS_POSTED = Counter(
    "spendgate_stripe_events_posted",
    "Kubernetes Events on budgets for Stripe events, by outcome (posted, no_budget, failed)",
    ["outcome"],
)
STRIPE_IMPORTS = Counter(
    "spendgate_stripe_imports",
    "Marked Stripe customers by import outcome (created, skipped, failed)",
    ["outcome"],
)
STRIPE_IMPORT_LAST_SUCCESS = Gauge(
    "spendgate_stripe_import_last_success_timestamp",
    "Unix time at the end of the last complete import pass of budgets from Stripe",
)


def webhook_outcome(status: int) -> str:
    if status < 400:
        return "accepted"
    return "rejected" if status < 500 else "failed"


@web.middleware
async def count_stripe_webhooks(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """aiohttp middleware on the Stripe receiver: one count per request, by outcome."""
    try:
        response = await handler(request)
    except web.HTTPException as error:
        STRIPE_WEBHOOKS.labels(webhook_outcome(error.status)).inc()
        raise
    except Exception:
        STRIPE_WEBHOOKS.labels("failed").inc()
        raise
    STRIPE_WEBHOOKS.labels(webhook_outcome(response.status)).inc()
    return response


__all__ = [
    "STRIPE_CONFIGURED",
    "STRIPE_EVENTS_POSTED",
    "STRIPE_IMPORTS",
    "STRIPE_IMPORT_LAST_SUCCESS",
    "STRIPE_WEBHOOKS",
    "count_stripe_webhooks",
    "webhook_outcome",
]
