"""Price expressions as a :class:`~spendgate.pricing.form.PricingForm`.

One :class:`ExpressionForm` prices one request: its bound is the rule's ``bound`` expression
over the request (held, never lowered: an expression form has no output limit to clamp), its
cost the ``cost`` expression over the answer. ``cost`` returns what the expression asked, even
beyond the bound: the ledger charges at most the hold and records the rest as *absorbed*. A
cost expression that fails for an answer costs the bound (``error`` says why).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..expressions import (
    BodyError,
    EvaluationError,
    ExpressionPricing,
    Held,
    RequestView,
    ResponseView,
)
from ..models import PriceRule
from .form import Bound, Used
from .request import BadRequestBody, RequestFacts


class NotPriceable(ValueError):
    """The rule's bound expression cannot price this request (refused before the model)."""


@dataclass
class ExpressionForm:
    rule: PriceRule
    pricing: ExpressionPricing
    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    content_type: str  # with its parameters (a multipart boundary)
    input_tokens: int  # the prompt's token bound, as the token rules compute it
    held: Held | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    # A bound over held_ms with a window (estimate.seconds): the bound for each held time.
    windows: dict[int, Held] = field(default_factory=dict, init=False)
    at_timeout: int = field(default=0, init=False)  # the bound for the whole timeout

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def max_cost(self) -> int:
        return self.held.amount if self.held is not None else self.rule.max_cost

    def bound(self, facts: RequestFacts) -> Bound:
        output = facts.max_tokens if facts.max_tokens is not None else None
        view = RequestView(
            method=self.method,
            path=self.path,
            headers=self.headers,
            body=self.body,
            content_type=self.content_type,
            input_tokens=self.input_tokens,
            output_tokens=output if output is not None else self.rule.estimate.output_tokens,
            timeout_ms=self.rule.timeout,
            held_ms=self._window_ms() or self.rule.timeout,
        )
        try:
            self.held = self.pricing.hold(view)
        except BodyError as error:
            raise BadRequestBody(str(error)) from None
        except EvaluationError as error:
            raise NotPriceable(
                f"This request cannot be priced by rule {self.rule.name!r}: {error}."
            ) from None
        amount = self.held.amount
        minimum = amount
        count = self._count()
        if count is not None and count > 1:
            minimum = min(amount, self._held_at(1).amount)
        window = self._window_ms()
        if window:
            self._start_windows()
        return Bound(amount, minimum, self.input_tokens, window_ms=window)

    def _window_ms(self) -> int:
        """The window of upstream time held at a time: estimate.seconds, for a bound over
        ``held_ms``; 0 (the bound is held whole) otherwise."""
        window = self.rule.estimate.seconds
        if window and window < self.rule.timeout and self.pricing.reads_held_time():
            return window
        return 0

    def _start_windows(self) -> None:
        assert self.held is not None
        self.windows = {int(self.held.variables["held_ms"]): self.held}
        self.at_timeout = self._evaluated(self.pricing.hold_for, self.rule.timeout).amount

    def _evaluated(self, how: Any, value: Any, *more: Any) -> Held:
        try:
            return how(self.held, value, *more)  # type: ignore[no-any-return]
        except EvaluationError as error:
            raise NotPriceable(
                f"This request cannot be priced by rule {self.rule.name!r}: {error}."
            ) from None

    def paid_ms(self, bound: Bound, output_limit: int | None, held: int) -> int | None:
        """The longest held time whose bound ``held`` pays (the cost then sees that bound)."""
        if not self.windows or held >= self.at_timeout:
            return None
        fits = [ms for ms, at in self.windows.items() if at.amount <= held]
        if not fits:
            return 0
        self.held = self.windows[max(fits)]
        return max(fits)

    def hold_for_ms(self, bound: Bound, output_limit: int | None, upstream_ms: int) -> int:
        if not self.windows:
            return bound.hold
        at = self._evaluated(self.pricing.hold_for, upstream_ms)
        self.windows[upstream_ms] = at
        return at.amount

    def _count(self) -> int | None:
        """The count the request asks for in the rule's clampField, when it can be lowered."""
        name = self.rule.expression.clamp_field if self.rule.expression else None
        if name is None or self.held is None or not self.content_type_is_json:
            return None
        value = self.held.variables["request"].get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    @property
    def content_type_is_json(self) -> bool:
        media_type = self.content_type.split(";", 1)[0].strip().lower()
        return media_type == "application/json" or media_type.endswith("+json")

    def _held_at(self, count: int) -> Held:
        assert self.rule.expression is not None and self.rule.expression.clamp_field
        return self._evaluated(self.pricing.hold_with, self.rule.expression.clamp_field, count)

    def count_for(self, held: int) -> tuple[str, int] | None:
        count = self._count()
        if count is None or self.held is None or self.held.amount <= held:
            return None
        # The largest count in 1..count whose bound the hold pays for (the bound grows with
        # the count; every candidate is evaluated, so the answer always fits).
        low, high, best = 1, count - 1, None
        while low <= high:
            middle = (low + high) // 2
            try:
                at = self._held_at(middle)
            except NotPriceable:  # no bound for this count: it cannot be the one sent
                high = middle - 1
                continue
            if at.amount <= held:
                best, low = (middle, at), middle + 1
            else:
                high = middle - 1
        if best is None:
            return None
        self.held = best[1]  # the cost sees the lowered count and its bound
        if self.windows:
            self._start_windows()  # the held times, again at the lowered count
        assert self.rule.expression is not None and self.rule.expression.clamp_field
        return self.rule.expression.clamp_field, best[0]

    def output_for(self, bound: Bound, held: int) -> int | None:
        return None  # the bound is held whole; the request is never rewritten

    def cost(self, used: Used) -> int:
        if self.held is None:
            raise RuntimeError("cost() before bound()")
        answer = ResponseView(
            status=used.status,
            headers=used.headers if used.headers is not None else {},
            payload=used.response,
            upstream_ms=used.upstream_ms,
            input_tokens=used.input_tokens,
            output_tokens=used.output_tokens,
        )
        charge = self.pricing.charge(self.held, answer)
        self.error = charge.error
        return charge.charged + charge.absorbed


__all__ = ["ExpressionForm", "NotPriceable"]
