"""The interface every way of pricing a request implements: a bound before, a cost after.

The sidecar holds ``bound(...).hold`` (or, when the balance is short and the form can lower
the request's output limit, anything down to ``bound(...).minimum``), asks ``output_for`` what
output limit the amount it got covers, and after the response charges ``cost(used)``, never
more than it held. A second pricing form (price expressions, per-image rules, ...) plugs in by
implementing :class:`PricingForm`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .request import RequestFacts


@dataclass(frozen=True)
class Used:
    """What a request used, as measured after it ran."""

    input_tokens: int = 0
    output_tokens: int = 0
    upstream_ms: int = 0
    # The answer, for forms that price what the model returned (price expressions):
    status: int = 0
    response: Mapping[str, Any] | None = None  # JSON body, or a stream's last JSON event
    headers: Mapping[str, str] | None = None  # case-insensitive


@dataclass(frozen=True)
class Bound:
    """The most a request can cost, computed before it reaches the model."""

    hold: int  # what it can cost with its output at ``output_limit`` and time at ``window_ms``
    minimum: int  # the least hold it may be served with (== hold when nothing can be lowered)
    input_tokens: int  # the prompt's tokens (exact or an upper bound, plus template overheads)
    output_limit: int | None = None  # output tokens ``hold`` pays for; None: output not priced
    window_ms: int = 0  # GPU time ``hold`` pays for (per-second prices); extended while running

    @property
    def clampable(self) -> bool:
        return self.minimum < self.hold


class OutputLimitTooHigh(ValueError):
    """The client asked for more output than the rule allows, and clamping is off."""


class PricingForm(Protocol):
    """One way of pricing requests (a PriceBook rule's form)."""

    name: str  # the rule's name, recorded on the ledger
    max_cost: int  # no request costs more, whatever the model does

    def bound(self, facts: RequestFacts) -> Bound:
        """Before the request: the hold that covers its cost. May raise ``OutputLimitTooHigh``
        or ``BadRequestBody``."""
        ...

    def output_for(self, bound: Bound, held: int) -> int | None:
        """The output limit a hold of ``held`` (``minimum <= held <= hold``) pays for."""
        ...

    def cost(self, used: Used) -> int:
        """After the request: what it costs (the sidecar charges at most what it held)."""
        ...

    def count_for(self, held: int) -> tuple[str, int] | None:
        """When the form lowers a count in the request (a price expression's clampField) and
        a hold of ``held`` pays for fewer than were asked: the field and the count it pays."""
        ...

    def paid_ms(self, bound: Bound, output_limit: int | None, held: int) -> int | None:
        """Upstream time a hold of ``held`` pays for, with the output at ``output_limit``;
        None when more time cannot cost more (time not priced, or the hold is the maximum).
        While the request runs, the sidecar extends the hold ahead of the time used."""
        ...

    def hold_for_ms(self, bound: Bound, output_limit: int | None, upstream_ms: int) -> int:
        """The hold that pays for ``upstream_ms`` of upstream time (capped at the maximum)."""
        ...
