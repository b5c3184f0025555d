"""The PriceBook rule's own form: flat fee + input/output tokens + GPU-seconds, capped."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..models import PriceRule
from ..money import ceil_div
from .form import Bound, OutputLimitTooHigh, Used
from .request import RequestFacts
from .tokens import TOKENIZERS, Tokenizers, TokenizerUnavailable, byte_bound, with_overhead

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
MIN_WINDOW_MS = 1_000

log = logging.getLogger("spendgate.pricing")


def cost_of(rule: PriceRule, input_tokens: int, output_tokens: int, upstream_ms: int) -> int:
    """Cost in micro-units, each component rounded up, capped at the rule's maximum."""
    price = rule.price
    cost = (
        price.flat
        + ceil_div(input_tokens * price.per_million_input_tokens, TOKENS_PER_PRICE_UNIT)
        + ceil_div(output_tokens * price.per_million_output_tokens, TOKENS_PER_PRICE_UNIT)
        + ceil_div(upstream_ms * price.per_second, 1_000)
    )
    return min(cost, rule.max_cost)


def window_ms(rule: PriceRule) -> int:
    """GPU time one hold pays for, when the rule charges by the second."""
    if not rule.simple_price.per_second:
        return 0
    window = rule.estimate.seconds or max(MIN_WINDOW_MS, rule.timeout // 10)
    return min(window, rule.timeout)


@dataclass
class RulePricing:
    """:class:`~spendgate.pricing.form.PricingForm` for one PriceRule."""

    rule: PriceRule
    clamp: bool = True  # the PriceBook's clampOutput
    tokenizers: Tokenizers = TOKENIZERS

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def max_cost(self) -> int:
        return self.rule.max_cost

    def input_tokens(self, facts: RequestFacts) -> int:
        rule, prompt = self.rule, facts.prompt
        if rule.estimate.input_tokens is not None:
            return rule.estimate.input_tokens
        if rule.tokenizer is not None:
            try:
                counted = self.tokenizers.count(rule.tokenizer, prompt)
            except TokenizerUnavailable:
                counted = byte_bound(prompt)  # still an upper bound; the error is logged once
        else:
            counted = byte_bound(prompt)
        return with_overhead(counted, prompt, rule.prompt_overhead)

    def _output_limit(self, facts: RequestFacts) -> int | None:
        rule = self.rule
        asked = facts.max_tokens
        if asked is not None and asked > rule.max_output_tokens and not self.clamp:
            raise OutputLimitTooHigh(
                f"{facts.output_fields[0]} is {asked}; this model allows at most "
                f"{rule.max_output_tokens} output tokens"
            )
        if not rule.simple_price.per_million_output_tokens and asked is None:
            return None  # output is free: no limit to set (a limit the client sent is capped)
        return min(asked if asked is not None else rule.max_output_tokens, rule.max_output_tokens)

    def bound(self, facts: RequestFacts) -> Bound:
        input_tokens = self.input_tokens(facts)
        output = self._output_limit(facts)
        window = window_ms(self.rule)
        hold = cost_of(self.rule, input_tokens, output or 0, window)
        minimum = hold
        priced_output = bool(self.rule.simple_price.per_million_output_tokens)
        if self.clamp and output is not None and priced_output and facts.is_json:
            floor = min(self.rule.output_floor, output)
            minimum = cost_of(self.rule, input_tokens, floor, window)
        return Bound(hold, minimum, input_tokens, output, window)

    def output_for(self, bound: Bound, held: int) -> int | None:
        limit = bound.output_limit
        if limit is None or held >= bound.hold:
            return limit
        rule = self.rule
        base = cost_of(rule, bound.input_tokens, 0, bound.window_ms)
        per_million = rule.simple_price.per_million_output_tokens
        if not per_million:
            return limit
        # The largest n with ceil(n * price / 1e6) <= held - base.
        tokens = max(0, held - base) * TOKENS_PER_PRICE_UNIT // per_million
        return min(limit, tokens)

    def cost(self, used: Used) -> int:
        return cost_of(self.rule, used.input_tokens, used.output_tokens, used.upstream_ms)

    def count_for(self, held: int) -> tuple[str, int] | None:
        return None  # the output limit is what a simple price lowers (output_for)

    def paid_ms(self, bound: Bound, output_limit: int | None, held: int) -> int | None:
        per_second = self.rule.simple_price.per_second
        if not per_second or held >= self.rule.max_cost:
            return None
        rest = held - cost_of(self.rule, bound.input_tokens, output_limit or 0, 0)
        # The largest t with ceil(t * per_second / 1000) <= rest.
        return max(0, rest) * 1_000 // per_second

    def hold_for_ms(self, bound: Bound, output_limit: int | None, upstream_ms: int) -> int:
        return cost_of(self.rule, bound.input_tokens, output_limit or 0, upstream_ms)
