"""Malformed HTTP never costs more than one rate-limited log line, and gets a JSON 400.

aiohttp answers what its parser rejects (bad request lines, headers, framing) outside the
application, with a traceback in the log and its version in ``Server``. This request handler
answers those in the OpenAI error shape with a request id, and writes one structured line per
failure, within a :class:`LogBudget` — never the offending bytes, which may hold a credential.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .. import errors
from . import context
from .log_budget import LogBudget

log = logging.getLogger("spendgate.sidecar.protocol")
_budget = LogBudget(log)

_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*"|b?'.*|b?".*""")


def safe_reason(error: BaseException | None) -> str:
    """The parser's complaint without what it quotes from the request."""
    if error is None:
        return ""
    text = error.message if isinstance(error, HttpProcessingError) else str(error)
    first = (str(text).strip().splitlines() or [""])[0]
    return _QUOTED.sub("…", first).rstrip(" :")[:120]


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler with its error answer and error logging replaced."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        record = context.of(request)
        if record is None:
            record = context.AccessRecord()
            request[context.ACCESS] = record
        record.protocol_error = True
        record.outcome = "malformed" if status < 500 else "internal_error"
        reason = safe_reason(exc)
        fields = {"status": status, "error": type(exc).__name__ if exc else None,
                  "reason": reason, "remote": request.remote,
                  "request_id": record.request_id}  # fmt: skip
        if status >= 500 and exc is not None and not isinstance(exc, HttpProcessingError):
            _budget.log(logging.ERROR, "request failed", fields, exc_info=exc)
        else:
            _budget.log(logging.WARNING, "malformed request", fields)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed")
        if status >= 500:
            response = errors.error_response(
                status, "server_error", "internal_error",
                "The sidecar failed to handle this request; it was not sent to the model.",
            )  # fmt: skip
        else:
            response = errors.error_response(
                status, "invalid_request_error", "malformed_request",
                "The HTTP request is malformed" + (f": {reason}." if reason else "."),
            )  # fmt: skip
        response.headers[context.REQUEST_ID_HEADER] = record.request_id
        response.headers["Server"] = context.SERVER_BANNER
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if not isinstance(error, BaseException):
            error = None
        fields = {"error": type(error).__name__ if error else None, "reason": safe_reason(error)}
        _budget.log(logging.ERROR, str(args[0]) if args else "server error", fields)


class GuardedServer(web.Server):
    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose connections use :class:`GuardedRequestHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same state; only the handler it builds differs
        return server
