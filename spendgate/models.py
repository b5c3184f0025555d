"""Typed models of the spendgate resources: CustomerBudget and PriceBook (spendgate.dev/v1alpha1).

These are the single Python description of the specs: ``spendgate apply``, the operator and the
CRD schemas all use them. Field names are the camelCase names users write in YAML; amounts are
decimal strings outside and integer micro-units inside (see ``spendgate.money``).
"""

from __future__ import annotations

import fnmatch
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .durations import format_duration, parse_duration
from .expressions import ExpressionError, ExpressionPricing, RuleExpressionError, fields_read
from .money import (
    CURRENCY_RE,
    MAX_MICROS,
    MICROS_PER_UNIT,
    format_amount,
    parse_amount,
    validate_currency,
)

GROUP = "spendgate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Customer ids become part of Redis keys (inside a hash tag), Kubernetes label values and Stripe
# metadata, so they are restricted to a conservative alphabet with no braces or colons.
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
KEY_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# The CRD schemas (``spendgate.crd``) are generated from these models. What the validators below
# check in Python is declared for the API server too: formats as OpenAPI patterns and bounds,
# cross-field rules as CEL (``x-kubernetes-validations``) next to the validator that enforces
# them. Patterns use RE2 syntax (the API server is written in Go) and ``[0-9]``, never ``\d``.
#
# Amounts are ``x-kubernetes-int-or-string``: a decimal string ("12.50", at most 6 decimals) or a
# YAML integer of whole units (``balance: 10``), exactly what ``parse_amount`` accepts. Floats
# (``balance: 0.1``) are refused by both. Not expressible in a pattern: the upper bound of
# decimal strings (``MAX_MICROS``), which the operator reports instead.
AMOUNT_PATTERN = r"^[+]?[0-9]{1,15}([.][0-9]{1,6})?$"
# Durations are int-or-string too: "500ms", "30s", "5m", "72h", "1h30m", "2d", or integer seconds.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"
# ... and a duration that must not be zero has a non-zero digit in some part.
POSITIVE_DURATION_PATTERN = (
    r"^([0-9]+(ms|s|m|h|d))*[0-9]*[1-9][0-9]*(ms|s|m|h|d)([0-9]+(ms|s|m|h|d))*$"
)
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# KEY_NAME_PATTERN allows at most 63 characters; the CRD says so as maxLength too, which bounds the
# cost the API server estimates for CEL rules comparing names.
_NAME_SCHEMA: dict[str, Any] = {"maxLength": 63}
_MAX_THRESHOLDS = 10


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules ``(expression, message)`` for the CRD schema of the model or field they sit on.

    ``self`` is the object (or field value) at that place. Optional fields are tested with
    ``has()`` so a rule never depends on API-server defaulting.
    """
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


def _int_or_string(
    pattern: str, minimum: int, maximum: int, text: str, max_length: int | None = None
) -> dict[str, Any]:
    """An int-or-string schema: ``pattern``/``maxLength`` apply to strings, the bounds to ints."""
    return {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": pattern,
        **({"maxLength": max_length} if max_length else {}),
        "minimum": minimum,
        "maximum": maximum,
        "description": text,
    }


def _nonzero_amount(field: str) -> str:
    """CEL: an optional Amount field is present and not zero; CEL reads decimals with double()."""
    return f"(has({field}) && (type({field}) == int ? {field} != 0 : double({field}) != 0.0))"


class ManifestError(ValueError):
    """A manifest that does not describe a valid resource; ``str()`` names every bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _amount(value: Any) -> int:
    return parse_amount(value)


def _positive_amount(value: Any) -> int:
    micros = _amount(value)
    if micros <= 0:
        raise ValueError("must be greater than zero")
    return micros


def _serialize_amount(micros: int) -> str:
    return format_amount(micros)


