"""Money as integers: micro-units (1e-6) of a budget's currency inside, decimal strings outside.

No float ever touches a balance. ``parse_amount("12.50") == 12_500_000`` and
``format_amount(12_500_000) == "12.50"``.
"""

from __future__ import annotations

import re
from decimal import Decimal

MICROS_PER_UNIT = 1_000_000

# An amount is a plain decimal string with at most six fractional digits: no exponent,
# no thousands separators, no currency sign. Sign is only allowed where the caller says so.
# The pattern takes any number of digits so that a long amount is reported as too large (or as
# too precise), not as "not a decimal"; the range check below bounds it.
_AMOUNT_RE = re.compile(r"^(?P<sign>[+-])?(?P<int>\d+)(?:\.(?P<frac>\d+))?$", re.ASCII)
MAX_DECIMALS = 6
_MAX_INT_DIGITS = 15  # as AMOUNT_PATTERN in models/fields.py; beyond MAX_MICROS anyway

# The Lua ledger computes in doubles: amounts must stay integers below 2^53 to be exact
# (a larger one would be rounded silently, or make HINCRBY fail). About 9 billion units.
MAX_MICROS = 2**53 - 1

# ISO 4217 codes are three upper-case letters; custom units ("credits", "gpu-hours") are
# lower-case words. Currencies are compared exactly, so "usd" and "USD" are different units.
CURRENCY_RE = re.compile(r"^(?:[A-Z]{3}|[a-z][a-z0-9-]{1,31})$")


class AmountError(ValueError):
    """A money amount that cannot be parsed or is out of range."""


def parse_amount(text: str | int, *, allow_negative: bool = False) -> int:
    """Parse a decimal string like ``"12.50"`` into micro-units.

    Integers are accepted as whole units (YAML turns ``balance: 10`` into an int).
    Floats are refused: ``0.1`` in YAML is already imprecise, so the user must quote it.
    """
    if isinstance(text, bool):
        raise AmountError(f'expected a decimal string like "12.50", got {text!r}')
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        raise AmountError(
            f'expected a decimal string like "12.50", got {type(text).__name__} {text!r}'
            " (quote amounts in YAML)"
        )
    match = _AMOUNT_RE.match(text.strip())
    if match is None:
        raise AmountError(
            f"{text!r} is not a decimal amount (expected digits with at most"
            f' {MAX_DECIMALS} decimals, like "12.50")'
        )
    frac = match["frac"] or ""
    if len(frac) > MAX_DECIMALS:
        raise AmountError(
            f"{text!r} has {len(frac)} decimals; amounts have at most {MAX_DECIMALS}"
            " (micro-units), and are never rounded"
        )
    digits = match["int"]
    too_large = f"{text!r} is too large (at most {format_amount(MAX_MICROS)})"
    if len(digits) > _MAX_INT_DIGITS:  # never int() an unbounded string
        if len(digits.lstrip("0")) > _MAX_INT_DIGITS:
            raise AmountError(too_large)
        raise AmountError(f"{text!r} has more than {_MAX_INT_DIGITS} digits before the point")
    micros = int(digits) * MICROS_PER_UNIT + int(frac.ljust(MAX_DECIMALS, "0"))
    if micros > MAX_MICROS:
        raise AmountError(too_large)
    if match["sign"] == "-":
        micros = -micros
    if micros < 0 and not allow_negative:
        raise AmountError(f"{text!r} is negative; amounts here must be zero or more")
    return micros


def format_amount(micros: int, *, min_decimals: int = 2) -> str:
    """Format micro-units as a decimal string, trimming zeros beyond ``min_decimals``."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise AmountError(f"micro-units must be an int, got {micros!r}")
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    frac_text = f"{frac:06d}".rstrip("0").ljust(min_decimals, "0")
    return f"{sign}{whole}.{frac_text}" if frac_text else f"{sign}{whole}"


def to_decimal(micros: int) -> Decimal:
    """Micro-units as an exact Decimal, for display and JSON output."""
    return Decimal(micros).scaleb(-6)


def parse_price(text: str | int) -> int:
    """A price (per unit of something) in micro-units; same rules as an amount, never negative."""
    return parse_amount(text)


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer ceiling division for non-negative operands (costs round up, never down)."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -((-numerator) // denominator)


def validate_currency(code: str) -> str:
    if not isinstance(code, str) or not CURRENCY_RE.match(code):
        raise AmountError(
            f'{code!r} is not a currency: use an ISO 4217 code like "USD" or a lower-case'
            ' unit name like "credits"'
        )
    return code


__all__ = [
    "CURRENCY_RE",
    "MAX_MICROS",
    "MICROS_PER_UNIT",
    "AmountError",
    "ceil_div",
    "format_amount",
    "parse_amount",
    "parse_price",
    "to_decimal",
    "validate_currency",
]
