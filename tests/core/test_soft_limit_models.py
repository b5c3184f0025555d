"""Soft limits and downgrades in the models: every mistake is named by its field, and the
threshold the scripts and the operator act on is the same, to the micro-unit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.models import (
    API_VERSION,
    CustomerBudget,
    ManifestError,
    PriceBook,
    SoftLimit,
    parse_resource,
)
from spendgate.money import format_amount
from spendgate.script_config import budget_config
from spendgate.soft_limits import reached, spent_at


def budget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "CustomerBudget",
        "metadata": {"name": "acme", "namespace": "team-a"},
        "spec": {"customerId": "acme", "currency": "USD", "balance": "10", **spec},
    }


def chat_rule(name: str, flat: str = "0.01", **fields: Any) -> dict[str, Any]:
    return {"name": name, "match": {"models": [name]}, "price": {"flat": flat}, **fields}


def pricebook(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "PriceBook",
        "metadata": {"name": "llm"},
        "spec": {"currency": "USD", "rules": list(rules)},
    }


def problems(manifest: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_resource(manifest, source="test.yaml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("soft", "field", "message"),
    [
        ({"action": "notify"}, "policy.softLimits[0]", "give exactly one of at or below"),
        ({"action": "notify", "at": 50, "below": "1"}, "policy.softLimits[0]", "exactly one"),
        ({"action": "throttle", "at": 50}, "policy.softLimits[0]", "rateLimits are what"),
        ({"action": "notify", "at": 0}, "policy.softLimits[0].at", "greater than or equal to 1"),
        ({"action": "notify", "at": 101}, "policy.softLimits[0].at", "less than or equal to 100"),
        ({"action": "notify", "below": "0"}, "policy.softLimits[0].below", "greater than zero"),
        ({"action": "slow", "at": 50}, "policy.softLimits[0].action", "notify"),
        ({"action": "notify", "at": 50}, "policy.softLimits[0]", "'at' is a percentage"),
    ],
)
def test_soft_limit_mistakes_name_the_field(soft: dict[str, Any], field: str, message: str) -> None:
    text = problems(budget(policy={"softLimits": [soft]}))
    assert f"spec.{field}" in text or f"{field}:" in text, text
    assert message in text, text


def test_more_than_eight_soft_limits_are_refused() -> None:
    many = [{"action": "notify", "below": str(i + 1)} for i in range(9)]
    assert "policy.softLimits" in problems(budget(policy={"softLimits": many}))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([chat_rule("big", downgradeTo="tiny")], "no rule prices model 'tiny' on POST /"),
        ([chat_rule("big", downgradeTo="big")], "priced by this same rule"),
        (
            [chat_rule("big", downgradeTo="small"), chat_rule("small", flat="0.02")],
            "rule 'small' (model 'small') is not cheaper: flat, maximum higher",
        ),
        ([chat_rule("big", downgradeTo="small-*")], "downgradeTo"),
    ],
)
def test_downgrade_mistakes_name_the_rule(rules: list[dict[str, Any]], message: str) -> None:
    text = problems(pricebook(*rules))
    assert "downgradeTo" in text and message in text, text


def test_a_downgrade_on_another_route_is_not_a_target() -> None:
    images = {"name": "small", "match": {"path": "/v1/images"}, "price": {"flat": "0.001"}}
    text = problems(pricebook(chat_rule("big", downgradeTo="small") | {"match": {
        "path": "/v1/chat/completions", "models": ["big"]}}, images))  # fmt: skip
    assert "no rule prices model 'small' on POST /v1/chat/completions" in text


def test_a_valid_downgrade_finds_its_target() -> None:
    book = parse_resource(
        pricebook(chat_rule("big", "0.10", downgradeTo="small"), chat_rule("small"))
    )
    assert isinstance(book, PriceBook)
    big, small = book.spec.rules
    assert book.spec.downgrade_of(big, "POST", "/v1/chat/completions") is small
    assert book.spec.downgrade_of(small, "POST", "/v1/chat/completions") is None
    assert book.spec.downgrade_of(big, "GET", "/v1/chat/completions") is None


def test_the_script_config_carries_throttles_and_downgrades_not_notify() -> None:
    resource = parse_resource(
        budget(
            limit="10.00", period="month",
            policy={"softLimits": [
                {"action": "notify", "at": 50},
                {"action": "throttle", "at": 90, "rateLimits": [{"requests": 5, "per": "minute"}]},
                {"action": "downgrade", "below": "0.50"},
            ]},
        )
    )  # fmt: skip
    assert isinstance(resource, CustomerBudget)
    soft = json.loads(budget_config(resource.spec)["soft"])
    assert [entry["action"] for entry in soft] == ["throttle", "downgrade"]
    assert soft[0]["used"] == 9_000_000 and soft[0]["rl"][0]["id"].startswith("s0:")
    assert soft[1] == {"action": "downgrade", "left": 500_000, "rl": []}
    assert resource.spec.policy.soft_limits[1].label == "throttle at 90%"
    assert resource.spec.policy.soft_limits[2].label == "downgrade below 0.50"


@given(
    at=st.integers(min_value=1, max_value=100),
    limit=st.integers(min_value=1, max_value=2**53 // 100),
    used=st.integers(min_value=0, max_value=2**53 // 100),
)
def test_at_acts_exactly_at_its_percentage(at: int, limit: int, used: int) -> None:
    soft = SoftLimit.model_validate({"action": "notify", "at": at})
    assert reached(soft, limit, used, 0) == (used * 100 >= at * limit)
    threshold = spent_at(soft, limit)
    assert threshold * 100 >= at * limit > (threshold - 1) * 100


@given(below=st.integers(min_value=1, max_value=10**12), available=st.integers(-(10**12), 10**12))
def test_below_acts_when_less_is_left(below: int, available: int) -> None:
    soft = SoftLimit.model_validate({"action": "downgrade", "below": format_amount(below)})
    assert reached(soft, None, 0, available) == (available < below)