_MAX_UNITS = MAX_MICROS // MICROS_PER_UNIT
_MAX_SECONDS = 366 * 86_400
_AMOUNT_TEXT = 'A decimal amount with at most 6 decimals, like "12.50", or whole units.'
_DURATION_TEXT = 'A duration like "500ms", "30s", "5m", "72h" or "1h30m", or whole seconds.'

Amount = Annotated[
    int,
    BeforeValidator(_amount),
    PlainSerializer(_serialize_amount, str),
    WithJsonSchema(_int_or_string(AMOUNT_PATTERN, 0, _MAX_UNITS, _AMOUNT_TEXT, 23)),
]
PositiveAmount = Annotated[
    int,
    BeforeValidator(_positive_amount),
    PlainSerializer(_serialize_amount, str),
    WithJsonSchema(
        _int_or_string(AMOUNT_PATTERN, 1, _MAX_UNITS, _AMOUNT_TEXT + " Greater than zero.", 23)
        | cel(("type(self) == int ? self > 0 : double(self) > 0.0", "must be greater than zero"))
    ),
]
DurationMs = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, str),
    WithJsonSchema(_int_or_string(DURATION_PATTERN, 0, _MAX_SECONDS, _DURATION_TEXT)),
]
# Validated like DurationMs; the model validators refuse zero, the CRD schema says so too.
PositiveDurationMs = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, str),
    WithJsonSchema(
        _int_or_string(POSITIVE_DURATION_PATTERN, 1, _MAX_SECONDS, _DURATION_TEXT + " Not zero.")
    ),
]
Currency = Annotated[
    str,
    BeforeValidator(validate_currency),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": CURRENCY_RE.pattern,
            "description": 'An ISO 4217 code like "USD" or a lower-case unit like "credits".',
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        str_strip_whitespace=True,
    )

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- shared pieces


class Per(StrEnum):
    second = "second"
    minute = "minute"
    hour = "hour"
    day = "day"

    @property
    def milliseconds(self) -> int:
        return {"second": 1_000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}[self.value]


class RateLimit(_Model):
    """``{requests: 10, per: minute}`` or ``{cost: "5.00", per: hour}``; GCRA with a burst."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.requests) != has(self.cost)", "give exactly one of requests or cost")
        )
    )

    requests: int | None = Field(default=None, gt=0, le=1_000_000_000)
    cost: PositiveAmount | None = None
    per: Per
    burst: int | None = Field(
        default=None,
        gt=0,
        description="How many requests (or how much cost, for cost limits, as a fraction of"
        " the limit in percent) may arrive at once; defaults to the whole limit.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.requests is None) == (self.cost is None):
            raise ValueError("give exactly one of requests or cost")
        return self

    @property
    def kind(self) -> Literal["requests", "cost"]:
        return "requests" if self.requests is not None else "cost"

    @property
    def amount(self) -> int:
        """The limit per window: a request count, or a cost in micro-units."""
        return self.requests if self.requests is not None else self.cost  # type: ignore[return-value]


class SecretKeyRef(_Model):
    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    key: str = Field(default="api-key", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


class ApiKeyRef(_Model):
    """One API key of a customer, held in a Secret; only its SHA-256 hash reaches Redis."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.limit) == has(self.period)", "a key's spend cap needs both limit and period")
        )
    )

    name: str = Field(pattern=KEY_NAME_PATTERN, json_schema_extra=_NAME_SCHEMA)
    secret_ref: SecretKeyRef
    rate_limits: list[RateLimit] = Field(default_factory=list, max_length=8)
    limit: PositiveAmount | None = Field(
        default=None, description="This key's own spend cap per period, inside its budget's."
    )
    period: Period | None = Field(default=None, description="The period the key's limit counts.")
    disabled: bool = False

    @model_validator(mode="after")
    def _key_cap(self) -> Self:
        if (self.limit is None) != (self.period is None):
            raise ValueError(f"apiKeys[{self.name}]: a key's spend cap needs both limit and period")
        return self


# --------------------------------------------------------------------------- CustomerBudget


