"""Prices as CEL expressions: a bound held before the model runs and a cost charged after.

See docs/pricing.md. ``language`` compiles and evaluates, ``scan`` keeps evaluation bounded,
``inputs`` turns bodies into fields, ``rules`` prices one PriceBook rule.
"""

from .inputs import BodyError
from .language import EvaluationError, ExpressionError, Phase, compile_expression
from .rules import (
    Charge,
    ExpressionPricing,
    Held,
    RequestView,
    ResponseView,
    RuleExpressionError,
)
from .scan import fields_read

__all__ = [
    "BodyError",
    "Charge",
    "EvaluationError",
    "ExpressionError",
    "ExpressionPricing",
    "Held",
    "Phase",
    "RequestView",
    "ResponseView",
    "RuleExpressionError",
    "compile_expression",
    "fields_read",
]
