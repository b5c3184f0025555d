"""The CustomerBudget spec and status."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from .common import ApiKeyRef, Mode, Period, RateLimit
from .fields import (
    CUSTOMER_ID_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    Amount,
    Currency,
    PositiveAmount,
    _Model,
    cel,
)
from .policy import BudgetPolicy

PriceBookName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]


class ExchangeRate(_Model):
    """How many units of the budget's custom unit one unit of a Stripe currency buys."""

    currency: str = Field(
        pattern=r"^[A-Z]{3}$", description="The ISO 4217 currency Stripe payments arrive in."
    )
    units: PositiveAmount = Field(
        description='Budget units one unit of currency buys, like "100" (credits per USD).'
    )


class StripeLink(_Model):
    customer_id: str = Field(pattern=r"^cus_[A-Za-z0-9]+$")
    subscription_id: str | None = Field(default=None, pattern=r"^sub_[A-Za-z0-9]+$")
    exchange_rate: ExchangeRate | None = Field(
        default=None,
        description="For a budget in a custom unit: what Stripe payments buy. A change applies"
        " to payments made from then on, never to balances (docs/pricing.md).",
    )


_SOFT_AT_NEEDS_LIMIT = (
    "'at' is a percentage of the budget's limit, and this budget has none; use 'below' (an"
    " amount left) or give the budget a limit"
)


class CustomerBudgetSpec(_Model):
    # The rules of ``_cross_field``; negative balances are refused by the amount schema.
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.mode) || self.mode != 'capped' || (has(self.limit) && has(self.period))",
                "mode 'capped' needs both limit and period",
            ),
            (
                "!has(self.mode) || self.mode != 'capped' || !has(self.balance)",
                "balance is for mode 'prepaid'; capped budgets spend up to limit",
            ),
            ("!has(self.limit) || has(self.period)", "a spend cap (limit) needs a period"),
            (
                "!has(self.period) || has(self.limit)",
                "period is only meaningful together with limit",
            ),
            (
                "!has(self.stripe) || !has(self.stripe.exchangeRate)"
                " || self.currency.matches('^[a-z]')",
                "stripe.exchangeRate is for budgets in a custom unit",
            ),
            (
                "!has(self.parent) || !has(self.stripe)",
                "stripe links a root budget; a budget with a parent spends its root's money",
            ),
            (
                "has(self.limit) || !has(self.policy) || !has(self.policy.softLimits)"
                " || self.policy.softLimits.all(s, !has(s.at))",
                f"policy.softLimits: {_SOFT_AT_NEEDS_LIMIT}",
            ),
        )
    )

    customer_id: str = Field(
        pattern=CUSTOMER_ID_PATTERN, description="Unique across the cluster; names the customer."
    )
    parent: str | None = Field(
        default=None,
        max_length=253,
        description="The CustomerBudget (by name, in this namespace) this budget is a level of:"
        " a request must fit every level up to the root. Changing it moves the budget and its"
        " subtree (docs/ledger.md).",
        json_schema_extra=cel(
            (
                "!self.contains('/')",
                "parent must be a CustomerBudget in the same namespace (a name, not"
                " namespace/name)",
            ),
            (
                f"self.contains('/') || self.matches(r'{DNS_SUBDOMAIN_PATTERN}')",
                "parent must be a CustomerBudget name",
            ),
        ),
    )
    display_name: str | None = Field(default=None, max_length=200)
    mode: Mode = Field(
        default=Mode.prepaid,
        description="prepaid spends a funded balance; capped spends up to limit per period.",
    )
    currency: Currency
    balance: Amount | None = Field(
        default=None,
        description="Opening prepaid balance. Changing it later adds or removes the difference.",
    )
    limit: PositiveAmount | None = Field(default=None, description="Spend cap per period.")
    period: Period | None = Field(default=None, description="The period limit applies to.")
    rate_limits: list[RateLimit] = Field(default_factory=list, max_length=8)
    api_keys: list[ApiKeyRef] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra=cel(
            ("self.all(k, self.exists_one(j, j.name == k.name))", "apiKeys names must be unique")
        ),
    )
    policy: BudgetPolicy = Field(default_factory=BudgetPolicy)
    stripe: StripeLink | None = None
    price_books: list[PriceBookName] = Field(
        default_factory=list,
        max_length=16,
        description="PriceBooks (in the budget's namespace) this customer is charged by; the"
        " operator reports a missing one or one in another currency.",
    )

    @field_validator("parent")
    @classmethod
    def _parent_here(cls, value: str | None) -> str | None:
        if value is not None and "/" in value:
            raise ValueError(
                f"{value!r}: parent must be a CustomerBudget in the same namespace (a name, not"
                " namespace/name)"
            )
        if value is not None and not re.match(DNS_SUBDOMAIN_PATTERN, value):
            raise ValueError(f"{value!r}: parent must be a CustomerBudget name")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        if self.mode is Mode.capped:
            if self.limit is None or self.period is None:
                raise ValueError("mode 'capped' needs both limit and period")
            if self.balance is not None:
                raise ValueError("balance is for mode 'prepaid'; capped budgets spend up to limit")
        elif self.limit is not None and self.period is None:
            raise ValueError("a prepaid spend cap (limit) needs a period")
        elif self.period is not None and self.limit is None:
            raise ValueError("period is only meaningful together with limit")
        if self.balance is not None and self.balance < 0:
            raise ValueError("balance must not be negative")
        rate = self.stripe.exchange_rate if self.stripe is not None else None
        if rate is not None and self.currency.isupper():
            raise ValueError(
                f"stripe.exchangeRate is for budgets in a custom unit; this budget counts"
                f" {self.currency}, which Stripe pays in directly"
            )
        if self.parent is not None and self.stripe is not None:
            raise ValueError(
                "stripe links a root budget; a budget with a parent spends its root's money"
            )
        names = [key.name for key in self.api_keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"apiKeys names must be unique; repeated: {', '.join(duplicates)}")
        for index, soft in enumerate(self.policy.soft_limits):
            if soft.at is not None and self.limit is None:
                raise ValueError(f"policy.softLimits[{index}]: {_SOFT_AT_NEEDS_LIMIT}")
        return self


