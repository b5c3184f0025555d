"""Forwarding an admitted request to the model and relaying its answer, streams included.

The rule's timeout bounds the whole exchange. A streamed answer is written only as far as the
hold pays for it (see :mod:`.holds`); past that, it is cut off with an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from spendgate.models import FailureCharge
from spendgate.pricing import Used

from . import errors
from .billing import Metered
from .customer_view import admission_headers, final_cost_headers
from .downgrade import DOWNGRADED_HEADER
from .front.targets import UpstreamBase
from .headers import forward_headers, response_headers
from .holds import GpuClock, Holds, OutOfTime
from .metering import ResponseTap, sse_error_event
from .metrics import SidecarMetrics
from .settings import SidecarSettings
from .settlement import Settlement
from .upstream_errors import foreign_error, is_foreign_error

log = logging.getLogger("spendgate.sidecar")

SMALL_BODY = 64 * 1024  # bodies up to this size with a known length are sent in one write
OUTPUT_LIMIT_HEADER = "X-Spendgate-Output-Limit"
COUNT_LIMIT_HEADER = "X-Spendgate-Count-Limit"


def _admitted_headers(headers: CIMultiDict[str], metered: Metered) -> None:
    """What the answer to an admitted request says about its admission."""
    admission_headers(headers, metered.currency, metered.hold, metered.available)
    if metered.downgraded is not None:
        headers[DOWNGRADED_HEADER] = metered.downgraded


class Relay:
    def __init__(
        self,
        settings: SidecarSettings,
        metrics: SidecarMetrics,
        session: aiohttp.ClientSession,
        settlement: Settlement,
        holds: Holds,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.session = session
        self.settlement = settlement
        self.holds = holds
        self.upstream = UpstreamBase(settings.upstream)

    async def forward(self, request: web.Request, metered: Metered) -> web.StreamResponse:
        url = self.upstream.url_for(request)
        # The rule's timeout bounds the whole exchange, streams included: the hold lives that
        # long (plus a grace period), so no stream can outlive its reservation.
        limit_s = metered.rule.timeout / 1000
        timeout = aiohttp.ClientTimeout(total=limit_s, sock_connect=min(5, limit_s))
        metered.upstream_started = time.monotonic()
        clock = self.holds.clock(metered)  # extends a per-second hold while the model runs
        try:
            return await self._exchange(request, metered, url, timeout, clock)
        finally:
            if clock is not None:
                clock.stop()

    async def _exchange(
        self,
        request: web.Request,
        metered: Metered,
        url: str,
        limits: aiohttp.ClientTimeout,
        clock: GpuClock | None,
    ) -> web.StreamResponse:
        try:
            upstream_cm = self.session.request(
                request.method,
                url,
                data=metered.body or None,
                headers=forward_headers(request, metered.owner, metered.request_id),
                timeout=limits,
                allow_redirects=False,
            )
            if clock is None:
                upstream = await upstream_cm.__aenter__()
            else:
                upstream = await clock.race(upstream_cm.__aenter__())
                clock.attach(upstream)
        except OutOfTime:
            return self._out_of_time(metered, None, None)
        except TimeoutError:
            return self._upstream_failed(metered, 504, "upstream_timeout", "timeout")
        except aiohttp.ClientConnectorError as error:  # never reached the model: free
            log.warning("model container unreachable", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "connect")
        except aiohttp.ClientError as error:  # reached it, then it failed (crash, reset)
            log.warning("model container failed", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "disconnect")
        except asyncio.CancelledError:  # the client left (or shutdown gave up): still settle
            self.settlement.finish(metered, None, None, outcome="client_disconnect")
            raise
        try:
            return await self._relay(request, upstream, metered)
        finally:
            upstream.release()

    def _out_of_time(
        self, metered: Metered, upstream: aiohttp.ClientResponse | None, tap: ResponseTap | None
    ) -> web.Response:
        """Stopped before any byte was sent: 402, charged for the time it held."""
        cost = self.settlement.finish(metered, upstream, tap, outcome="cut_off")
        response = errors.error_response(
            402, "insufficient_quota", "insufficient_balance",
            f"The balance ran out after {metered.elapsed_ms() / 1000:.1f} s of GPU time; the"
            " request was stopped and charged for the time it held.",
        )  # fmt: skip
        response.headers["X-Spendgate-Request-Id"] = metered.request_id
        admission_headers(response.headers, metered.currency, metered.hold, None)
        final_cost_headers(response.headers, metered.hold, None, cost)
        return response

    def _upstream_failed(self, metered: Metered, status: int, code: str, kind: str) -> web.Response:
        self.metrics.upstream_errors.labels(kind).inc()
        self.settlement.finish(metered, None, None, outcome=f"upstream_{kind}")
        return errors.error_response(
            status, "server_error", code, "The model did not answer; you were charged "
            + ("nothing." if kind == "connect"
               or metered.rule.on_upstream_error is FailureCharge.free
               else "for the time it used."),
        )  # fmt: skip

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, metered: Metered
    ) -> web.StreamResponse:
        if is_foreign_error(upstream):  # the model's own error page: relay it in our shape
            response = await foreign_error(upstream)
            _admitted_headers(response.headers, metered)
            response.headers.update(errors.rate_limit_headers(metered.rate))
            self.settlement.finish(metered, upstream, None, outcome="upstream_status")
            return response
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(response_headers(upstream))
        _admitted_headers(response.headers, metered)
        response.headers["X-Spendgate-Request-Id"] = metered.request_id
        response.headers.update(errors.rate_limit_headers(metered.rate))
        if metered.output_change is not None:
            response.headers[OUTPUT_LIMIT_HEADER] = (
                f"{metered.output_limit}; reason={metered.output_change}"
            )
        if metered.count_change is not None:
            name, count = metered.count_change
            response.headers[COUNT_LIMIT_HEADER] = f"{count}; field={name}; reason=balance"
        tap = ResponseTap(
            upstream.headers.get("Content-Type", ""), upstream.headers.get("Content-Encoding", "")
        )
        if tap.sse:
            response.headers.pop("Content-Length", None)  # a cut-off stream changes the length
        elif upstream.content_length is not None and upstream.content_length <= SMALL_BODY:
            return await self._relay_small(upstream, metered, tap, response)
        try:
            await response.prepare(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.settlement.finish(metered, upstream, tap, outcome="client_disconnect")
            return response
        except asyncio.CancelledError:
            self.settlement.finish(metered, upstream, tap, outcome="client_disconnect")
            raise
        outcome = "ok" if upstream.status < 400 else "upstream_status"
        try:
            async for chunk in upstream.content.iter_any():
                pieces = tap.feed(chunk)
                if not await self._write_paid(response, metered, tap, pieces):
                    break
            else:
                if metered.out_of_time:  # the upstream was closed under the loop
                    raise aiohttp.ClientConnectionError("stopped: out of GPU time")
                rest = tap.finish()
                if rest:
                    await response.write(rest)
                await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome = "client_disconnect"
        except (TimeoutError, aiohttp.ClientError) as error:
            if metered.out_of_time:
                with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                    await self._cut_off(response, metered, tap)
                self.settlement.finish(metered, upstream, tap, outcome="cut_off")
                return response
            log.warning("model stream failed", extra={"error": repr(error)})
            self.metrics.upstream_errors.labels("stream").inc()
            outcome = "upstream_stream"
            await self._end_failed_stream(response, tap, error)
        except asyncio.CancelledError:  # handler cancelled (client gone, shutdown timeout)
            cancelled = "cut_off" if metered.cut_off else "client_disconnect"
            self.settlement.finish(metered, upstream, tap, outcome=cancelled)
            raise
        if metered.cut_off:
            outcome = "cut_off"
        self.settlement.finish(metered, upstream, tap, outcome=outcome)
        return response

    async def _end_failed_stream(
        self, response: web.StreamResponse, tap: ResponseTap, error: Exception
    ) -> None:
        """Tell an SSE client why its stream stops here, then end the response cleanly."""
        code = "upstream_timeout" if isinstance(error, TimeoutError) else "upstream_failed"
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            if tap.sse:
                await response.write(
                    sse_error_event("server_error", code, "The model stream ended early.")
                )
            await response.write_eof()

    async def _relay_small(
        self,
        upstream: aiohttp.ClientResponse,
        metered: Metered,
        tap: ResponseTap,
        stream: web.StreamResponse,
    ) -> web.StreamResponse:
        """A small body of known length goes out in one write, headers included."""
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as error:
            if metered.out_of_time:
                return self._out_of_time(metered, upstream, tap)
            log.warning("model response failed", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "disconnect")
        except asyncio.CancelledError:
            self.settlement.finish(metered, upstream, tap, outcome="client_disconnect")
            raise
        tap.feed(body)
        tap.finish()
        response = web.Response(status=stream.status, reason=stream.reason, body=body)
        response.headers.update(stream.headers)
        outcome = "ok" if upstream.status < 400 else "upstream_status"
        cost = self.settlement.finish(metered, upstream, tap, outcome=outcome)
        final_cost_headers(response.headers, metered.hold, metered.available, cost)
        return response

    async def _write_paid(
        self,
        response: web.StreamResponse,
        metered: Metered,
        tap: ResponseTap,
        pieces: list[tuple[bytes, int]],
    ) -> bool:
        """Write what the hold pays for; extend the hold or end the stream when it runs out."""
        if not metered.reserved or metered.rule.simple_price.is_flat_only:
            await response.write(b"".join(piece for piece, _ in pieces))
            metered.events_sent = tap.events
            return True
        paid = bytearray()
        for piece, events_after in pieces:
            used = Used(metered.input_tokens, events_after, metered.elapsed_ms())
            cost = metered.form.cost(used)
            if cost > metered.hold and not await self.holds.extend(metered, cost - metered.hold):
                await response.write(bytes(paid))
                await self._cut_off(response, metered, tap)
                return False
            paid += piece
            metered.events_sent = events_after
        await response.write(bytes(paid))
        return True

    async def _cut_off(
        self, response: web.StreamResponse, metered: Metered, tap: ResponseTap
    ) -> None:
        metered.cut_off = True
        self.metrics.stream_cutoffs.inc()
        if tap.sse:
            await response.write(
                sse_error_event(
                    "insufficient_quota", "insufficient_balance",
                    "The balance ran out; the response was cut off here.",
                )
            )  # fmt: skip
        await response.write_eof()
