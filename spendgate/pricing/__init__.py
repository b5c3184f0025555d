"""Pricing a request: read its body, bound its cost before the model runs, price it after.

``form`` is the interface (:class:`PricingForm`: a :class:`Bound` before, a cost after);
``rule`` implements it for PriceBook rules' simple prices, ``expression`` for price
expressions; ``request`` reads bodies; ``tokens`` bounds or
counts input tokens.
"""

from .expression import ExpressionForm, NotPriceable
from .form import Bound, OutputLimitTooHigh, PricingForm, Used
from .request import (
    OUTPUT_LIMIT_FIELDS,
    BadRequestBody,
    Prompt,
    RequestFacts,
    inspect_body,
    with_field,
    with_output_limit,
)
from .rule import TOKENS_PER_PRICE_UNIT, RulePricing, cost_of, window_ms
from .tokens import TOKENIZERS, Tokenizers, TokenizerUnavailable, byte_bound

__all__ = [
    "OUTPUT_LIMIT_FIELDS",
    "TOKENIZERS",
    "TOKENS_PER_PRICE_UNIT",
    "BadRequestBody",
    "Bound",
    "ExpressionForm",
    "NotPriceable",
    "OutputLimitTooHigh",
    "PricingForm",
    "Prompt",
    "RequestFacts",
    "RulePricing",
    "TokenizerUnavailable",
    "Tokenizers",
    "Used",
    "byte_bound",
    "cost_of",
    "inspect_body",
    "window_ms",
    "with_field",
    "with_output_limit",
]
