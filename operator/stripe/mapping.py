"""What a Stripe event does to a budget. Pure: no I/O.

Which budget a Stripe object belongs to is kept in Redis by :mod:`.links`; amounts are
converted by :mod:`.currency`. :func:`actions_for_event` (an event, as a dict, and the budget's
:class:`Link` -> a list of actions) and :func:`grant_actions` / :func:`subscription_actions` /
:func:`invoice_actions`, which reconciliation reuses on objects it pulls. ``apply.py`` carries
the actions out, idempotently.

Suspension sources written here (independent fields of ``sg:{c}:susp``; any one refuses):
``payment`` (failed invoice), ``subscription`` (subscription status), ``dispute``,
``stripe-deleted`` (customer deleted in Stripe), ``payment-method`` (policy
``requirePaymentMethod`` and no payment method on file -> state ``PendingPaymentMethod``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate import exchange
from spendgate.money import format_amount

from .actions import (
    Action,
    Adjust,
    CheckPaymentMethods,
    Fund,
    Notify,
    RefundTopup,
    ReverseGrant,
    SetAccess,
)
from .currency import currency_matches, minor_to_micros
from .links import (
    SRC_DELETED,
    SRC_DISPUTE,
    SRC_PAYMENT,
    SRC_PAYMENT_METHOD,
    SRC_SUBSCRIPTION,
    Link,
)
from .settings import StripeSettings

# Every event type the receiver acts on (configure the Stripe webhook endpoint with these).
HANDLED_EVENTS = (
    "billing.credit_grant.created",
    "billing.credit_grant.updated",
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "payment_intent.succeeded",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "invoice.payment_failed",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.deleted",
    "customer.updated",
    "payment_method.attached",
    "payment_method.detached",
    "setup_intent.succeeded",
)

SUSPENDING_SUBSCRIPTION_STATUSES = frozenset({"unpaid", "canceled", "paused", "incomplete_expired"})
ACTIVE_SUBSCRIPTION_STATUSES = frozenset({"active", "trialing"})


def _id(value: Any) -> str | None:
    """An expandable field: an id string or an expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return str(value) if value else None


def stripe_customer_of(obj: Mapping[str, Any]) -> str | None:
    if obj.get("object") == "customer":
        return _id(obj.get("id"))
    customer = _id(obj.get("customer"))
    if customer:
        return customer
    return None


@dataclass(frozen=True)
class Money:
    """A Stripe amount in the budget's micro-units; ``converted`` says how, for the ledger."""

    micros: int
    converted: str = ""  # " (12.34 USD at 100 credits per USD)" for a custom unit
    rate: exchange.Rate | None = None

    def also(self, currency_micros: int) -> int:
        """Another amount of the same payment (what is left of a grant), converted alike."""
        return self.rate.convert(currency_micros) if self.rate is not None else currency_micros


def _money(
    link: Link, amount: Any, currency: Any, what: str, paid_at_s: Any = 0
) -> tuple[Money | None, list[Action]]:
    """``amount`` (Stripe minor units of ``currency``) in the budget's micro-units. A budget in
    a custom unit converts at the exchange rate in force when the payment was made."""
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        return None, [Notify("StripeAmountInvalid", f"{what}: amount {amount!r} is not usable")]
    if currency_matches(currency, link.currency):
        return Money(minor_to_micros(amount, str(currency))), []
    code = str(currency).upper()
    if link.rates and not link.currency.isupper():
        paid_at_ms = int(paid_at_s or 0) * 1000
        try:
            rate = exchange.rate_at(list(link.rates), code, paid_at_ms)
        except exchange.RateError:
            rate = None
        if rate is not None:
            paid = minor_to_micros(amount, str(currency))
            converted = f" ({format_amount(paid)} {code} at {rate.describe(link.currency)})"
            return Money(rate.convert(paid), converted, rate), []
    return None, [
        Notify(
            "StripeCurrencyMismatch",
            f"{what} is in {code} but the budget counts {link.currency}"
            + ("" if link.currency.isupper() else f" and has no exchange rate for {code}")
            + "; not applied",
        )
    ]


