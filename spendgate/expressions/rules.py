"""A rule priced by expressions: the bound held before the model runs, the cost charged after.

The invariant of the hard cap holds by construction: the charge is ``min(cost, bound)``, and
what the cost expression asked beyond the bound is reported as *absorbed* (the platform's
measured loss), never charged. A cost expression that fails for a response charges the bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .inputs import named_headers, parse_request_body, with_defaults
from .language import EvaluationError, Expression, ExpressionError, Phase, compile_expression
from .scan import fields_read


class RuleExpressionError(ExpressionError):
    """An expression of a rule that cannot be used; ``part`` is ``bound`` or ``cost``."""

    def __init__(self, part: str, error: ExpressionError) -> None:
        self.part = part
        super().__init__(error.problem, error.line, error.column)


@dataclass(frozen=True)
class RequestView:
    """The request as pricing sees it before the model runs."""

    method: str
    path: str
    headers: Mapping[str, str]  # looked up by lower-case name: case-insensitive or lower-case
    body: bytes = b""
    content_type: str = ""
    input_tokens: int = 0  # the prompt's token bound
    output_tokens: int = 0  # max_tokens, or the rule's estimate
    timeout_ms: int = 0
    held_ms: int = 0  # upstream time the bound pays for (the timeout, or a window of it)


@dataclass(frozen=True)
class ResponseView:
    """What the model answered, for the charge after."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    payload: Mapping[str, Any] | None = None  # JSON body, or the stream's last JSON event
    upstream_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Held:
    """A request's bound and the variables it was computed from (reused for the cost)."""

    amount: int
    variables: dict[str, Any]


@dataclass(frozen=True)
class Charge:
    charged: int  # never more than the bound
    absorbed: int  # what the cost expression asked beyond the bound
    error: str | None = None  # why the cost expression failed (the bound was charged)


class ExpressionPricing:
    """The compiled expressions of one PriceBook rule."""

    def __init__(
        self,
        *,
        bound: str | None,
        cost: str | None,
        prices: Mapping[str, int] | None = None,
        defaults: Mapping[str, Any] | None = None,
        headers: tuple[str, ...] = (),
        response_headers: tuple[str, ...] = (),
        maximum: int | None = None,
    ) -> None:
        if bound is None and maximum is None:
            raise ExpressionError(
                "a rule priced by expressions needs a bound (or a maximum to hold): without one"
                " nothing limits what a request may be charged"
            )
        self.bound = self._compile("bound", bound, Phase.bound)
        self.cost = self._compile("cost", cost, Phase.cost)
        self.prices = dict(prices or {})
        self.defaults = dict(defaults or {})
        self.headers = tuple(name.lower() for name in headers)
        self.response_headers = tuple(name.lower() for name in response_headers)
        self.maximum = maximum
        # Only what the expressions read is parsed and handed to CEL (converting a large body
        # costs more than evaluating); None: all of it.
        sources = [source for source in (bound, cost) if source is not None]
        self._request_fields = _union(fields_read(source, "request") for source in sources)
        self._response_fields = fields_read(cost, "response") if cost else frozenset()

    @staticmethod
    def _compile(part: str, source: str | None, phase: Phase) -> Expression | None:
        if source is None:
            return None
        try:
            return compile_expression(source, phase)
        except ExpressionError as error:
            raise RuleExpressionError(part, error) from None

    def hold(self, request: RequestView) -> Held:
        """The bound of this request; raises EvaluationError (or BodyError) when it has none."""
        wanted = self._request_fields
        reads_body = wanted is None or bool(wanted)
        fields = parse_request_body(request.body, request.content_type) if reads_body else {}
        request_fields = with_defaults(_only(fields, wanted), _only(self.defaults, wanted))
        variables: dict[str, Any] = {
            "request": request_fields,
            "method": request.method.upper(),
            "path": request.path,
            "headers": named_headers(request.headers, self.headers),
            "prices": self.prices,
            "tokens": {"input": request.input_tokens, "output": request.output_tokens},
            "body_bytes": len(request.body),
            "timeout_ms": request.timeout_ms,
            "held_ms": request.held_ms,
        }
        if self.bound is None:
            assert self.maximum is not None
            return Held(self.maximum, variables)
        return Held(self._bounded(variables), variables)

    def hold_with(self, held: Held, field: str, value: Any) -> Held:
        """The bound again, with the request's ``field`` set to ``value`` (a lowered count)."""
        request = {**held.variables["request"], field: value}
        return self._again(held, {**held.variables, "request": request})

    def hold_for(self, held: Held, held_ms: int) -> Held:
        """The bound again, for ``held_ms`` of upstream time (the next window)."""
        return self._again(held, {**held.variables, "held_ms": held_ms})

    def reads_held_time(self) -> bool:
        return self.bound is not None and fields_read(self.bound.source, "held_ms") != frozenset()

    def _again(self, held: Held, variables: dict[str, Any]) -> Held:
        if self.bound is None:
            return Held(held.amount, variables)
        return Held(self._bounded(variables), variables)

    def _bounded(self, variables: dict[str, Any]) -> int:
        """The bound expression's amount for ``variables``, capped at the rule's maximum."""
        assert self.bound is not None
        try:
            amount = self.bound.evaluate(variables)
        except EvaluationError as error:
            raise EvaluationError(f"bound: {error}") from None
        return amount if self.maximum is None else min(amount, self.maximum)

    def charge(self, held: Held, response: ResponseView) -> Charge:
        """What to charge for the answer: the cost, never more than the bound."""
        if self.cost is None:
            return Charge(held.amount, 0)
        variables = {
            **held.variables,
            "response": _only(response.payload or {}, self._response_fields),
            "response_headers": named_headers(response.headers, self.response_headers),
            "status": response.status,
            "upstream_ms": response.upstream_ms,
            "tokens": {"input": response.input_tokens, "output": response.output_tokens},
            "bound": held.amount,
        }
        try:
            cost = self.cost.evaluate(variables)
        except EvaluationError as error:
            return Charge(held.amount, 0, f"cost: {error}")
        charged = min(cost, held.amount)
        return Charge(charged, cost - charged)


def _union(parts: Any) -> frozenset[str] | None:
    fields: set[str] = set()
    for part in parts:
        if part is None:
            return None
        fields |= part
    return frozenset(fields)


def _only(values: Mapping[str, Any], names: frozenset[str] | None) -> dict[str, Any]:
    if names is None:
        return dict(values)
    return {name: values[name] for name in names if name in values}


__all__ = [
    "Charge",
    "ExpressionPricing",
    "Held",
    "RequestView",
    "ResponseView",
    "RuleExpressionError",
]
