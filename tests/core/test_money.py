"""spendgate.money: integer micro-units inside, decimal strings outside, never a float."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendgate.money import (
    MAX_MICROS,
    AmountError,
    ceil_div,
    format_amount,
    parse_amount,
    parse_price,
    to_decimal,
    validate_currency,
)


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0", 0),
        ("0.0", 0),
        ("12.50", 12_500_000),
        ("12.5", 12_500_000),
        ("0.000001", 1),
        ("1.123456", 1_123_456),
        ("007.10", 7_100_000),
        ("+5", 5_000_000),
        (" 7.5 ", 7_500_000),
        ("-0", 0),
        ("9007199254.740991", MAX_MICROS),
        (10, 10_000_000),  # YAML ints are whole units
        (0, 0),
    ],
)
def test_parse_amount(text: str | int, micros: int) -> None:
    assert parse_amount(text) == micros


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "12.50 USD",
        "$12.50",
        "1e3",
        "1E-2",
        "1,000",
        "1_000",
        ".5",
        "5.",
        "1.2.3",
        "--1",
        "0x10",
        "NaN",
        "inf",
        "1.1234567",  # more than 6 decimals: refused, never rounded
        "0.0000001",
        "1234567890123456",
        "\u0661\u0662",  # Arabic-Indic digits: int() would take them
        "\uff11\uff12",  # full-width digits
    ],
)
def test_parse_amount_refuses_non_decimals(text: str) -> None:
    with pytest.raises(AmountError):
        parse_amount(text)


@pytest.mark.parametrize("value", [0.1, 1.0, 12.5, True, False, None, Decimal("1.5"), [1], b"1"])
def test_parse_amount_refuses_non_strings(value: object) -> None:
    with pytest.raises(AmountError):
        parse_amount(value)  # type: ignore[arg-type]


def test_parse_amount_float_message_says_quote() -> None:
    with pytest.raises(AmountError, match="quote amounts in YAML"):
        parse_amount(0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1", "-0.000001", -3])
def test_negative_refused_unless_allowed(text: str | int) -> None:
    with pytest.raises(AmountError, match="negative"):
        parse_amount(text)


def test_negative_allowed_when_asked() -> None:
    assert parse_amount("-1.5", allow_negative=True) == -1_500_000
    assert parse_amount(-3, allow_negative=True) == -3_000_000
    assert parse_amount("-0.000001", allow_negative=True) == -1


@pytest.mark.parametrize("text", ["9007199254.740992", "100000000000000", "999999999999999"])
def test_amounts_beyond_exact_lua_range_refused(text: str) -> None:
    # The Lua ledger holds integers exactly only below 2^53 micro-units.
    with pytest.raises(AmountError, match="too large"):
        parse_amount(text)
    with pytest.raises(AmountError, match="too large"):
        parse_amount("-" + text, allow_negative=True)


def test_amount_error_is_value_error() -> None:
    assert issubclass(AmountError, ValueError)


@pytest.mark.parametrize(
    ("micros", "text", "bare", "six"),
    [
        (0, "0.00", "0", "0.000000"),
        (1, "0.000001", "0.000001", "0.000001"),
        (-1, "-0.000001", "-0.000001", "-0.000001"),
        (10, "0.00001", "0.00001", "0.000010"),
        (12_500_000, "12.50", "12.5", "12.500000"),
        (1_000_000, "1.00", "1", "1.000000"),
        (123_456_789, "123.456789", "123.456789", "123.456789"),
        (-5_000_000, "-5.00", "-5", "-5.000000"),
        (-2_500_000, "-2.50", "-2.5", "-2.500000"),
        (MAX_MICROS, "9007199254.740991", "9007199254.740991", "9007199254.740991"),
    ],
)
def test_format_amount(micros: int, text: str, bare: str, six: str) -> None:
    assert format_amount(micros) == text
    assert format_amount(micros, min_decimals=0) == bare
    assert format_amount(micros, min_decimals=6) == six
    assert parse_amount(text, allow_negative=True) == micros  # round trip


@pytest.mark.parametrize("value", [1.5, "1", True, None, Decimal(1)])
def test_format_amount_refuses_non_ints(value: object) -> None:
    with pytest.raises(AmountError):
        format_amount(value)  # type: ignore[arg-type]


def test_to_decimal_is_exact() -> None:
    assert to_decimal(12_500_000) == Decimal("12.5")
    assert to_decimal(1) == Decimal("0.000001")
    assert to_decimal(-MAX_MICROS) == Decimal("-9007199254.740991")


def test_parse_price_never_negative() -> None:
    assert parse_price("0.15") == 150_000
    with pytest.raises(AmountError):
        parse_price("-0.15")


@pytest.mark.parametrize(
    ("num", "den", "result"),
    [
        (0, 3, 0),
        (1, 3, 1),
        (3, 3, 1),
        (4, 3, 2),
        (999_999, 1_000_000, 1),
        (10**20 + 1, 10, 10**19 + 1),
    ],
)
def test_ceil_div_rounds_up(num: int, den: int, result: int) -> None:
    assert ceil_div(num, den) == result


@pytest.mark.parametrize("den", [0, -1])
def test_ceil_div_refuses_bad_denominator(den: int) -> None:
    with pytest.raises(ValueError):
        ceil_div(1, den)


@pytest.mark.parametrize("code", ["USD", "EUR", "credits", "gpu-hours", "tokens2"])
def test_valid_currencies(code: str) -> None:
    assert validate_currency(code) == code


@pytest.mark.parametrize(
    "code", ["", "usd$", "US", "USDT", "Usd", "1credits", "c", "gpu hours", "x" * 40, None, 840]
)
def test_invalid_currencies(code: object) -> None:
    with pytest.raises(AmountError):
        validate_currency(code)  # type: ignore[arg-type]