def grant_actions(grant: Mapping[str, Any], link: Link, now_s: int) -> list[Action]:
    """A credit grant's effect: fund it while live, reverse what is left once voided/expired."""
    grant_id = str(grant.get("id") or "")
    if not grant_id:
        return []
    amount = grant.get("amount") or {}
    if amount.get("type") != "monetary" or not isinstance(amount.get("monetary"), Mapping):
        return [
            Notify(
                "StripeGrantUnsupported",
                f"credit grant {grant_id} is not a monetary amount; not applied",
            )
        ]
    monetary = amount["monetary"]
    money, problems = _money(
        link, monetary.get("value"), monetary.get("currency"), grant_id, grant.get("created")
    )
    if money is None:
        return problems
    voided = grant.get("voided_at")
    expires = grant.get("expires_at")
    if voided or (expires and int(expires) <= now_s):
        why = "voided" if voided else "expired"
        remaining = _grant_remaining(grant)
        left = money.also(remaining) if remaining is not None else None
        return [ReverseGrant(grant_id, money.micros, left, why)]
    effective = grant.get("effective_at")
    if effective and int(effective) > now_s:
        return []  # not usable yet: a later reconciliation funds it
    if money.micros == 0:
        return []
    name = grant.get("name") or grant.get("category") or "credit grant"
    return [Fund(grant_id, money.micros, f"stripe credit grant: {name}{money.converted}")]


def _grant_remaining(grant: Mapping[str, Any]) -> int | None:
    """Stripe's grant objects carry no balance; reconciliation attaches one it fetched from
    the credit balance summary as ``_spendgate_remaining`` (micro-units)."""
    value = grant.get("_spendgate_remaining")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _payment_failure(link: Link, source: str, reason: str, created: int) -> list[Action]:
    policy = link.on_payment_failure
    if policy == "alert":
        return [Notify("StripePaymentFailed", f"{reason} (policy: alert only)")]
    if policy == "grace" and link.grace_ms > 0:
        return [SetAccess(source, True, reason, created, grace_ms=link.grace_ms)]
    return [SetAccess(source, True, reason, created)]


def invoice_subscription(invoice: Mapping[str, Any]) -> str | None:
    parent = invoice.get("parent") or {}
    details = parent.get("subscription_details") if isinstance(parent, Mapping) else None
    if isinstance(details, Mapping) and details.get("subscription"):
        return _id(details["subscription"])
    return _id(invoice.get("subscription"))


def invoice_actions(
    invoice: Mapping[str, Any], link: Link, created: int, *, failed: bool
) -> list[Action]:
    """A failed invoice suspends by policy; a paid (or voided/uncollectible) one lifts."""
    number = invoice.get("number") or invoice.get("id")
    if failed:
        if invoice.get("status") == "paid" or invoice.get("paid") is True:
            return []
        amount = invoice.get("amount_remaining", invoice.get("amount_due"))
        due = (
            f" ({amount} {str(invoice.get('currency', '')).upper()} minor units)" if amount else ""
        )
        return _payment_failure(link, SRC_PAYMENT, f"invoice {number} payment failed{due}", created)
    return [SetAccess(SRC_PAYMENT, False, f"invoice {number} settled", created)]


def subscription_actions(sub: Mapping[str, Any], link: Link, created: int) -> list[Action]:
    if link.subscription and sub.get("id") != link.subscription:
        return []
    status = str(sub.get("status") or "")
    reason = f"subscription {sub.get('id')} is {status}"
    if status in ACTIVE_SUBSCRIPTION_STATUSES:
        return [SetAccess(SRC_SUBSCRIPTION, False, reason, created)]
    if status == "past_due":
        return _payment_failure(link, SRC_SUBSCRIPTION, reason, created)
    if status in SUSPENDING_SUBSCRIPTION_STATUSES:
        return [SetAccess(SRC_SUBSCRIPTION, True, reason, created)]
    return []  # incomplete: the first invoice decides (payment source)


def _is_topup(obj: Mapping[str, Any], settings: StripeSettings) -> bool:
    metadata = obj.get("metadata") or {}
    return (
        isinstance(metadata, Mapping)
        and str(metadata.get(settings.topup_metadata_key, "")).lower() == "true"
    )


