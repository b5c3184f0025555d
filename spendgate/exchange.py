"""Custom units with exchange rates: how many units of a budget (``credits``) one unit of a
Stripe currency buys, and the history of that rate.

A budget kept in a custom unit says in ``spec.stripe.exchangeRate`` what one unit of its Stripe
currency buys (``{currency: USD, units: "100"}``: 100 credits per dollar). The operator keeps
every rate it has applied, each with the time it came into force, next to the budget's Stripe
link. A payment converts at the rate in force when it was *made*, so a webhook delivered (or a
reconciliation run) after a rate change still funds what the customer paid for; a rate change
never touches a balance, only what later payments buy.

Conversion is exact integer arithmetic on micro-units, rounded down to the micro-unit: funding
never creates value that was not paid for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .money import MICROS_PER_UNIT, format_amount

MAX_HISTORY = 100


class RateError(ValueError):
    """No usable rate: the payment's currency has none, or the stored history is unreadable."""


@dataclass(frozen=True)
class Rate:
    """From ``since_ms`` on, one unit of ``currency`` buys ``units`` micro-units' worth of units
    (``units`` is micro-units of the budget's unit per whole currency unit)."""

    currency: str
    units: int
    since_ms: int

    def convert(self, currency_micros: int) -> int:
        """Micro-units of ``currency`` to micro-units of the budget's unit, rounded down."""
        if currency_micros < 0:
            raise RateError("amounts to convert must not be negative")
        return currency_micros * self.units // MICROS_PER_UNIT

    def describe(self, unit: str) -> str:
        return f"{format_amount(self.units, min_decimals=0)} {unit} per {self.currency}"


def record(history: list[Rate], currency: str, units: int, now_ms: int) -> list[Rate]:
    """The history after the budget says ``units`` per ``currency``; unchanged if it already
    did. The first rate of a currency is in force from the beginning (payments made before it
    was configured convert at it); later ones from ``now_ms``."""
    current = current_rate(history, currency)
    if current is not None and current.units == units:
        return history
    since = now_ms if current is not None else 0
    if current is not None and since <= current.since_ms:
        since = current.since_ms + 1  # a clock that went back never reorders the history
    return [*history, Rate(currency, units, since)][-MAX_HISTORY:]


def current_rate(history: list[Rate], currency: str) -> Rate | None:
    rates = [rate for rate in history if rate.currency == currency]
    return max(rates, key=lambda rate: rate.since_ms) if rates else None


def rate_at(history: list[Rate], currency: str, at_ms: int) -> Rate:
    """The rate of ``currency`` in force at ``at_ms`` (the payment's time)."""
    rates = sorted((r for r in history if r.currency == currency), key=lambda r: r.since_ms)
    if not rates:
        raise RateError(f"no exchange rate for {currency}")
    in_force = rates[0]
    for rate in rates:
        if rate.since_ms <= at_ms:
            in_force = rate
    return in_force


def encode(history: list[Rate]) -> str:
    return json.dumps([[rate.currency, rate.units, rate.since_ms] for rate in history])


def decode(text: str | bytes | None) -> list[Rate]:
    if not text:
        return []
    try:
        rows = json.loads(text)
        return [Rate(str(currency), int(units), int(since)) for currency, units, since in rows]
    except (ValueError, TypeError) as error:
        raise RateError(f"stored exchange-rate history is unreadable: {error}") from None


__all__ = [
    "MAX_HISTORY",
    "Rate",
    "RateError",
    "current_rate",
    "decode",
    "encode",
    "rate_at",
    "record",
]
