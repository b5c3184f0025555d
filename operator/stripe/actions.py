"""The actions a Stripe event maps to (:mod:`.mapping`), carried out by :mod:`.apply`: plain
frozen dataclasses, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fund:
    """Add money, once per ``funding_id`` (a Stripe object id)."""

    funding_id: str
    amount: int
    note: str


@dataclass(frozen=True)
class Adjust:
    """Take money out (or give back), once per ``adjustment_id``; only when the ledger already
    holds the funding/adjustment ``only_if_applied`` (a refunded top-up, a won dispute)."""

    adjustment_id: str
    amount: int
    note: str
    only_if_applied: str | None = None


@dataclass(frozen=True)
class ReverseGrant:
    """A voided or expired credit grant: take back what is left of it (see apply.py)."""

    grant_id: str
    granted: int
    remaining: int | None  # None: unknown here; the applier asks Stripe or uses ``granted``
    why: str = "voided"


@dataclass(frozen=True)
class RefundTopup:
    """Refunds of a funded top-up's charge, as the cumulative total refunded."""

    charge_id: str
    payment_intent: str
    total_refunded: int


@dataclass(frozen=True)
class SetAccess:
    """Suspend or lift one source, unless a newer state event (``created``) was applied.

    ``grace_ms`` > 0 defers the suspension to ``created + grace_ms`` (a timer applies it unless
    a lift comes first)."""

    source: str
    suspend: bool
    reason: str
    created: int
    grace_ms: int = 0


@dataclass(frozen=True)
class Notify:
    """Something the operator should tell as a Kubernetes Event on the budget."""

    reason: str
    message: str
    warning: bool = True


@dataclass(frozen=True)
class CheckPaymentMethods:
    """Ask Stripe whether the customer still has a payment method (after a detach)."""

    created: int


Action = Fund | Adjust | ReverseGrant | RefundTopup | SetAccess | Notify | CheckPaymentMethods

__all__ = [
    "Action",
    "Adjust",
    "CheckPaymentMethods",
    "Fund",
    "Notify",
    "RefundTopup",
    "ReverseGrant",
    "SetAccess",
]
