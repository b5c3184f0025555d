"""The sidecar's side of rules priced by expressions (``spendgate.expressions``).

Before the model runs: the bound, from the request. After: the charge, from the answer, never
more than the bound; what the cost expression asked beyond it is *absorbed* (logged, counted),
and a cost expression that fails for an answer charges the bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from spendgate.expressions import (
    BodyError,
    Charge,
    EvaluationError,
    ExpressionPricing,
    Held,
    RequestView,
    ResponseView,
)
from spendgate.pricing import RequestFacts

from . import errors

log = logging.getLogger("spendgate.sidecar.pricing")

_LOG_EVERY_S = 10.0  # one line per rule and kind per interval: a client cannot flood the log
_last_logged: dict[tuple[str, str], float] = {}


def _log_sometimes(kind: str, rule: str, message: str, fields: dict[str, object]) -> None:
    now = time.monotonic()
    if now - _last_logged.get((kind, rule), -_LOG_EVERY_S) < _LOG_EVERY_S:
        return
    if len(_last_logged) > 1_000:
        _last_logged.clear()
    _last_logged[(kind, rule)] = now
    log.warning(message, extra={"rule": rule, **fields})


class Unpriceable(Exception):
    """The request cannot be priced by its rule: answered with this response, before the model."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


@dataclass(frozen=True)
class ExpressionHold:
    pricing: ExpressionPricing
    held: Held
    input_tokens: int = 0  # the request's input-token bound the expressions saw


def hold(
    pricing: ExpressionPricing,
    rule_name: str,
    request: web.Request,
    body: bytes,
    facts: RequestFacts,
    *,
    output_estimate: int,
    input_estimate: int,
    timeout_ms: int,
) -> ExpressionHold:
    view = RequestView(
        method=request.method,
        path=request.path,
        headers=request.headers,
        body=body,
        content_type=request.headers.get("Content-Type", ""),
        input_tokens=input_estimate,
        output_tokens=facts.max_tokens if facts.max_tokens is not None else output_estimate,
        timeout_ms=timeout_ms,
    )
    try:
        return ExpressionHold(pricing, pricing.hold(view), input_estimate)
    except BodyError as error:
        raise Unpriceable(
            errors.error_response(400, "invalid_request_error", "invalid_body", str(error))
        ) from None
    except EvaluationError as error:
        raise Unpriceable(
            errors.error_response(
                400, "invalid_request_error", "unpriceable_request",
                f"This request cannot be priced by rule {rule_name!r}: {error}.",
            )
        ) from None  # fmt: skip


def charge(
    expression_hold: ExpressionHold,
    *,
    status: int,
    headers: Mapping[str, str] | None,
    payload: Mapping[str, object] | None,
    upstream_ms: int,
    input_tokens: int,
    output_tokens: int,
    rule_name: str,
    customer: str,
    request_id: str,
) -> Charge:
    response = ResponseView(
        status=status,
        headers=headers if headers is not None else {},
        payload=payload,
        upstream_ms=upstream_ms,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )
    result = expression_hold.pricing.charge(expression_hold.held, response)
    context = {"customer": customer, "request_id": request_id}
    if result.error is not None:
        _log_sometimes(
            "error", rule_name, "cost expression failed; charging the bound",
            {**context, "error": result.error[:300]},
        )  # fmt: skip
    if result.absorbed:
        _log_sometimes(
            "absorbed", rule_name, "cost exceeded the bound; the excess is absorbed",
            {**context, "bound": expression_hold.held.amount, "absorbed": result.absorbed},
        )  # fmt: skip
    return result