class Condition(_Model):
    """``metav1.Condition``."""

    # json_schema_extra: bounds of metav1.Condition, declared in the CRD only (status is
    # written by the operator, which fills these fields itself).
    type: str = Field(json_schema_extra={"maxLength": 316})
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        json_schema_extra={"minLength": 1, "maxLength": 1024},
    )
    message: str = Field(default="", json_schema_extra={"maxLength": 32768})
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, json_schema_extra={"minimum": 0})


class BudgetState(StrEnum):
    active = "Active"
    exhausted = "Exhausted"
    suspended = "Suspended"
    pending_payment_method = "PendingPaymentMethod"
    misconfigured = "Misconfigured"


class AlertBaseline(_Model):
    """Prepaid alerts count from the balance after the last top-up and the charges by then."""

    balance: str
    charged: str


class CustomerBudgetStatus(_Model):
    model_config = ConfigDict(extra="allow")

    customer_id: str | None = None
    state: BudgetState | None = None
    state_reasons: list[str] = Field(
        default_factory=list, description="Why the budget is not Active (suspension sources)."
    )
    currency: str | None = None
    balance: str | None = None
    held: str | None = None
    available: str | None = None
    spent_this_period: str | None = Field(
        default=None,
        description="Spent this period by the budget and its descendants (what its cap counts).",
    )
    own_spent_this_period: str | None = Field(
        default=None,
        description="Spent this period by the budget's own keys (its descendants' spend excluded).",
    )
    period_start: str | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = None
    last_stripe_sync: str | None = Field(
        default=None,
        description="When the operator last pulled this customer's state from Stripe (RFC 3339).",
    )
    export_lag_seconds: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Age of the oldest usage not yet exported to Stripe, in steps of 30 seconds"
            " (0: all exported). Only for budgets linked to Stripe."
        ),
    )
    active_keys: int | None = Field(default=None, description="API keys configured in Redis.")
    exchange_rate: str | None = Field(
        default=None,
        description='The rate Stripe payments convert at now, like "100 credits per USD since'
        ' 2026-01-01T00:00:00Z" (custom units only).',
    )
    alerted_threshold: int | None = Field(
        default=None,
        description="The highest alert threshold (percent) already alerted; 0 for none.",
    )
    alert_baseline: AlertBaseline | None = None
    soft_limits_reached: list[str] = Field(
        default_factory=list,
        description='The soft limits reached now, like "throttle at 90%"; a notify one alerts'
        " once when it joins this list.",
    )
