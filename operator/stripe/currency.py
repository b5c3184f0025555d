"""Stripe amounts (integers in the currency's minor unit) and spendgate's micro-units."""

from __future__ import annotations

# Stripe's currencies whose minor unit is not 1/100 of the unit.
ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


def minor_to_micros(amount: int, currency: str) -> int:
    """Stripe amounts are in the currency's minor unit; spendgate's in micro-units."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError(f"Stripe amount must be an integer, got {amount!r}")
    code = currency.lower()
    if code in ZERO_DECIMAL:
        return amount * 1_000_000
    if code in THREE_DECIMAL:
        return amount * 1_000
    return amount * 10_000


def micros_to_minor_ceil(micros: int, currency: str) -> int:
    """Micro-units to the currency's minor unit, rounded up (never under-bill)."""
    per = minor_to_micros(1, currency)
    return -((-micros) // per)


def currency_matches(stripe_currency: str | None, budget_currency: str) -> bool:
    """Stripe writes ISO codes lower-case; budgets upper-case. Custom units never match."""
    return bool(stripe_currency) and str(stripe_currency).upper() == budget_currency


__all__ = [
    "THREE_DECIMAL",
    "ZERO_DECIMAL",
    "currency_matches",
    "micros_to_minor_ceil",
    "minor_to_micros",
]
