"""Exchange rates of custom units: exact conversion, history, the rate in force at payment."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.exchange import (
    MAX_HISTORY,
    Rate,
    RateError,
    current_rate,
    decode,
    encode,
    rate_at,
    record,
)
from spendgate.models import ManifestError, parse_resource
from spendgate.money import parse_amount

DAY_MS = 86_400_000


def credits_budget(**stripe: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": "acme"},
        "spec": {
            "customerId": "acme",
            "currency": "credits",
            "stripe": {"customerId": "cus_A", **stripe},
        },
    }


def test_a_usd_payment_buys_credits_exactly() -> None:
    rate = Rate("USD", parse_amount("100"), 0)
    assert rate.convert(parse_amount("12.34")) == parse_amount("1234")
    assert rate.describe("credits") == "100 credits per USD"
    odd = Rate("EUR", parse_amount("0.333333"), 0)
    assert odd.convert(parse_amount("3")) == 999_999  # rounded down, never up
    with pytest.raises(RateError):
        rate.convert(-1)


@given(
    units=st.integers(1, 10**12),
    a=st.integers(0, 10**12),
    b=st.integers(0, 10**12),
)
def test_conversion_never_creates_value(units: int, a: int, b: int) -> None:
    rate = Rate("USD", units, 0)
    together = rate.convert(a + b)
    apart = rate.convert(a) + rate.convert(b)
    assert apart <= together <= apart + 1  # splitting a payment loses at most one micro-unit
    assert together * 1_000_000 <= (a + b) * units


def test_history_keeps_every_rate_with_the_time_it_came_into_force() -> None:
    history = record([], "USD", parse_amount("100"), now_ms=5 * DAY_MS)
    assert history == [Rate("USD", 100_000_000, 0)]  # the first rate covers earlier payments
    assert record(history, "USD", parse_amount("100"), now_ms=6 * DAY_MS) == history
    history = record(history, "USD", parse_amount("120"), now_ms=10 * DAY_MS)
    assert current_rate(history, "USD") == Rate("USD", 120_000_000, 10 * DAY_MS)
    assert rate_at(history, "USD", 9 * DAY_MS).units == 100_000_000
    assert rate_at(history, "USD", 10 * DAY_MS).units == 120_000_000
    assert rate_at(history, "USD", 1).units == 100_000_000
    back_in_time = record(history, "USD", parse_amount("90"), now_ms=DAY_MS)
    assert current_rate(back_in_time, "USD").units == 90_000_000  # type: ignore[union-attr]
    assert rate_at(back_in_time, "USD", 9 * DAY_MS).units == 100_000_000
    with pytest.raises(RateError, match="no exchange rate for EUR"):
        rate_at(history, "EUR", 0)


def test_history_is_bounded_and_round_trips() -> None:
    history: list[Rate] = []
    for day in range(MAX_HISTORY + 20):
        history = record(history, "USD", 1_000_000 + day, now_ms=day * DAY_MS + 1)
    assert len(history) == MAX_HISTORY
    assert decode(encode(history)) == history
    assert decode(None) == [] and decode("") == []
    with pytest.raises(RateError):
        decode("{not json")
    with pytest.raises(RateError):
        decode('[["USD", "x", 1]]')


def test_exchange_rate_is_validated_where_it_is_written() -> None:
    budget = parse_resource(credits_budget(exchangeRate={"currency": "USD", "units": "100"}))
    assert budget.spec.stripe.exchange_rate.units == 100_000_000  # type: ignore[union-attr]
    bad = [
        (credits_budget(exchangeRate={"currency": "usd", "units": "100"}), "exchangeRate.currency"),
        (credits_budget(exchangeRate={"currency": "USD", "units": "0"}), "greater than zero"),
        (credits_budget(exchangeRate={"currency": "USD", "units": 1.5}), "decimal string"),
        (credits_budget(exchangeRate={"currency": "USD"}), "exchangeRate.units: required"),
    ]
    usd = credits_budget(exchangeRate={"currency": "USD", "units": "1"})
    usd["spec"]["currency"] = "USD"
    bad.append((usd, "stripe.exchangeRate is for budgets in a custom unit"))
    for manifest, expected in bad:
        with pytest.raises(ManifestError) as caught:
            parse_resource(manifest)
        assert expected in str(caught.value), str(caught.value)