class Mode(StrEnum):
    prepaid = "prepaid"
    capped = "capped"


class Period(StrEnum):
    day = "day"
    week = "week"
    month = "month"


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


# --------------------------------------------------------------------------- PriceBook


class UsageHeaders(_Model):
    input_tokens: str = "X-Usage-Input-Tokens"
    output_tokens: str = "X-Usage-Output-Tokens"


class Match(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.path) && has(self.pathPrefix))",
                "give path or pathPrefix, not both",
            )
        )
    )

    # Lower-case methods are upper-cased here; the CRD schema only takes the upper-case ones.
    methods: list[str] = Field(
        default_factory=lambda: ["POST"],
        min_length=1,
        json_schema_extra={"items": {"type": "string", "enum": list(HTTP_METHODS)}},
    )
    path: str | None = Field(default=None, pattern=r"^/")
    path_prefix: str | None = Field(default=None, pattern=r"^/")
    models: list[str] = Field(default_factory=list, description="Glob patterns on body.model")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        allowed = set(HTTP_METHODS)
        upper = [method.upper() for method in value]
        for index, method in enumerate(upper):
            if method not in allowed:
                raise ValueError(
                    f"[{index}] {method!r} must be one of {', '.join(sorted(allowed))}"
                )
        return upper

    @model_validator(mode="after")
    def _one_path(self) -> Self:
        if self.path is not None and self.path_prefix is not None:
            raise ValueError("give path or pathPrefix, not both")
        return self

    def matches(self, method: str, path: str, model: str | None) -> bool:
        if method.upper() not in self.methods:
            return False
        if self.path is not None and path != self.path:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.models:
            return model is not None and any(fnmatch.fnmatchcase(model, p) for p in self.models)
        return True


class Price(_Model):
    flat: Amount = 0
    per_million_input_tokens: Amount = 0
    per_million_output_tokens: Amount = 0
    per_second: Amount = 0

    @property
    def is_flat_only(self) -> bool:
        return not (
            self.per_million_input_tokens or self.per_million_output_tokens or self.per_second
        )


_NO_PRICE = Price()


class Estimate(_Model):
    input_tokens: int | None = Field(
        default=None,
        ge=0,
        description="A fixed prompt size you guarantee; default: bounded from the request body.",
    )
    output_tokens: int = Field(
        default=256,
        ge=0,
        description="Output tokens a rule's price expressions see when the request sends no"
        " limit; token-priced rules hold the request's limit (maxOutputTokens if none).",
    )
    seconds: DurationMs = Field(
        default=0,
        description="GPU-time window held at a time for per-second prices; default:"
        " a tenth of the timeout, at least one second.",
    )


MAX_OUTPUT_TOKENS_LIMIT = 10_000_000
DEFAULT_MIN_OUTPUT_TOKENS = 16


class PromptOverhead(_Model):
    """Tokens a chat template adds around the request's text (role headers, preambles)."""

    per_message: int = Field(default=16, ge=0, le=100_000)
    per_request: int = Field(default=256, ge=0, le=1_000_000)


class FailureCharge(StrEnum):
    free = "free"
    metered = "metered"


