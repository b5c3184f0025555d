"""Pricing a request from a PriceBook rule: the estimate held before, the cost charged after."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .models import PriceRule
from .money import ceil_div

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
CHARS_PER_TOKEN = 4  # rough English average, used only to estimate a prompt before the model


class BadRequestBody(ValueError):
    """The request body is not the JSON the route expects."""


@dataclass(frozen=True)
class RequestFacts:
    """What pricing needs to know about a request, read once from its body."""

    model: str | None = None
    input_tokens: int = 0
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_length(item) for key, item in value.items() if key != "role")
    return 0


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequestBody(f"{name} must be a non-negative integer, got {value!r}")
    return value


def inspect_body(body: bytes, content_type: str) -> RequestFacts:
    """Read model, prompt size, max_tokens and streaming flags from a JSON request body."""
    if not body:
        return RequestFacts()
    if "json" not in content_type.lower():
        return RequestFacts(input_tokens=ceil_div(len(body), CHARS_PER_TOKEN))
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequestBody(f"request body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise BadRequestBody("request body must be a JSON object")
    model = parsed.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestBody(f"model must be a string, got {type(model).__name__}")
    prompt_chars = sum(
        _text_length(parsed.get(name)) for name in ("messages", "prompt", "input", "instructions")
    )
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        max_tokens = _positive_int(parsed, name)
        if max_tokens is not None:
            break
    stream = parsed.get("stream") is True
    options = parsed.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return RequestFacts(
        model=model,
        input_tokens=ceil_div(prompt_chars, CHARS_PER_TOKEN),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
    )


def cost_of(rule: PriceRule, input_tokens: int, output_tokens: int, upstream_ms: int) -> int:
    """Cost in micro-units, each component rounded up, capped at the rule's maximum."""
    price = rule.simple_price
    cost = (
        price.flat
        + ceil_div(input_tokens * price.per_million_input_tokens, TOKENS_PER_PRICE_UNIT)
        + ceil_div(output_tokens * price.per_million_output_tokens, TOKENS_PER_PRICE_UNIT)
        + ceil_div(upstream_ms * price.per_second, 1_000)
    )
    return min(cost, rule.max_cost)


def estimate_of(rule: PriceRule, facts: RequestFacts) -> int:
    """The amount to hold before the request reaches the model."""
    estimate = rule.estimate
    input_tokens = facts.input_tokens if estimate.input_tokens is None else estimate.input_tokens
    output_tokens = facts.max_tokens if facts.max_tokens is not None else estimate.output_tokens
    return cost_of(rule, input_tokens, output_tokens, estimate.seconds)
