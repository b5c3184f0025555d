"""One request's identity and what happened to it, shared by the proxy and the logs.

The record lives in the request (``request[ACCESS]``) for the access logger, and in a context
variable for code that has no request at hand; :class:`RequestIdFilter` puts the request id on
every log line written while the request (or its settlement task) runs.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

REQUEST_ID_HEADER = "X-Spendgate-Request-Id"
SERVER_BANNER = "spendgate"  # no version: a banner only helps whoever scans for old ones


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class AccessRecord:
    """The fields of the access line; the proxy fills them in as it learns them."""

    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.monotonic)
    customer: str | None = None
    key_id: str | None = None
    rule: str | None = None
    outcome: str | None = None
    currency: str | None = None
    hold: int | None = None
    cost: int | None = None
    upstream_ms: int | None = None
    protocol_error: bool = False


ACCESS = web.RequestKey("spendgate_access", AccessRecord)
_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar(
    "spendgate_access", default=None
)


def begin(request: web.Request) -> AccessRecord:
    """The request's record, created once; also the current one for this task."""
    record = request.get(ACCESS)
    if record is None:
        record = AccessRecord()
        request[ACCESS] = record
    _current.set(record)
    return record


def of(request: web.BaseRequest) -> AccessRecord | None:
    return request.get(ACCESS)


def current() -> AccessRecord:
    """The record of the request being handled (a detached one outside a request)."""
    record = _current.get()
    return record if record is not None else AccessRecord(request_id="")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (and ``customer`` once known) to records logged during a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        access = _current.get()
        if access is not None:
            if not hasattr(record, "request_id"):
                record.request_id = access.request_id
            if access.customer and not hasattr(record, "customer"):
                record.customer = access.customer
        return True


def install_request_id_filter(*loggers: str, handlers: bool = False) -> None:
    """On the named loggers; with ``handlers``, also on the root logger's handlers, so records
    of every logger in the process (redis-py, aiohttp, …) get the request id too."""
    request_ids = RequestIdFilter()
    targets: list[logging.Filterer] = [logging.getLogger(name) for name in loggers]
    if handlers:
        targets += logging.getLogger().handlers
    for target in targets:
        if not any(isinstance(f, RequestIdFilter) for f in target.filters):
            target.addFilter(request_ids)
