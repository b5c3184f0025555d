"""Which budget a Stripe customer belongs to, kept in Redis.

:func:`link_budget` runs whenever the operator reconciles a CustomerBudget that has
``spec.stripe``; :func:`unlink_budget` when the link or the budget goes:

- ``sg:stripe:customers`` (hash): Stripe customer id ``cus_...`` -> spendgate ``customerId``.
- ``sg:{customerId}:stripe`` (hash, the customer's slot): the link (``customer``,
  ``subscription``, ``currency``, ``mode``, ``limit``, the Stripe-relevant policy), and the
  state of the state machine (written by ``apply.py``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spendgate import exchange
from spendgate.keys import for_customer
from spendgate.models import CustomerBudgetSpec

from .settings import StripeSettings

STRIPE_CUSTOMERS = "sg:stripe:customers"
# Suspension sources Stripe writes (independent fields of ``sg:{c}:susp``; any one refuses).
SRC_PAYMENT = "payment"
SRC_SUBSCRIPTION = "subscription"
SRC_DISPUTE = "dispute"
SRC_DELETED = "stripe-deleted"
SRC_PAYMENT_METHOD = "payment-method"
SOURCES = (SRC_PAYMENT, SRC_SUBSCRIPTION, SRC_DISPUTE, SRC_DELETED, SRC_PAYMENT_METHOD)


class StripeLinkConflict(ValueError):
    """Two budgets claim the same Stripe customer."""


def stripe_key(customer_id: str) -> str:
    """``sg:{customerId}:stripe``: the link and the state machine's state (same slot as susp)."""
    return f"{for_customer(customer_id).tag}:stripe"


@dataclass(frozen=True)
class Link:
    """What the Stripe code needs to know about a budget (stored by :func:`link_budget`)."""

    customer_id: str
    stripe_customer: str
    currency: str
    subscription: str | None = None
    mode: str = "prepaid"
    limit: int = 0
    on_payment_failure: str = "suspend"  # suspend | grace | alert
    grace_ms: int = 0
    suspend_on_dispute: bool = True
    require_payment_method: bool = False
    rates: tuple[exchange.Rate, ...] = ()  # custom units: what Stripe payments buy, over time

    @classmethod
    def from_spec(cls, spec: CustomerBudgetSpec) -> Link:
        if spec.stripe is None:
            raise ValueError(f"budget {spec.customer_id} has no spec.stripe")
        policy = spec.policy
        return cls(
            customer_id=spec.customer_id,
            stripe_customer=spec.stripe.customer_id,
            subscription=spec.stripe.subscription_id,
            currency=spec.currency,
            mode=spec.mode.value,
            limit=spec.limit or 0,
            on_payment_failure=policy.on_payment_failure.action.value,
            grace_ms=policy.on_payment_failure.grace_period or 0,
            suspend_on_dispute=policy.suspend_on_dispute,
            require_payment_method=policy.require_payment_method,
        )

    def fields(self) -> dict[str, str]:
        return {
            "customer": self.stripe_customer,
            "subscription": self.subscription or "",
            "currency": self.currency,
            "mode": self.mode,
            "limit": str(self.limit),
            "on_payment_failure": self.on_payment_failure,
            "grace_ms": str(self.grace_ms),
            "suspend_on_dispute": "1" if self.suspend_on_dispute else "0",
            "require_payment_method": "1" if self.require_payment_method else "0",
        }

    @classmethod
    def from_fields(cls, customer_id: str, raw: Mapping[Any, Any]) -> Link | None:
        data = {_text(k): _text(v) for k, v in raw.items()}
        if not data.get("customer"):
            return None
        return cls(
            customer_id=customer_id,
            stripe_customer=data["customer"],
            subscription=data.get("subscription") or None,
            currency=data.get("currency", ""),
            mode=data.get("mode", "prepaid"),
            limit=int(data.get("limit") or 0),
            on_payment_failure=data.get("on_payment_failure", "suspend"),
            grace_ms=int(data.get("grace_ms") or 0),
            suspend_on_dispute=data.get("suspend_on_dispute", "1") == "1",
            require_payment_method=data.get("require_payment_method") == "1",
            rates=tuple(exchange.decode(data.get(RATES_FIELD))),
        )


