"""A CustomerBudget's ``policy``: payment failures, abnormal spend, alerts, soft limits."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..money import format_amount
from .common import RateLimit
from .fields import PositiveAmount, PositiveDurationMs, _Model, cel

_MAX_THRESHOLDS = 10


class PaymentFailureAction(StrEnum):
    suspend = "suspend"
    grace = "grace"
    alert = "alert"


class OnPaymentFailure(_Model):
    """What a failed payment (Stripe) does to the budget."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.action) || self.action != 'grace' || has(self.gracePeriod)",
                "action 'grace' needs gracePeriod (for example \"72h\")",
            ),
            (
                "!has(self.gracePeriod) || (has(self.action) && self.action == 'grace')",
                "gracePeriod is only used with action 'grace'",
            ),
        )
    )

    action: PaymentFailureAction = PaymentFailureAction.suspend
    # A zero gracePeriod is refused in every case, so the CRD schema refuses "0s" outright.
    grace_period: PositiveDurationMs | None = None

    @model_validator(mode="after")
    def _grace_needs_period(self) -> Self:
        if self.action is PaymentFailureAction.grace and not self.grace_period:
            raise ValueError("action 'grace' needs gracePeriod (for example \"72h\")")
        if self.action is not PaymentFailureAction.grace and self.grace_period is not None:
            raise ValueError("gracePeriod is only used with action 'grace'")
        return self


class AbnormalSpendAction(StrEnum):
    alert = "alert"
    suspend = "suspend"


_MIN_WINDOW_MS, _MAX_WINDOW_MS = 60_000, 86_400_000


class AbnormalSpendPolicy(_Model):
    """Spend far above the customer's own normal (a leaked key): alert, or suspend until a
    person resumes the customer (docs/operator.md, *Abnormal spend*)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.minActiveHours) ? self.minActiveHours : 24)"
                " <= (has(self.baselineDays) ? self.baselineDays : 7) * 24",
                "minActiveHours cannot exceed the hours of baselineDays",
            )
        )
    )

    action: AbnormalSpendAction = Field(
        default=AbnormalSpendAction.alert,
        description="alert: an Event and the alert webhook; suspend: also suspend the customer"
        " (403) until a person resumes it.",
    )
    minimum: PositiveAmount = Field(
        description="Spend in the window below this never trips (small customers); in the"
        " budget's currency. Required: a safe amount depends on the currency."
    )
    factor: int = Field(
        default=5, ge=2, le=1000, description="Trips above this many times the baseline."
    )
    window: PositiveDurationMs = Field(
        default=3_600_000,
        description="The recent spend compared with the baseline (sliding, whole minutes,"
        " 1m to 24h).",
        json_schema_extra={"minimum": 60, "maximum": 86_400},
    )
    baseline_days: int = Field(
        default=7, ge=1, le=60, description="Days of history the baseline is taken from."
    )
    percentile: int = Field(
        default=90,
        ge=1,
        le=100,
        description="Percentile of the hourly spend of active hours that is the baseline (50:"
        " the median; 90 tolerates busy daytime hours).",
    )
    min_active_hours: int = Field(
        default=24,
        ge=1,
        le=1440,
        description="Hours with spend needed before there is a baseline; until then it never"
        " trips.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if not _MIN_WINDOW_MS <= self.window <= _MAX_WINDOW_MS or self.window % 60_000:
            raise ValueError("window must be whole minutes, from 1m to 24h")
        if self.min_active_hours > self.baseline_days * 24:
            raise ValueError("minActiveHours cannot exceed the hours of baselineDays")
        return self


_MAX_SOFT_LIMITS = 8


class SoftLimitAction(StrEnum):
    notify = "notify"
    throttle = "throttle"
    downgrade = "downgrade"


class SoftLimit(_Model):
    """A threshold that acts before the hard cap (docs/operator.md, *Soft limits*): at a
    percentage of the level's limit spent (or held), or when what is left falls below an amount."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.at) != has(self.below)", "give exactly one of at or below"),
            (
                "(self.action == 'throttle') == has(self.rateLimits)",
                "rateLimits are what action 'throttle' applies: give them with it, only with it",
            ),
        )
    )

    action: SoftLimitAction = Field(
        description="notify: an Event and the alert webhook, once per period; throttle: the"
        " rateLimits apply too; downgrade: requests go to their rule's downgradeTo model."
    )
    at: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Acts once this percentage of the budget's limit is spent or held this"
        " period (needs spec.limit).",
    )
    below: PositiveAmount | None = Field(
        default=None, description="Acts once what is available falls below this amount."
    )
    rate_limits: list[RateLimit] | None = Field(default=None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _one_trigger(self) -> Self:
        if (self.at is None) == (self.below is None):
            raise ValueError("give exactly one of at or below")
        if (self.action is SoftLimitAction.throttle) != (self.rate_limits is not None):
            raise ValueError(
                "rateLimits are what action 'throttle' applies: give them with it, only with it"
            )
        return self

    @property
    def label(self) -> str:
        """Like "throttle at 90%" or "notify below 5.00"."""
        if self.at is not None:
            return f"{self.action.value} at {self.at}%"
        return f"{self.action.value} below {format_amount(self.below or 0)}"


class BudgetPolicy(_Model):
    suspended: bool = False
    alert_thresholds: list[int] = Field(
        default_factory=lambda: [50, 80, 100],
        max_length=_MAX_THRESHOLDS,
        description="Percentages of the limit (or of the funded balance) that raise an alert.",
        json_schema_extra={
            "items": {"type": "integer", "minimum": 1, "maximum": 100},
            # CEL has no ranges: compare neighbours by index, up to max_length - 1 pairs.
            **cel(
                (
                    f"{list(range(_MAX_THRESHOLDS - 1))}"
                    ".all(i, i + 1 >= size(self) || self[i] < self[i + 1])",
                    "thresholds must be increasing and unique",
                )
            ),
        },
    )
    max_request_cost: PositiveAmount | None = None
    on_payment_failure: OnPaymentFailure = Field(default_factory=OnPaymentFailure)
    suspend_on_dispute: bool = True
    require_payment_method: bool = False
    abnormal_spend: AbnormalSpendPolicy | None = Field(
        default=None,
        description="Alert on or suspend spend far above the customer's own baseline; off"
        " when absent.",
    )
    soft_limits: list[SoftLimit] = Field(
        default_factory=list,
        max_length=_MAX_SOFT_LIMITS,
        description="Thresholds that notify, throttle or downgrade before the hard cap.",
    )

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, value: list[int]) -> list[int]:
        for index, percent in enumerate(value):
            if not 1 <= percent <= 100:
                raise ValueError(f"[{index}] {percent} is not a percentage between 1 and 100")
        if value != sorted(set(value)):
            raise ValueError("thresholds must be increasing and unique")
        return value
