"""spendgate.pricing: reading a request body, the estimate held before, the cost charged after."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spendgate.models import PriceRule
from spendgate.pricing import BadRequestBody, RequestFacts, cost_of, estimate_of, inspect_body

JSON = "application/json"


def rule(**fields: Any) -> PriceRule:
    body: dict[str, Any] = {
        "name": "chat",
        "price": {
            "flat": "0.0001",
            "perMillionInputTokens": "0.50",
            "perMillionOutputTokens": "1.50",
        },
        "maximum": "0.50",
        **fields,
    }
    return PriceRule.model_validate(body)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --------------------------------------------------------------------------- cost_of


def test_cost_components() -> None:
    # flat 100 + 0.5 per input token + 1.5 per output token (micro-units)
    assert cost_of(rule(), 100, 200, 0) == 100 + 50 + 300
    assert cost_of(rule(), 1_000, 2_000, 0) == 100 + 500 + 3_000
    assert cost_of(rule(), 0, 0, 0) == 100  # the flat fee alone


def test_cost_rounds_each_component_up() -> None:
    # One input token at 0.50 per million is 0.5 micro-units: charged as 1, never 0.
    assert cost_of(rule(), 1, 0, 0) == 100 + 1
    assert cost_of(rule(), 0, 1, 0) == 100 + 2  # 1.5 -> 2
    assert cost_of(rule(), 3, 3, 0) == 100 + 2 + 5  # 1.5 -> 2, 4.5 -> 5
    assert cost_of(rule(), 2, 2, 0) == 100 + 1 + 3  # exact values are not bumped


def test_cost_per_second_rounds_up_per_millisecond() -> None:
    timed = rule(price={"perSecond": "0.001"}, maximum="1")  # 1000 micro-units per second
    assert cost_of(timed, 0, 0, 1_000) == 1_000
    assert cost_of(timed, 0, 0, 1) == 1
    assert cost_of(timed, 0, 0, 1_500) == 1_500
    slow = rule(price={"perSecond": "0.000001"}, maximum="1")  # 1 micro-unit per second
    assert cost_of(slow, 0, 0, 1) == 1  # a millisecond is a thousandth: rounded up
    assert cost_of(slow, 0, 0, 2_001) == 3


def test_cost_clamped_at_maximum() -> None:
    assert cost_of(rule(), 0, 333_266, 0) == 100 + 499_899
    assert cost_of(rule(), 0, 333_267, 0) == 500_000  # 500_001 before the clamp
    assert cost_of(rule(), 10**9, 10**9, 10**6) == 500_000


def test_flat_only_cost() -> None:
    flat = rule(price={"flat": "0.02"}, maximum=None)
    assert cost_of(flat, 10**6, 10**6, 10**6) == 20_000
    free = rule(price={}, maximum=None)
    assert cost_of(free, 100, 100, 100) == 0


# --------------------------------------------------------------------------- estimate_of


def test_estimate_uses_max_tokens() -> None:
    facts = RequestFacts(input_tokens=1_000, max_tokens=100)
    assert estimate_of(rule(), facts) == 100 + 500 + 150


def test_estimate_default_output_tokens() -> None:
    facts = RequestFacts(input_tokens=1_000)
    assert estimate_of(rule(), facts) == 100 + 500 + 384  # 256 * 1.5
    custom = rule(estimate={"outputTokens": 10})
    assert estimate_of(custom, facts) == 100 + 500 + 15


def test_estimate_fixed_input_tokens_override_counted() -> None:
    fixed = rule(estimate={"inputTokens": 2_000, "outputTokens": 0})
    assert estimate_of(fixed, RequestFacts(input_tokens=7)) == 100 + 1_000


def test_estimate_seconds() -> None:
    timed = rule(price={"perSecond": "0.001"}, maximum="1", estimate={"seconds": "2500ms"})
    assert estimate_of(timed, RequestFacts()) == 2_500


def test_estimate_rounds_up_and_clamps() -> None:
    assert estimate_of(rule(), RequestFacts(input_tokens=1, max_tokens=1)) == 100 + 1 + 2
    huge = RequestFacts(input_tokens=10**7, max_tokens=10**7)
    assert estimate_of(rule(), huge) == 500_000


def test_zero_max_tokens_is_respected() -> None:
    assert estimate_of(rule(), RequestFacts(input_tokens=0, max_tokens=0)) == 100


# --------------------------------------------------------------------------- inspect_body


def test_inspect_chat_body() -> None:
    facts = inspect_body(
        body(
            model="llama-3-70b",
            messages=[
                {"role": "system", "content": "abcd"},
                {"role": "user", "content": [{"text": "efgh"}, {"text": "ij"}]},
            ],
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        ),
        "application/json; charset=utf-8",
    )
    assert facts == RequestFacts(
        model="llama-3-70b", input_tokens=3, max_tokens=64, stream=True, include_usage=True
    )


def test_inspect_counts_prompt_and_input_fields() -> None:
    assert inspect_body(body(prompt="x" * 9), JSON).input_tokens == 3  # 9 chars: rounded up
    assert inspect_body(body(input=["abcd", "efgh"]), JSON).input_tokens == 2
    assert inspect_body(body(instructions="abcd", input="abcd"), JSON).input_tokens == 2


def test_inspect_role_names_are_not_prompt() -> None:
    facts = inspect_body(body(messages=[{"role": "assistant", "content": ""}]), JSON)
    assert facts.input_tokens == 0


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_completion_tokens": 10, "max_tokens": 20}, 10),
        ({"max_tokens": 20, "max_output_tokens": 30}, 20),
        ({"max_output_tokens": 30}, 30),
        ({"max_tokens": 0}, 0),
        ({"max_tokens": None}, None),
        ({}, None),
    ],
)
def test_inspect_max_tokens_fields(fields: dict[str, Any], expected: int | None) -> None:
    assert inspect_body(body(**fields), JSON).max_tokens == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"stream": "true"},
        {"stream": 1},
        {"stream": False},
        {},
    ],
)
def test_inspect_stream_must_be_true(fields: dict[str, Any]) -> None:
    assert inspect_body(body(**fields), JSON).stream is False


@pytest.mark.parametrize(
    "options", [None, {"include_usage": False}, {"include_usage": "yes"}, ["include_usage"]]
)
def test_inspect_include_usage_must_be_true(options: Any) -> None:
    facts = inspect_body(body(stream=True, stream_options=options), JSON)
    assert facts.stream and not facts.include_usage


@pytest.mark.parametrize(
    "raw",
    [b"{", b"{'model': 'x'}", b"not json", b"\xff\xfe\x00", b'{"a": 1} trailing', b'{"a": NaN'],
)
def test_inspect_malformed_json(raw: bytes) -> None:
    with pytest.raises(BadRequestBody, match="not valid JSON"):
        inspect_body(raw, JSON)


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_inspect_non_object(raw: bytes) -> None:
    with pytest.raises(BadRequestBody, match="JSON object"):
        inspect_body(raw, JSON)


@pytest.mark.parametrize("value", [-1, 1.5, "100", True, [10], {"n": 1}])
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_inspect_bad_max_tokens(name: str, value: Any) -> None:
    with pytest.raises(BadRequestBody, match=name):
        inspect_body(body(**{name: value}), JSON)


@pytest.mark.parametrize("model", [1, ["a"], {"id": "a"}, True])
def test_inspect_model_must_be_string(model: Any) -> None:
    with pytest.raises(BadRequestBody, match="model must be a string"):
        inspect_body(body(model=model), JSON)


def test_inspect_empty_body() -> None:
    assert inspect_body(b"", JSON) == RequestFacts()


def test_inspect_non_json_content_type_counts_bytes() -> None:
    facts = inspect_body(b"{not json at all}", "text/plain")
    assert facts == RequestFacts(input_tokens=5)  # 17 bytes / 4, rounded up
    assert inspect_body(b"x" * 8, "application/octet-stream").input_tokens == 2


def test_inspect_json_content_type_variants() -> None:
    for content_type in ("application/json", "Application/JSON", "application/vnd.api+json"):
        with pytest.raises(BadRequestBody):
            inspect_body(b"{", content_type)
