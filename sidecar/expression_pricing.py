"""What the sidecar tells about rules priced by expressions (``spendgate.pricing.expression``).

A cost expression that fails for an answer charges the bound; that is counted, and logged at
most once per rule every 10 s, so a client cannot flood the log. (What a cost expression asks
beyond the bound is absorbed by the ledger and reported with every other absorbed cost.)
"""

from __future__ import annotations

import logging
import time

from spendgate.pricing import ExpressionForm, PricingForm

from .metrics import SidecarMetrics

log = logging.getLogger("spendgate.sidecar.pricing")

_LOG_EVERY_S = 10.0
_last_logged: dict[str, float] = {}


def report_cost_error(
    form: PricingForm, metrics: SidecarMetrics, *, customer: str, request_id: str
) -> None:
    if not isinstance(form, ExpressionForm) or form.error is None:
        return
    metrics.cost_expression_errors.labels(form.name).inc()
    now = time.monotonic()
    if now - _last_logged.get(form.name, -_LOG_EVERY_S) < _LOG_EVERY_S:
        return
    if len(_last_logged) > 1_000:
        _last_logged.clear()
    _last_logged[form.name] = now
    log.warning(
        "cost expression failed; charging the bound",
        extra={"rule": form.name, "customer": customer, "request_id": request_id,
               "error": form.error[:300]},
    )  # fmt: skip
