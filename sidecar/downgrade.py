"""Downgrade soft limits: the cheaper way to serve a request, priced before it is reserved.

A PriceBook rule may name ``downgradeTo``: a cheaper model another rule prices on its route.
The sidecar prices the request as that model too; the reserve script holds the cheaper
amounts, and says so, when a downgrade soft limit of one of the budget's levels is reached.
The request then goes out with its ``model`` rewritten, is charged as that model, and the
response says so in ``X-Spendgate-Downgraded``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from spendgate.models import DOWNGRADE_MODEL_PATTERN, PriceBookSpec, PriceRule
from spendgate.pricing import (
    BadRequestBody,
    Bound,
    NotPriceable,
    OutputLimitTooHigh,
    PricingForm,
    RequestFacts,
    with_field,
)

DOWNGRADED_HEADER = "X-Spendgate-Downgraded"
_SAFE_MODEL = re.compile(DOWNGRADE_MODEL_PATTERN)

FormFor = Callable[[PriceRule, bytes, RequestFacts], PricingForm]


@dataclass(frozen=True)
class Downgrade:
    """The request as its cheaper model: what is sent and how it is priced."""

    rule: PriceRule
    form: PricingForm
    facts: RequestFacts
    body: bytes
    bound: Bound
    from_model: str | None

    @property
    def to_model(self) -> str:
        return self.facts.model or ""

    def header(self, budget: str) -> str:
        """``X-Spendgate-Downgraded``: the model served, the one asked for (when it is a plain
        model name) and the budget whose soft limit applied."""
        parts = [self.to_model]
        if self.from_model and len(self.from_model) <= 253 and _SAFE_MODEL.match(self.from_model):
            parts.append(f"from={self.from_model}")
        return "; ".join([*parts, f"budget={budget}"])


def plan_downgrade(
    pricebook: PriceBookSpec,
    rule: PriceRule,
    method: str,
    path: str,
    facts: RequestFacts,
    bound: Bound,
    form_for: FormFor,
) -> Downgrade | None:
    """The request as ``rule.downgradeTo``, or None: no downgrade for this rule, a body that
    names no model, a target not priced on this route or not priceable for this request, or
    one that would hold more than the request as sent."""
    target = pricebook.downgrade_of(rule, method, path)
    if target is None or rule.downgrade_to is None or facts.document is None:
        return None
    if facts.model is None:
        return None  # the route's default model: nothing to rewrite
    body = with_field(facts, "model", rule.downgrade_to)
    cheaper = replace(
        facts, model=rule.downgrade_to, document={**facts.document, "model": rule.downgrade_to}
    )
    form = form_for(target, body, cheaper)
    try:
        cheaper_bound = form.bound(cheaper)
    except (BadRequestBody, NotPriceable, OutputLimitTooHigh):
        return None
    if cheaper_bound.hold > bound.hold:
        return None
    return Downgrade(target, form, cheaper, body, cheaper_bound, facts.model)
