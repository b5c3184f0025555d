"""The PriceBook: rules that match requests, their prices and the bounds held before a request."""

from __future__ import annotations

import fnmatch
import re
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ..expressions import ExpressionError, ExpressionPricing, RuleExpressionError, fields_read
from .fields import (
    _NAME_SCHEMA,
    HTTP_METHODS,
    KEY_NAME_PATTERN,
    Amount,
    Currency,
    DurationMs,
    PositiveAmount,
    PositiveDurationMs,
    _Model,
    _nonzero_amount,
    cel,
)


class UsageHeaders(_Model):
    input_tokens: str = "X-Usage-Input-Tokens"
    output_tokens: str = "X-Usage-Output-Tokens"


class Match(_Model):
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.path) && has(self.pathPrefix))",
                "give path or pathPrefix, not both",
            )
        )
    )

    # Lower-case methods are upper-cased here; the CRD schema only takes the upper-case ones.
    methods: list[str] = Field(
        default_factory=lambda: ["POST"],
        min_length=1,
        json_schema_extra={"items": {"type": "string", "enum": list(HTTP_METHODS)}},
    )
    path: str | None = Field(default=None, pattern=r"^/")
    path_prefix: str | None = Field(default=None, pattern=r"^/")
    models: list[str] = Field(default_factory=list, description="Glob patterns on body.model")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        allowed = set(HTTP_METHODS)
        upper = [method.upper() for method in value]
        for index, method in enumerate(upper):
            if method not in allowed:
                raise ValueError(
                    f"[{index}] {method!r} must be one of {', '.join(sorted(allowed))}"
                )
        return upper

    @model_validator(mode="after")
    def _one_path(self) -> Self:
        if self.path is not None and self.path_prefix is not None:
            raise ValueError("give path or pathPrefix, not both")
        return self

    def matches(self, method: str, path: str, model: str | None) -> bool:
        if method.upper() not in self.methods:
            return False
        if self.path is not None and path != self.path:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.models:
            return model is not None and any(fnmatch.fnmatchcase(model, p) for p in self.models)
        return True


class Price(_Model):
    flat: Amount = 0
    per_million_input_tokens: Amount = 0
    per_million_output_tokens: Amount = 0
    per_second: Amount = 0

    @property
    def is_flat_only(self) -> bool:
        return not (
            self.per_million_input_tokens or self.per_million_output_tokens or self.per_second
        )


_NO_PRICE = Price()


class Estimate(_Model):
    input_tokens: int | None = Field(
        default=None,
        ge=0,
        description="A fixed prompt size you guarantee; default: bounded from the request body.",
    )
    output_tokens: int = Field(
        default=256,
        ge=0,
        description="Output tokens a rule's price expressions see when the request sends no"
        " limit; token-priced rules hold the request's limit (maxOutputTokens if none).",
    )
    seconds: DurationMs = Field(
        default=0,
        description="GPU-time window held at a time for per-second prices; default:"
        " a tenth of the timeout, at least one second.",
    )


MAX_OUTPUT_TOKENS_LIMIT = 10_000_000
DEFAULT_MIN_OUTPUT_TOKENS = 16


class PromptOverhead(_Model):
    """Tokens a chat template adds around the request's text (role headers, preambles)."""

    per_message: int = Field(default=16, ge=0, le=100_000)
    per_request: int = Field(default=256, ge=0, le=1_000_000)


class FailureCharge(StrEnum):
    free = "free"
    metered = "metered"