def actions_for_event(
    event: Mapping[str, Any], link: Link, settings: StripeSettings
) -> list[Action]:
    """The state machine: one Stripe event (a dict) -> what it does to the linked budget."""
    kind = str(event.get("type") or "")
    created = int(event.get("created") or 0)
    data = event.get("data") or {}
    obj: Mapping[str, Any] = data.get("object") or {}

    if kind in ("billing.credit_grant.created", "billing.credit_grant.updated"):
        return grant_actions(obj, link, created)

    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        if obj.get("mode") != "payment" or obj.get("payment_status") != "paid":
            return []
        if not _is_topup(obj, settings):
            return []
        funding_id = _id(obj.get("payment_intent")) or str(obj.get("id"))
        money, problems = _money(
            link, obj.get("amount_total"), obj.get("currency"), funding_id, obj.get("created")
        )
        if money is None:
            return problems
        note = f"stripe top-up (checkout {obj.get('id')}){money.converted}"
        return [Fund(funding_id, money.micros, note)] if money.micros else []

    if kind == "payment_intent.succeeded":
        if not _is_topup(obj, settings):
            return []  # invoice payments and other charges are not top-ups
        pid = str(obj.get("id"))
        amount = obj.get("amount_received", obj.get("amount"))
        money, problems = _money(link, amount, obj.get("currency"), pid, obj.get("created"))
        if money is None:
            return problems
        note = f"stripe top-up (payment intent){money.converted}"
        return [Fund(pid, money.micros, note)] if money.micros else []

    if kind == "charge.refunded":
        pi = _id(obj.get("payment_intent"))
        total = obj.get("amount_refunded")
        if not pi or not isinstance(total, int):
            return []
        # The charge was created with the payment: its refund converts at the same rate.
        money, problems = _money(
            link, total, obj.get("currency"), str(obj.get("id")), obj.get("created")
        )
        if money is None:
            return problems
        return [RefundTopup(str(obj.get("id")), pi, money.micros)]

    if kind == "charge.dispute.created":
        dispute_id = str(obj.get("id"))
        actions: list[Action] = []
        pi = _id(obj.get("payment_intent"))
        money, problems = _money(
            link, obj.get("amount"), obj.get("currency"), dispute_id, obj.get("created")
        )
        actions += problems
        if money is not None and money.micros and pi:
            actions.append(Adjust(dispute_id, -money.micros, f"stripe dispute {dispute_id}", pi))
        reason = f"payment disputed ({dispute_id}, {obj.get('reason') or 'no reason given'})"
        if link.suspend_on_dispute:
            actions.append(SetAccess(SRC_DISPUTE, True, reason, created))
        else:
            actions.append(Notify("StripeDispute", reason))
        return actions

    if kind == "charge.dispute.closed":
        dispute_id = str(obj.get("id"))
        if obj.get("status") != "won":
            return [
                Notify("StripeDisputeLost", f"dispute {dispute_id} closed: {obj.get('status')}")
            ]
        actions = []
        money, _ = _money(
            link, obj.get("amount"), obj.get("currency"), dispute_id, obj.get("created")
        )
        if money is not None and money.micros:
            actions.append(
                Adjust(f"{dispute_id}.won", money.micros, "stripe dispute won", dispute_id)
            )
        actions.append(SetAccess(SRC_DISPUTE, False, f"dispute {dispute_id} won", created))
        return actions

    if kind == "invoice.payment_failed":
        return invoice_actions(obj, link, created, failed=True)
    if kind in (
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.voided",
        "invoice.marked_uncollectible",
    ):
        if kind in ("invoice.paid", "invoice.payment_succeeded") and obj.get("status") not in (
            None,
            "paid",
        ):
            return []
        return invoice_actions(obj, link, created, failed=False)

    if kind.startswith("customer.subscription."):
        return subscription_actions(obj, link, created)

    if kind == "customer.deleted":
        reason = f"Stripe customer {obj.get('id')} was deleted"
        return [SetAccess(SRC_DELETED, True, reason, created)]

    if not link.require_payment_method:
        return []
    if kind in ("payment_method.attached", "setup_intent.succeeded"):
        return [SetAccess(SRC_PAYMENT_METHOD, False, "payment method on file", created)]
    if kind == "customer.updated":
        settings_ = obj.get("invoice_settings") or {}
        if settings_.get("default_payment_method") or obj.get("default_source"):
            return [SetAccess(SRC_PAYMENT_METHOD, False, "default payment method set", created)]
        return []
    if kind == "payment_method.detached":
        return [CheckPaymentMethods(created)]
    return []


def event_stripe_customer(event: Mapping[str, Any]) -> str | None:
    """The Stripe customer an event is about (a detached payment method names it only in
    ``previous_attributes``)."""
    data = event.get("data") or {}
    obj = data.get("object") or {}
    customer = stripe_customer_of(obj)
    if customer:
        return customer
    previous = data.get("previous_attributes") or {}
    return _id(previous.get("customer")) if isinstance(previous, Mapping) else None
