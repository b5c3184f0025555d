"""Pieces every budget level has: rate limits, modes and periods, API keys."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from .fields import (
    _NAME_SCHEMA,
    DNS_SUBDOMAIN_PATTERN,
    KEY_NAME_PATTERN,
    PositiveAmount,
    _Model,
    cel,
)


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


class Mode(StrEnum):
    prepaid = "prepaid"
    capped = "capped"


class Period(StrEnum):
    day = "day"
    week = "week"
    month = "month"
