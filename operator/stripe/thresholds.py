"""Capped (post-paid) budgets: keep the Stripe subscription's billing threshold at the cap.

``billing_thresholds.amount_gte`` makes Stripe invoice mid-cycle once the subscription has
accrued that much, so a post-paid customer is charged about when the budget's spend cap is
reached instead of at the end of the period. A threshold invoice that fails arrives as
``invoice.payment_failed`` and suspends like any other failed invoice.

Entry point (reconciliation calls it for capped budgets with a subscription; the operator may
also call it right after a budget's limit changed)::

    outcome = await sync_billing_threshold(gateway, link)   # "updated" | "unchanged" | "skipped"
"""

from __future__ import annotations

from typing import Any

from .client import StripeGateway, idempotency_key, to_dict
from .currency import minor_to_micros
from .links import Link


def threshold_amount(link: Link) -> int | None:
    """The cap in the currency's minor unit, rounded down (Stripe invoices at or before it)."""
    if link.mode != "capped" or link.limit <= 0 or len(link.currency) != 3:
        return None
    if not link.currency.isupper():  # a custom unit has no Stripe amount
        return None
    amount = link.limit // minor_to_micros(1, link.currency)
    return amount if amount > 0 else None


async def sync_billing_threshold(gateway: StripeGateway, link: Link) -> str:
    amount = threshold_amount(link)
    if amount is None or not link.subscription:
        return "skipped"
    client = gateway.client
    sub_id = link.subscription
    sub = to_dict(
        await gateway.call(
            lambda: client.v1.subscriptions.retrieve_async(sub_id), "retrieve subscription"
        )
    )
    current: Any = (sub.get("billing_thresholds") or {}).get("amount_gte")
    if current == amount:
        return "unchanged"
    params: dict[str, Any] = {"billing_thresholds": {"amount_gte": amount}}
    options: dict[str, Any] = {"idempotency_key": idempotency_key("threshold", sub_id, str(amount))}
    await gateway.call(
        lambda: client.v1.subscriptions.update_async(sub_id, params, options),  # type: ignore[arg-type]
        "update billing threshold",
    )
    return "updated"