PRICE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,63}$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"
COUNT_FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class ExpressionPrice(_Model):
    """CEL price expressions (docs/pricing.md): a bound held before, a cost charged after."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.clampField) || has(self.bound)",
                "clampField lowers a count the bound reads: give a bound",
            )
        )
    )

    bound: str | None = Field(
        default=None,
        max_length=2000,
        description="CEL: the most this request may cost, from the request alone (micro-units).",
    )
    cost: str | None = Field(
        default=None,
        max_length=2000,
        description="CEL: what the answer costs (micro-units); default: the bound.",
    )
    prices: dict[str, Amount] = Field(
        default_factory=dict,
        max_length=256,
        description='Named amounts, like {"hd_1024x1024": "0.08"}: prices.NAME in micro-units.',
        json_schema_extra=cel(
            (
                f"self.all(k, k.matches('{PRICE_NAME_PATTERN}'))",
                "price names are 1-63 letters, digits and _ . : -",
            )
        ),
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Values for request fields the body leaves out, like {n: 1}.",
    )
    headers: list[Annotated[str, Field(pattern=HEADER_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Request headers the expressions read."
    )
    response_headers: list[Annotated[str, Field(pattern=HEADER_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=16, description="Response headers the cost reads."
    )
    clamp_field: str | None = Field(
        default=None,
        pattern=COUNT_FIELD_PATTERN,
        description="A JSON request field holding a count the bound reads (like n): when the"
        " balance cannot pay the bound, the count is lowered to the largest value it pays for"
        " (down to 1; fewer is refused with 402). Default: refuse.",
    )

    @field_validator("prices")
    @classmethod
    def _price_names(cls, value: dict[str, int]) -> dict[str, int]:
        for name in value:
            if not re.match(PRICE_NAME_PATTERN, name):
                raise ValueError(f"{name!r}: price names are 1-63 letters, digits and _ . : -")
        return value


# A model name (what body.model is set to), not a glob pattern like Match.models.
DOWNGRADE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"


class PriceRule(_Model):
    # "maximum must be at least the flat price" is not repeated in CEL: comparing decimal strings
    # would mean comparing doubles. The operator validates it with this model and reports it.
    # A zero timeout is refused by the schema (PositiveDurationMs).
    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.maximum) || has(self.expression) || !("
                + " || ".join(
                    _nonzero_amount(f"self.price.{name}")
                    for name in ("perMillionInputTokens", "perMillionOutputTokens", "perSecond")
                )
                + ")",
                "a rule with token or time prices needs a maximum",
            ),
            ("has(self.price) != has(self.expression)", "give price or expression, not both"),
            (
                "!has(self.minOutputTokens) || self.minOutputTokens <="
                " (has(self.maxOutputTokens) ? self.maxOutputTokens : 4096)",
                "minOutputTokens must not exceed maxOutputTokens",
            ),
        )
    )

    name: str = Field(pattern=KEY_NAME_PATTERN, json_schema_extra=_NAME_SCHEMA)
    match: Match = Field(default_factory=Match)
    price: Price | None = None
    expression: ExpressionPrice | None = None
    estimate: Estimate = Field(default_factory=Estimate)
    maximum: PositiveAmount | None = None
    timeout: PositiveDurationMs = 300_000
    on_upstream_error: FailureCharge = FailureCharge.free
    on_client_disconnect: FailureCharge = FailureCharge.metered
    tokenizer: str | None = Field(
        default=None,
        pattern=r"^/",
        max_length=4096,
        description="Path of the model's tokenizer.json in the sidecar's container: prompts"
        " are counted exactly instead of bounded by their UTF-8 size.",
    )
    prompt_overhead: PromptOverhead = Field(default_factory=PromptOverhead)
    max_output_tokens: int = Field(
        default=4096,
        ge=1,
        le=MAX_OUTPUT_TOKENS_LIMIT,
        description="The most output tokens a request may ask for; set when the client sends"
        " no limit, lowered to when it asks for more.",
    )
    min_output_tokens: int | None = Field(
        default=None,
        ge=0,
        le=MAX_OUTPUT_TOKENS_LIMIT,
        description="A request whose balance covers fewer output tokens is refused (402);"
        " default 16 (or maxOutputTokens, if smaller).",
    )

    downgrade_to: str | None = Field(
        default=None,
        pattern=DOWNGRADE_MODEL_PATTERN,
        max_length=253,
        description="The cheaper model (priced by another rule of this PriceBook, on this"
        " route) that requests of this rule are rewritten to while a downgrade soft limit of"
        " their budget is reached.",
    )

    _pricing: ExpressionPricing | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _price_or_expression(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [name for name in ("price", "expression") if data.get(name) is not None]
            if not given:
                raise ValueError("give price (flat, tokens, seconds) or expression")
            if len(given) > 1:
                raise ValueError("give price or expression, not both")
        return data

    @model_validator(mode="after")
    def _maximum(self) -> Self:
        if self.min_output_tokens is not None and self.min_output_tokens > self.max_output_tokens:
            raise ValueError("minOutputTokens must not exceed maxOutputTokens")
        if self.expression is not None:
            self._compile_expressions(self.expression)
        elif self.maximum is None:
            if not self.simple_price.is_flat_only:
                raise ValueError("a rule with token or time prices needs a maximum")
        elif self.maximum < self.simple_price.flat:
            raise ValueError("maximum must be at least the flat price")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        return self

    def _compile_expressions(self, expression: ExpressionPrice) -> None:
        if expression.clamp_field is not None:
            if expression.bound is None:
                raise ValueError(
                    f"rule {self.name!r}: expression.clampField lowers a count the bound reads:"
                    " give a bound"
                )
            read = fields_read(expression.bound, "request")
            if read is not None and expression.clamp_field not in read:
                raise ValueError(
                    f"rule {self.name!r}: expression.clampField: the bound does not read"
                    f" request.{expression.clamp_field}, so lowering it cannot lower the hold"
                )
        try:
            self._pricing = ExpressionPricing(
                bound=expression.bound,
                cost=expression.cost,
                prices=expression.prices,
                defaults=expression.defaults,
                headers=tuple(expression.headers),
                response_headers=tuple(expression.response_headers),
                maximum=self.maximum,
            )
        except ExpressionError as error:
            part = f".{error.part}" if isinstance(error, RuleExpressionError) else ""
            raise ValueError(f"rule {self.name!r}: expression{part}: {error}") from None

    @property
    def simple_price(self) -> Price:
        """The flat/token/second price; all zero for a rule priced by expressions."""
        return self.price if self.price is not None else _NO_PRICE

    @property
    def pricing(self) -> ExpressionPricing | None:
        """The compiled expressions (compiled once, when the PriceBook is parsed)."""
        return self._pricing

    @property
    def max_cost(self) -> int:
        if self.maximum is not None:
            return self.maximum
        return self.simple_price.flat

    @property
    def output_floor(self) -> int:
        """The fewest output tokens a clamped request is sent with."""
        if self.min_output_tokens is not None:
            return self.min_output_tokens
        return min(DEFAULT_MIN_OUTPUT_TOKENS, self.max_output_tokens)


class Unmatched(StrEnum):
    deny = "deny"
    free = "free"


class PriceBookSpec(_Model):
    currency: Currency
    rules: list[PriceRule] = Field(
        min_length=1,
        max_length=200,
        description="Tried in order; the first rule that matches a request prices it.",
        json_schema_extra=cel(
            ("self.all(r, self.exists_one(s, s.name == r.name))", "rule names must be unique")
        ),
    )
    unmatched: Unmatched = Unmatched.deny
    usage_headers: UsageHeaders = Field(default_factory=UsageHeaders)
    clamp_output: bool = Field(
        default=True,
        description="Lower a request's output limit to what the balance covers (down to the"
        " rule's minOutputTokens) instead of refusing it with 402.",
    )

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Self:
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _downgrades(self) -> Self:
        for index, rule in enumerate(self.rules):
            if rule.downgrade_to is not None:
                self._check_downgrade(index, rule, rule.downgrade_to)
        return self

    def _check_downgrade(self, index: int, rule: PriceRule, model: str) -> None:
        where = f"rules[{index}] ({rule.name}).downgradeTo"
        method, path = rule.match.methods[0], rule.match.path or rule.match.path_prefix or "/"
        target = self.find_rule(method, path, model)
        if target is None:
            raise ValueError(f"{where}: no rule prices model {model!r} on {method} {path}")
        if target is rule:
            raise ValueError(
                f"{where}: model {model!r} is priced by this same rule, so the downgrade would"
                " cost the same; name a model another rule prices"
            )
        if rule.price is not None and target.price is not None:
            pricier = [
                name
                for name in Price.model_fields
                if getattr(target.price, name) > getattr(rule.price, name)
            ]
            if target.max_cost > rule.max_cost:
                pricier.append("maximum")
            if pricier:
                raise ValueError(
                    f"{where}: rule {target.name!r} (model {model!r}) is not cheaper:"
                    f" {', '.join(to_camel(name) for name in pricier)} higher"
                )

    def find_rule(self, method: str, path: str, model: str | None) -> PriceRule | None:
        for rule in self.rules:
            if rule.match.matches(method, path, model):
                return rule
        return None

    def downgrade_of(self, rule: PriceRule, method: str, path: str) -> PriceRule | None:
        """The rule pricing ``rule.downgradeTo`` for this request, or None (no downgrade, or
        its model is not priced on this route)."""
        if rule.downgrade_to is None:
            return None
        target = self.find_rule(method, path, rule.downgrade_to)
        return None if target is None or target is rule else target
