"""The simple flat/token/second price written as the cost expression that charges the same.

``spendgate.pricing.cost_of`` rounds each part up; so does this expression. The property test
in tests/core/test_expressions.py holds the two to agreeing, which is what lets users move a
rule from the simple form to an expression without a change in what anyone pays.
"""

from __future__ import annotations

SIMPLE_COST = (
    "prices.flat"
    " + ceil_div(tokens.input * prices.per_million_input_tokens, 1000000)"
    " + ceil_div(tokens.output * prices.per_million_output_tokens, 1000000)"
    " + ceil_div(upstream_ms * prices.per_second, 1000)"
)


def simple_prices(
    flat: int, per_million_input_tokens: int, per_million_output_tokens: int, per_second: int
) -> dict[str, int]:
    """The ``prices`` that make :data:`SIMPLE_COST` charge like the simple price (micro-units)."""
    return {
        "flat": flat,
        "per_million_input_tokens": per_million_input_tokens,
        "per_million_output_tokens": per_million_output_tokens,
        "per_second": per_second,
    }


__all__ = ["SIMPLE_COST", "simple_prices"]