PRICE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,63}$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"
COUNT_FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class ExpressionPrice(_Model):
    """CEL price expressions (docs/pricing.md): a bound held before, a cost charged after."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.clampField) || has(self.bound)",
                "clampField lowers a count the bound reads: give a bound",
            )
        )
    )

    bound: str | None = Field(
        default=None,
        max_length=2000,
        description="CEL: the most this request may cost, from the request alone (micro-units).",
    )
    cost: str | None = Field(
        default=None,
        max_length=2000,
        description="CEL: what the answer costs (micro-units); default: the bound.",
    )
    prices: dict[str, Amount] = Field(
        default_factory=dict,
        max_length=256,
        description='Named amounts, like {"hd_1024x1024": "0.08"}: prices.NAME in micro-units.',
        json_schema_extra=cel(
            (
                f"self.all(k, k.matches('{PRICE_NAME_PATTERN}'))",
                "price names are 1-63 letters, digits and _ . : -",
            )
        ),
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Values for request fields the body leaves out, like {n: 1}.",
    )
    headers: list[Annotated[str, Field(pattern=HEADER_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Request headers the expressions read."
    )
    response_headers: list[Annotated[str, Field(pattern=HEADER_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Response headers the cost reads."
    )
    clamp_field: str | None = Field(
        default=None,
        pattern=COUNT_FIELD_PATTERN,
        description="A JSON request field holding a count the bound reads (like n): when the"
        " balance cannot pay the bound, the count is lowered to the largest value it pays for"
        " (down to 1; fewer is refused with 402). Default: refuse.",
    )

    @field_validator("prices")
    @classmethod
    def _price_names(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            if not re.match(PRICE_NAME_PATTERN, name):
                raise ValueError(f"{name!r}: price names are 1-63 letters, digits and _ . : -")
        return value


# A model name (what body.model is set to), not a glob pattern like Match.models.
DOWNGRADE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"


class PriceRule(_Model):
    # "maximum must be at least the flat price" is not repeated in CEL: comparing decimal strings
    # would mean comparing doubles. The operator validates it with this model and reports it.
    # A zero timeout is refused by the schema (PositiveDurationMs).
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.maximum) || has(self.expression) || !("
                + " || ".join(
                    _nonzero_amount(f"self.price.{name}")
                    for name in ("perMillionInputTokens", "perMillionOutputTokens", "perSecond")
                )
                + ")",
                "a rule with token or time prices needs a maximum",
            ),
            ("has(self.price) != has(self.expression)", "give price or expression, not both"),
            (
                "!has(self.minOutputTokens) || self.minOutputTokens <="
                " (has(self.maxOutputTokens) ? self.maxOutputTokens : 4096)",
                "minOutputTokens must not exceed maxOutputTokens",
            ),
        )
    )

    name: str = Field(pattern=KEY_NAME_PATTERN, json_schema_extra=_NAME_SCHEMA)
    match: Match = Field(default_factory=Match)
    price: Price | None = None
    expression: ExpressionPrice | None = None
    estimate: Estimate = Field(default_factory=Estimate)
    maximum: PositiveAmount | None = None
    timeout: PositiveDurationMs = 300_000
    on_upstream_error: FailureCharge = FailureCharge.free
    on_client_disconnect: FailureCharge = FailureCharge.metered
    tokenizer: str | None = Field(
        default=None,
        pattern=r"^/",
        max_length=4096,
        description="Path of the model's tokenizer.json in the sidecar's container: prompts"
        " are counted exactly instead of bounded by their UTF-8 size.",
    )
    prompt_overhead: PromptOverhead = Field(default_factory=PromptOverhead)
    max_output_tokens: int = Field(
        default=4096,
        ge=1,
        le=MAX_OUTPUT_TOKENS_LIMIT,
        description="The most output tokens a request may ask for; set when the client sends"
        " no limit, lowered to when it asks for more.",
    )
    min_output_tokens: int | None = Field(
        default=None,
        ge=0,
        le=MAX_OUTPUT_TOKENS_LIMIT,
        description="A request whose balance covers fewer output tokens is refused (402);"
        " default 16 (or maxOutputTokens, if smaller).",
    )

    downgrade_to: str | None = Field(
        default=None,
        pattern=DOWNGRADE_MODEL_PATTERN,
        max_length=253,
        description="The cheaper model (priced by another rule of this PriceBook, on this"
        " route) that requests of this rule are rewritten to while a downgrade soft limit of"
        " their budget is reached.",
    )

    _pricing: ExpressionPricing | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _price_or_expression(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [name for name in ("price", "expression") if data.get(name) is not None]
            if not given:
                raise ValueError("give price (flat, tokens, seconds) or expression")
            if len(given) > 1:
                raise ValueError("give price or expression, not both")
        return data

    @model_validator(mode="after")
    def _maximum(self) -> Self:
        if self.min_output_tokens is not None and self.min_output_tokens > self.max_output_tokens:
            raise ValueError("minOutputTokens must not exceed maxOutputTokens")
        if self.expression is not None:
            self._compile_expressions(self.expression)
        elif self.maximum is None:
            if not self.simple_price.is_flat_only:
                raise ValueError("a rule with token or time prices needs a maximum")
        elif self.maximum < self.simple_price.flat:
            raise ValueError("maximum must be at least the flat price")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        return self

    def _compile_expressions(self, expression: ExpressionPrice) -> None:
        if expression.clamp_field is not None:
            if expression.bound is None:
                raise ValueError(
                    f"rule {self.name!r}: expression.clampField lowers a count the bound reads:"
                    " give a bound"
                )
            read = fields_read(expression.bound, "request")
            if read is not None and expression.clamp_field not in read:
                raise ValueError(
                    f"rule {self.name!r}: expression.clampField: the bound does not read"
                    f" request.{expression.clamp_field}, so lowering it cannot lower the hold"
                )
        try:
            self._pricing = ExpressionPricing(
                bound=expression.bound,
                cost=expression.cost,
                prices=expression.prices,
                defaults=expression.defaults,
                headers=tuple(expression.headers),
                response_headers=tuple(expression.response_headers),
                maximum=self.maximum,
            )
        except ExpressionError as error:
            part = f".{error.part}" if isinstance(error, RuleExpressionError) else ""
            raise ValueError(f"rule {self.name!r}: expression{part}: {error}") from None

    @property
    def simple_price(self) -> Price:
        """The flat/token/second price; all zero for a rule priced by expressions."""
        return self.price if self.price is not None else _NO_PRICE

    @property
    def pricing(self) -> ExpressionPricing | None:
        """The compiled expressions (compiled once, when the PriceBook is parsed)."""
        return self._pricing

    @property
    def max_cost(self) -> int:
        if self.maximum is not None:
            return self.maximum
        return self.simple_price.flat

    @property
    def output_floor(self) -> int:
        """The fewest output tokens a clamped request is sent with."""
        if self.min_output_tokens is not None:
            return self.min_output_tokens
        return min(DEFAULT_MIN_OUTPUT_TOKENS, self.max_output_tokens)


class Unmatched(StrEnum):
    deny = "deny"
    free = "free"


class PriceBookSpec(_Model):
    currency: Currency
    rules: list[PriceRule] = Field(
        min_length=1,
        max_length=200,
        description="Tried in order; the first rule that matches a request prices it.",
        json_schema_extra=cel(
            ("self.all(r, self.exists_one(s, s.name == r.name))", "rule names must be unique")
        ),
    )
    unmatched: Unmatched = Unmatched.deny
    usage_headers: UsageHeaders = Field(default_factory=UsageHeaders)
    clamp_output: bool = Field(
        default=True,
        description="Lower a request's output limit to what the balance covers (down to the"
        " rule's minOutputTokens) instead of refusing it with 402.",
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Self:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _downgrades(self) -> Self:
        for index, rule in enumerate(self.rules):
            if rule.downgrade_to is not None:
                self._check_downgrade(index, rule, rule.downgrade_to)
        return self

    def _check_downgrade(self, index: int, rule: PriceRule, model: str) -> None:
        where = f"rules[{index}] ({rule.name}).downgradeTo"
        method, path = rule.match.methods[0], rule.match.path or rule.match.path_prefix or "/"
        target = self.find_rule(method, path, model)
        if target is None:
            raise ValueError(f"{where}: no rule prices model {model!r} on {method} {path}")
        if target is rule:
            raise ValueError(
                f"{where}: model {model!r} is priced by this same rule, so the downgrade would"
                " cost the same; name a model another rule prices"
            )
        if rule.price is not None and target.price is not None:
            pricier = [
                name
                for name in Price.model_fields
                if getattr(target.price, name) > getattr(rule.price, name)
            ]
            if target.max_cost > rule.max_cost:
                pricier.append("maximum")
            if pricier:
                raise ValueError(
                    f"{where}: rule {target.name!r} (model {model!r}) is not cheaper:"
                    f" {', '.join(to_camel(name) for name in pricier)} higher"
                )

    def find_rule(self, method: str, path: str, model: str | None) -> PriceRule | None:
        for rule in self.rules:
            if rule.match.matches(method, path, model):
                return rule
        return None

    def downgrade_of(self, rule: PriceRule, method: str, path: str) -> PriceRule | None:
        """The rule pricing ``rule.downgradeTo`` for this request, or None (no downgrade, or
        its model is not priced on this route)."""
        if rule.downgrade_to is None:
            return None
        target = self.find_rule(method, path, rule.downgrade_to)
        return None if target is None or target is rule else target


# --------------------------------------------------------------------------- resources


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    namespace: str = Field(default="default", pattern=DNS_SUBDOMAIN_PATTERN, max_length=63)
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CustomerBudget(_Model):
    """One paying customer: API keys, a prepaid balance or a capped spend, rate limits, policy."""

    api_version: Literal["spendgate.dev/v1alpha1"] = API_VERSION
    kind: Literal["CustomerBudget"] = "CustomerBudget"
    metadata: ObjectMeta
    spec: CustomerBudgetSpec
    status: CustomerBudgetStatus | None = None

    @property
    def ref(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class PriceBook(_Model):
    """How a model deployment charges: rules that match requests and price them."""

    api_version: Literal["spendgate.dev/v1alpha1"] = API_VERSION
    kind: Literal["PriceBook"] = "PriceBook"
    metadata: ObjectMeta
    spec: PriceBookSpec
    status: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


# --------------------------------------------------------------------------- parsing


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _format_loc(loc: tuple[int | str, ...]) -> str:
    """``spec.rules[0].price``; a key that is not a plain name is quoted: ``price['']``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "function-plain")):
            continue
        elif not _PLAIN_KEY.match(part):
            text += f"[{part[:64]!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text


