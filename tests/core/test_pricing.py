"""spendgate.pricing: reading a request body, the estimate held before, the cost charged after."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spendgate.models import PriceRule
from spendgate.pricing import (
    BadRequestBody,
    OutputLimitTooHigh,
    Prompt,
    RequestFacts,
    RulePricing,
    Used,
    cost_of,
    inspect_body,
    with_output_limit,
)

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


# --------------------------------------------------------------------------- bounds


def facts_for(**fields: Any) -> RequestFacts:
    return inspect_body(body(**fields), JSON)


def test_bound_holds_the_output_limit_and_the_input_bound() -> None:
    pricing = RulePricing(rule(promptOverhead={"perMessage": 0, "perRequest": 0}))
    bound = pricing.bound(facts_for(prompt="x" * 999, max_tokens=100))
    assert bound.input_tokens == 1_000  # 999 bytes + 1
    assert bound.output_limit == 100
    assert bound.hold == 100 + 500 + 150
    assert bound.minimum == 100 + 500 + 24  # 16 output tokens, the default minimum


def test_bound_without_max_tokens_covers_max_output_tokens() -> None:
    pricing = RulePricing(rule(maxOutputTokens=1_000, promptOverhead={"perRequest": 0}))
    bound = pricing.bound(facts_for(prompt=""))
    assert bound.output_limit == 1_000
    assert bound.hold == 100 + 1 + 1_500


def test_bound_lowers_absurd_limits_to_max_output_tokens() -> None:
    pricing = RulePricing(rule(maxOutputTokens=2_048))
    bound = pricing.bound(facts_for(max_tokens=10**23))
    assert bound.output_limit == 2_048
    strict = RulePricing(rule(maxOutputTokens=2_048), clamp=False)
    with pytest.raises(OutputLimitTooHigh, match="at most 2048"):
        strict.bound(facts_for(max_tokens=10**23))


def test_bound_without_clamping_has_no_smaller_minimum() -> None:
    bound = RulePricing(rule(), clamp=False).bound(facts_for(max_tokens=100))
    assert bound.minimum == bound.hold


def test_bound_fixed_input_tokens_override_counted() -> None:
    fixed = RulePricing(rule(estimate={"inputTokens": 2_000}))
    assert fixed.bound(facts_for(prompt="abc", max_tokens=0)).input_tokens == 2_000


def test_bound_overheads_per_message_and_request() -> None:
    pricing = RulePricing(rule(promptOverhead={"perMessage": 10, "perRequest": 100}))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    bound = pricing.bound(facts_for(messages=messages))
    # "user" 4+1, "hi" 2+1, "assistant" 9+1, "yo" 2+1 bytes; 2 messages; 1 request
    assert bound.input_tokens == 21 + 2 * 10 + 100


def test_bound_seconds_window() -> None:
    timed = RulePricing(
        rule(price={"perSecond": "0.001"}, maximum="1", estimate={"seconds": "2500ms"})
    )
    bound = timed.bound(RequestFacts())
    assert (bound.hold, bound.window_ms, bound.output_limit) == (2_500, 2_500, None)
    default = RulePricing(rule(price={"perSecond": "0.001"}, maximum="1", timeout="30s"))
    assert default.bound(RequestFacts()).window_ms == 3_000


def test_bound_is_capped_at_the_maximum() -> None:
    bound = RulePricing(rule()).bound(facts_for(prompt="x" * 10**6, max_tokens=4_096))
    assert bound.hold == 500_000


def test_output_for_a_smaller_hold() -> None:
    pricing = RulePricing(rule(promptOverhead={"perMessage": 0, "perRequest": 0}))
    bound = pricing.bound(facts_for(prompt="x" * 999, max_tokens=1_000))  # base 600
    assert pricing.output_for(bound, bound.hold) == 1_000
    assert pricing.output_for(bound, 600 + 150) == 100
    assert pricing.output_for(bound, 600 + 151) == 100  # 100.67 tokens: 100
    assert pricing.output_for(bound, 600 + 152) == 101
    for held in range(bound.minimum, bound.hold + 1, 37):
        tokens = pricing.output_for(bound, held)
        assert tokens is not None
        assert pricing.cost(Used(bound.input_tokens, tokens, 0)) <= held


def test_free_output_sets_no_limit_unless_one_was_sent() -> None:
    embeddings = RulePricing(rule(price={"perMillionInputTokens": "0.02"}))
    assert embeddings.bound(facts_for(input="hello")).output_limit is None
    assert embeddings.bound(facts_for(input="hello", max_tokens=10**9)).output_limit == 4_096


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
        model="llama-3-70b",
        prompt=Prompt(texts=("system", "abcd", "user", "efgh", "ij"), messages=2),
        max_tokens=64,
        output_fields=("max_tokens",),
        stream=True,
        include_usage=True,
    )


def test_inspect_counts_prompt_and_input_fields() -> None:
    assert inspect_body(body(prompt="x" * 9), JSON).prompt.texts == ("x" * 9,)
    assert inspect_body(body(input=["abcd", "efgh"]), JSON).prompt.texts == ("abcd", "efgh")
    both = inspect_body(body(instructions="ab", input="cd"), JSON)
    assert sorted(both.prompt.texts) == ["ab", "cd"]


def test_inspect_token_id_prompts_are_counted_exactly() -> None:
    facts = inspect_body(body(prompt=[[1, 2, 3], [4, 5]]), JSON)
    assert (facts.prompt.token_ids, facts.prompt.texts) == (5, ())


def test_inspect_structured_parts_count_as_indented_json() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"é": 1}}}]
    facts = inspect_body(body(messages=[], tools=tools), JSON)
    [rendered] = facts.prompt.texts
    assert rendered == json.dumps(tools, indent=4, ensure_ascii=True)
    assert len(rendered) > len(json.dumps(tools, separators=(",", ":")))


def test_inspect_role_names_are_prompt() -> None:
    facts = inspect_body(body(messages=[{"role": "assistant", "content": ""}]), JSON)
    assert facts.prompt == Prompt(texts=("assistant", ""), messages=1)


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
    assert facts == RequestFacts(prompt=Prompt(raw=b"{not json at all}"))
    assert not facts.is_json


def test_inspect_json_content_type_variants() -> None:
    for content_type in ("application/json", "Application/JSON", "application/vnd.api+json"):
        with pytest.raises(BadRequestBody):
            inspect_body(b"{", content_type)


# --------------------------------------------------------------------------- output limits


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [
        ("/v1/chat/completions", {}, {"max_tokens": 7}),
        ("/v1/chat/completions", {"max_completion_tokens": 99}, {"max_completion_tokens": 7}),
        ("/v1/chat/completions", {"max_tokens": 9, "max_completion_tokens": 8},
         {"max_tokens": 7, "max_completion_tokens": 7}),
        ("/v1/responses", {}, {"max_output_tokens": 7}),
        ("/v1/responses", {"max_output_tokens": 100}, {"max_output_tokens": 7}),
    ],
)  # fmt: skip
def test_with_output_limit_sets_the_field_the_client_used(
    path: str, fields: dict[str, Any], expected: dict[str, int]
) -> None:
    facts = inspect_body(body(model="m", input="hi", **fields), JSON)
    rewritten = json.loads(with_output_limit(facts, path, 7))
    assert rewritten == {"model": "m", "input": "hi", **fields, **expected}
