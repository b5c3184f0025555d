"""What a hold pays for: GPU time under per-second prices, and counts under a clampField."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict

from spendgate.models import PriceRule
from spendgate.pricing import ExpressionForm, RequestFacts, RulePricing, cost_of, inspect_body


def timed(**fields: Any) -> PriceRule:
    body: dict[str, Any] = {
        "name": "gpu",
        "price": {"flat": "0.01", "perMillionOutputTokens": "10000", "perSecond": "0.003"},
        "estimate": {"seconds": "200ms"},
        "maximum": "5.00",
        "timeout": "10s",
        **fields,
    }
    return PriceRule.model_validate(body)


FACTS = RequestFacts(max_tokens=20)


def test_a_hold_pays_for_its_window_and_the_largest_time_within_it() -> None:
    form = RulePricing(timed())
    bound = form.bound(FACTS)
    assert bound.window_ms == 200
    assert form.paid_ms(bound, 20, bound.hold) == 200
    for held in range(bound.hold, bound.hold + 50):
        paid = form.paid_ms(bound, 20, held)
        assert paid is not None
        assert cost_of(form.rule, bound.input_tokens, 20, paid) <= held  # covered...
        assert cost_of(form.rule, bound.input_tokens, 20, paid + 1) > held  # ...and no more


def test_hold_for_ms_extends_by_the_exact_cost_of_the_time() -> None:
    form = RulePricing(timed())
    bound = form.bound(FACTS)
    assert form.hold_for_ms(bound, 20, 400) == cost_of(form.rule, bound.input_tokens, 20, 400)
    assert form.paid_ms(bound, 20, form.hold_for_ms(bound, 20, 400)) == 400


def test_nothing_to_extend_at_the_maximum_or_without_a_time_price() -> None:
    form = RulePricing(timed())
    bound = form.bound(FACTS)
    assert form.paid_ms(bound, 20, form.rule.max_cost) is None
    flat = RulePricing(timed(price={"flat": "0.01", "perMillionOutputTokens": "1"}))
    assert flat.paid_ms(flat.bound(FACTS), 20, 10**6) is None


def images_rule(**expression: Any) -> PriceRule:
    return PriceRule.model_validate(
        {
            "name": "images",
            "expression": {
                "defaults": {"n": 1},
                "prices": {"image": "0.12"},
                "bound": "int(request.n) * prices.image",
                "cost": "size(response.data) * prices.image",
                **expression,
            },
            "maximum": "1.20",
        }
    )


def images_form(rule: PriceRule, body: dict[str, Any]) -> tuple[ExpressionForm, Any]:
    raw = json.dumps(body).encode()
    headers = CIMultiDict({"Content-Type": "application/json"})
    form = ExpressionForm(
        rule, rule.pricing, "POST", "/v1/images/generations", headers, raw,  # type: ignore[arg-type]
        "application/json", 0,
    )  # fmt: skip
    return form, form.bound(inspect_body(raw, "application/json"))


@pytest.mark.parametrize(("held", "count"), [(120_000, 1), (360_000, 3), (479_999, 3)])
def test_the_largest_count_the_hold_pays_for(held: int, count: int) -> None:
    form, bound = images_form(images_rule(clampField="n"), {"n": 10})
    assert (bound.hold, bound.minimum) == (1_200_000, 120_000)
    assert form.count_for(held) == ("n", count)
    assert form.max_cost == count * 120_000  # the cost is capped at the lowered bound


def test_no_count_change_when_the_hold_pays_or_clamping_is_off() -> None:
    form, bound = images_form(images_rule(clampField="n"), {"n": 10})
    assert form.count_for(bound.hold) is None
    off, bound = images_form(images_rule(), {"n": 10})
    assert bound.minimum == bound.hold and off.count_for(120_000) is None


def test_a_clamp_field_the_bound_does_not_read_is_refused() -> None:
    with pytest.raises(ValueError, match=r"does not read request\.count"):
        images_rule(clampField="count")


def gpu_expression_rule(
    bound: str = "ceil_div(held_ms * prices.gpu_second, 1000)", **fields: Any
) -> PriceRule:
    return PriceRule.model_validate(
        {
            "name": "infer",
            "expression": {
                "prices": {"gpu_second": "1.00"},
                "bound": bound,
                "cost": "ceil_div(upstream_ms * prices.gpu_second, 1000)",
            },
            "estimate": {"seconds": "200ms"},
            "timeout": "1s",
            **fields,
        }
    )


def test_an_expression_over_held_ms_is_bounded_a_window_at_a_time() -> None:
    form, bound = images_form(gpu_expression_rule(), {})
    assert (bound.hold, bound.window_ms) == (200_000, 200)
    assert form.paid_ms(bound, None, 200_000) == 200
    assert form.hold_for_ms(bound, None, 400) == 400_000
    assert form.paid_ms(bound, None, 399_999) == 200  # a part of a window buys no time
    assert form.paid_ms(bound, None, 400_000) == 400
    assert form.max_cost == 400_000  # the cost is capped at the bound for the held time
    assert form.paid_ms(bound, None, 1_000_000) is None  # the whole timeout is held


def test_an_expression_without_a_window_or_held_ms_is_held_whole() -> None:
    form, bound = images_form(gpu_expression_rule(estimate={}), {})
    assert (bound.hold, bound.window_ms) == (1_000_000, 0)
    assert form.paid_ms(bound, None, bound.hold) is None
    form, bound = images_form(gpu_expression_rule("timeout_ms * 1000"), {})
    assert (bound.hold, bound.window_ms) == (1_000_000, 0)