format_loc = _format_loc  # the same field paths for problems found outside the models


def _strip_prefix(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _enum_hint(error: Any) -> str:
    expected = (error.get("ctx") or {}).get("expected")
    if error["type"] == "enum" and expected:
        return f"must be one of {expected}"
    if error["type"] == "literal_error" and expected:
        return f"must be {expected}"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"{error['input']!r} does not match {error['ctx']['pattern']}"
    return _strip_prefix(error["msg"])


def validation_problems(error: ValidationError) -> list[str]:
    """Turn a pydantic error into ``["spec.rateLimits[1].per: must be one of ..."]``."""
    problems = []
    for item in error.errors():
        loc = _format_loc(item["loc"])
        problems.append(f"{loc}: {_enum_hint(item)}" if loc else _enum_hint(item))
    return problems


ResourceModel = CustomerBudget | PriceBook
KINDS: dict[str, type[CustomerBudget] | type[PriceBook]] = {
    "CustomerBudget": CustomerBudget,
    "PriceBook": PriceBook,
}


def parse_resource(manifest: dict[str, Any], source: str = "<manifest>") -> ResourceModel:
    """Validate a CustomerBudget or PriceBook manifest; raise ManifestError naming each field."""
    if not isinstance(manifest, dict):
        raise ManifestError(source, [f"expected a mapping, got {type(manifest).__name__}"])
    kind = manifest.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError(source, [f"kind: {kind!r} is not one of {', '.join(KINDS)}"])
    api_version = manifest.get("apiVersion")
    if api_version != API_VERSION:
        raise ManifestError(source, [f"apiVersion: {api_version!r} must be {API_VERSION!r}"])
    try:
        return model.model_validate(manifest)
    except ValidationError as error:
        raise ManifestError(source, validation_problems(error)) from None