LINK_FIELDS = tuple(Link("x", "cus_x", "USD").fields())
# Kept when a budget is unlinked: a payment made under a rate converts at it, whenever it is
# applied (a relinked budget must not convert old payments at a new rate).
RATES_FIELD = "rates"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def link_budget(
    redis: Any, spec: CustomerBudgetSpec, *, now_ms: int | None = None
) -> Link | None:
    """Record (or refresh) a budget's Stripe link; call on every reconcile of a CustomerBudget.

    Raises :class:`StripeLinkConflict` when another customerId already holds the Stripe
    customer. A budget without ``spec.stripe`` is unlinked. With ``requirePaymentMethod`` and
    nothing known yet about the customer's payment methods, the budget is suspended (source
    ``payment-method``, state ``PendingPaymentMethod``) until an event or a reconciliation
    shows one.
    """
    if spec.stripe is None:
        await unlink_budget(redis, spec.customer_id)
        return None
    link = Link.from_spec(spec)
    holder = await redis.hget(STRIPE_CUSTOMERS, link.stripe_customer)
    if holder is not None and _text(holder) != link.customer_id:
        raise StripeLinkConflict(
            f"Stripe customer {link.stripe_customer} is already linked to customerId"
            f" {_text(holder)!r}; one Stripe customer pays for one budget"
        )
    key = stripe_key(link.customer_id)
    previous = await redis.hget(key, "customer")
    if previous is not None and _text(previous) != link.stripe_customer:
        # Re-linked to another Stripe customer: the old one's deletion no longer applies.
        await redis.hdel(STRIPE_CUSTOMERS, _text(previous))
        await redis.hdel(for_customer(link.customer_id).suspensions, SRC_DELETED)
        await redis.hdel(key, f"ts:{SRC_DELETED}")
    await redis.hset(STRIPE_CUSTOMERS, link.stripe_customer, link.customer_id)
    await redis.hset(key, mapping=link.fields())
    link = await _record_rate(redis, key, link, spec, now_ms)
    susp = for_customer(link.customer_id).suspensions
    if link.require_payment_method:
        if not await redis.hexists(key, f"ts:{SRC_PAYMENT_METHOD}"):
            await redis.hsetnx(susp, SRC_PAYMENT_METHOD, "no payment method on file in Stripe yet")
    else:
        await redis.hdel(susp, SRC_PAYMENT_METHOD)
        await redis.hdel(key, f"ts:{SRC_PAYMENT_METHOD}")
    return link


async def _record_rate(
    redis: Any, key: str, link: Link, spec: CustomerBudgetSpec, now_ms: int | None
) -> Link:
    """Append the budget's exchange rate to its history when it changed (never rewrite it)."""
    history = exchange.decode(await redis.hget(key, RATES_FIELD))
    rate = spec.stripe.exchange_rate if spec.stripe is not None else None
    if rate is not None:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        updated = exchange.record(history, rate.currency, rate.units, now)
        if updated != history:
            await redis.hset(key, RATES_FIELD, exchange.encode(updated))
            history = updated
    return replace(link, rates=tuple(history))


def current_exchange_rate(link: Link) -> str | None:
    """``"100 credits per USD since 2026-01-01T00:00:00Z"`` for the budget's status."""
    rates = [rate for rate in link.rates if rate.currency != link.currency]
    if not rates:
        return None
    current = max(rates, key=lambda rate: rate.since_ms)
    if current.since_ms == 0:
        return current.describe(link.currency)
    since = dt.datetime.fromtimestamp(current.since_ms / 1000, dt.UTC)
    return f"{current.describe(link.currency)} since {since.strftime('%Y-%m-%dT%H:%M:%SZ')}"


async def unlink_budget(redis: Any, customer_id: str) -> None:
    """Forget a budget's Stripe link (its state and suspensions stay, as does the ledger)."""
    key = stripe_key(customer_id)
    previous = await redis.hget(key, "customer")
    if previous is not None:
        holder = await redis.hget(STRIPE_CUSTOMERS, _text(previous))
        if holder is not None and _text(holder) == customer_id:
            await redis.hdel(STRIPE_CUSTOMERS, _text(previous))
    await redis.hdel(key, *LINK_FIELDS)
    await redis.hdel(for_customer(customer_id).suspensions, SRC_PAYMENT_METHOD)


async def load_link(redis: Any, customer_id: str) -> Link | None:
    return Link.from_fields(customer_id, await redis.hgetall(stripe_key(customer_id)))


async def linked_customers(redis: Any) -> dict[str, str]:
    """customerId -> Stripe customer id, for every linked budget."""
    raw = await redis.hgetall(STRIPE_CUSTOMERS)
    return {_text(cid): _text(cus) for cus, cid in raw.items()}


async def resolve_link(
    redis: Any,
    stripe_customer: str | None,
    metadata: Any,
    settings: StripeSettings,
) -> Link | None:
    """The budget a Stripe object belongs to: by its customer id, else by metadata
    (``settings.customer_metadata_key`` = customerId, for objects without a customer)."""
    if stripe_customer:
        cid = await redis.hget(STRIPE_CUSTOMERS, stripe_customer)
        if cid is not None:
            return await load_link(redis, _text(cid))
    cid = metadata.get(settings.customer_metadata_key) if isinstance(metadata, Mapping) else None
    if cid:
        try:
            link = await load_link(redis, str(cid))
        except ValueError:  # not a valid customer id
            return None
        if link is not None and (not stripe_customer or link.stripe_customer == stripe_customer):
            return link
    return None
