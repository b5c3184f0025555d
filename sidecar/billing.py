"""What an admitted request costs in the end: measured usage and the failure policies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from multidict import CIMultiDictProxy

from spendgate.config_store import KeyOwner
from spendgate.ledger import RateInfo, Usage
from spendgate.models import FailureCharge, PriceRule, UsageHeaders
from spendgate.pricing import Bound, PricingForm, RequestFacts, Used

from .metering import ResponseTap, TokenUsage, response_payload, usage_from_headers


@dataclass
class Metered:
    """One admitted request on its way through."""

    owner: KeyOwner
    request_id: str
    rule: PriceRule
    form: PricingForm
    facts: RequestFacts
    currency: str
    hold: int
    reserved: bool  # False when served fail-open without a reservation
    body: bytes = b""
    rate: RateInfo | None = None
    input_tokens: int = 0  # the bound (or exact count) the hold was computed with
    output_limit: int | None = None  # the output limit the request was sent with
    output_change: str | None = None  # why the sidecar set that limit (None: the client's own)
    count_change: tuple[str, int] | None = None  # a count field lowered to what the hold pays
    available: int | None = None  # what the customer could still spend after the hold
    bound: Bound | None = None  # what was priced before the request (None: fail-open)
    downgraded: str | None = None  # X-Spendgate-Downgraded, when sent as a cheaper model
    started: float = field(default_factory=time.monotonic)
    upstream_started: float = 0.0
    cut_off: bool = False
    out_of_time: bool = False  # stopped when its held GPU time ran out (implies cut_off)
    events_sent: int = 0

    def elapsed_ms(self) -> int:
        start = self.upstream_started or self.started
        return int((time.monotonic() - start) * 1000)


def measure(
    metered: Metered,
    upstream_headers: CIMultiDictProxy[str] | None,
    tap: ResponseTap | None,
    usage_headers: UsageHeaders,
) -> TokenUsage:
    """What the request used, from the best source available."""
    estimated_input = metered.input_tokens
    if upstream_headers is not None:
        from_headers = usage_from_headers(upstream_headers, usage_headers)
        if from_headers is not None:
            return TokenUsage(*from_headers, "header")
    if metered.cut_off:
        return TokenUsage(estimated_input, metered.events_sent, "counted")
    if tap is not None and tap.usage is not None:
        return TokenUsage(*tap.usage, "body")
    if tap is not None and tap.sse:
        return TokenUsage(estimated_input, tap.events, "counted")
    return TokenUsage(estimated_input, metered.output_limit or 0, "estimate")


def price_outcome(
    metered: Metered,
    measured: TokenUsage,
    tap: ResponseTap | None,
    outcome: str,
    pod: str,
    *,
    status: int = 0,
    headers: CIMultiDictProxy[str] | None = None,
) -> tuple[int, Usage]:
    """The cost to charge for how the request ended, and the usage to record with it."""
    rule = metered.rule
    upstream_ms = metered.elapsed_ms()
    failed = outcome.startswith("upstream")
    free = outcome == "upstream_connect"  # the model never got the request
    free = (
        free
        or (failed and rule.on_upstream_error is FailureCharge.free)
        or (outcome == "client_disconnect" and rule.on_client_disconnect is FailureCharge.free)
    )
    if free:
        cost = 0
    elif metered.out_of_time:  # stopped by the sidecar: the prompt was read, the time used
        used = Used(measured.input_tokens, measured.output_tokens, upstream_ms, status=status)
        cost = metered.form.cost(used)
    elif tap is None or (failed and not tap.events):
        # metered, no answer: what it used (its time)
        cost = metered.form.cost(Used(0, 0, upstream_ms, status=status, headers=headers))
    else:
        used = Used(
            measured.input_tokens, measured.output_tokens, upstream_ms,
            status=status, response=response_payload(tap), headers=headers,
        )  # fmt: skip
        cost = metered.form.cost(used)
    if metered.cut_off and metered.reserved:
        # Cut where the hold ran out (output or GPU time): what was measured past that point
        # (the milliseconds between the cut and this measurement) is not charged.
        cost = min(cost, metered.hold)
    if not metered.reserved:  # served without a hold: the ledger cannot cap it, so cap here
        cost = min(cost, metered.form.max_cost)
    usage = Usage(
        model=metered.facts.model or "",
        input_tokens=measured.input_tokens,
        output_tokens=measured.output_tokens,
        upstream_ms=upstream_ms,
        outcome=outcome,
        pod=pod,
        rule=rule.name,
    )
    return cost, usage
