"""One structured line per request (``spendgate.sidecar.access``), never a credential.

Fields: request id, method, path (never the query string, which may carry a key), status,
outcome, customer, key id, rule, hold, cost, currency, upstream and total milliseconds.
Requests nobody could be identified for (no key, a wrong key, a malformed request) are logged
within a :class:`LogBudget`, so a client cannot flood the log; identified ones always are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from spendgate.money import format_amount

from . import context
from .log_budget import LogBudget

ACCESS_LOGGER = "spendgate.sidecar.access"
_anonymous = LogBudget(logging.getLogger(ACCESS_LOGGER), per_second=20.0, burst=100)


def access_fields(request: BaseRequest, response: StreamResponse) -> dict[str, Any]:
    record = context.of(request) or context.AccessRecord()
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": request.method,
        "path": request.path[:200],
        "status": response.status,
        "outcome": record.outcome or ("ok" if response.status < 400 else "refused"),
        "customer": record.customer,
        "key_id": record.key_id,
        "rule": record.rule,
        "hold": None if record.hold is None else format_amount(record.hold),
        "cost": None if record.cost is None else format_amount(record.cost),
        "currency": record.currency,
        "upstream_ms": record.upstream_ms,
        "duration_ms": int((time.monotonic() - record.started) * 1000),
    }
    return {name: value for name, value in fields.items() if value is not None}


class SidecarAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        record = context.of(request)
        if record is not None and record.protocol_error:
            return  # the protocol guard wrote its own (rate-limited) line
        fields = access_fields(request, response)
        if record is None or record.customer is None:
            _anonymous.log(logging.INFO, "request", fields)
        else:
            self.logger.info("request", extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
