"""The request path: identify, price, reserve, forward (streaming), settle.

See DESIGN.md, "The sidecar's request path". Settlement runs after the response has been
written, in a task the app drains on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from spendgate.backpressure import LocalExhaustion
from spendgate.config_store import KeyOwner
from spendgate.keys import hash_api_key
from spendgate.ledger import Ledger, Outcome, Reservation, Usage
from spendgate.models import (
    FailureCharge,
    Price,
    PriceBookSpec,
    PriceRule,
    Unmatched,
    UsageHeaders,
)
from spendgate.pricing import (
    BadRequestBody,
    Bound,
    ExpressionForm,
    NotPriceable,
    OutputLimitTooHigh,
    PricingForm,
    RequestFacts,
    RulePricing,
    Used,
    with_output_limit,
)

from . import errors
from .billing import Metered, measure, price_outcome
from .config_cache import ConfigCache
from .customer_view import BALANCE_PATH, CustomerView, admission_headers, final_cost_headers
from .expression_pricing import report_cost_error
from .front import context
from .front.body import BodyRefused, inspect, read_body
from .front.targets import UpstreamBase
from .headers import extract_api_key, forward_headers, response_headers
from .metering import ResponseTap, sse_error_event
from .metrics import SidecarMetrics
from .reconcile import PendingCharge, PendingCharges
from .refusal_counts import RefusalCounter
from .settings import FailMode, SidecarSettings
from .upstream_errors import foreign_error, is_foreign_error

log = logging.getLogger("spendgate.sidecar")

SMALL_BODY = 64 * 1024  # bodies up to this size with a known length are sent in one write

_FREE_RULE = PriceRule(name="unmatched", price=Price())
OUTPUT_LIMIT_HEADER = "X-Spendgate-Output-Limit"


def output_limit_change(facts: RequestFacts, bound: Bound, limit: int | None) -> str | None:
    """Why the sidecar sets the request's output limit, or None when it leaves it alone:
    ``balance`` (lowered to what the balance covers), ``maximum`` (lowered to the rule's
    maxOutputTokens) or ``unset`` (the client sent none; the model must not pick its own)."""
    if limit is None or not facts.is_json:
        return None
    if bound.output_limit is not None and limit < bound.output_limit:
        return "balance"
    if facts.max_tokens is None:
        return "unset"
    if limit < facts.max_tokens:
        return "maximum"
    return None


class _Refused(Exception):
    def __init__(self, outcome: str, response: web.StreamResponse) -> None:
        self.outcome = outcome
        self.response = response


class Proxy:
    def __init__(
        self,
        settings: SidecarSettings,
        ledger: Ledger,
        config: ConfigCache,
        metrics: SidecarMetrics,
        pending: PendingCharges,
        session: aiohttp.ClientSession,
        customer_view: CustomerView | None = None,
    ) -> None:
        self.customer_view = customer_view or CustomerView(
            ledger, config, metrics, RefusalCounter(ledger.redis)
        )
        self.settings = settings
        self.ledger = ledger
        self.config = config
        self.metrics = metrics
        self.pending = pending
        self.session = session
        self.upstream = UpstreamBase(settings.upstream)
        self.background: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- entry point

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = time.perf_counter()
        access = context.begin(request)
        if request.path == BALANCE_PATH:
            return await self.customer_view.balance(request)
        try:
            metered = await self._admit(request)
        except _Refused as refused:
            access.outcome = refused.outcome
            return refused.response
        self.metrics.added_latency.observe(time.perf_counter() - received)
        return await self._forward(request, metered)

    # ----------------------------------------------------------------- admission

    def _refuse(self, outcome: str, response: web.StreamResponse) -> _Refused:
        self.metrics.decisions.labels(outcome).inc()
        return _Refused(outcome, response)

    async def _admit(self, request: web.Request) -> Metered:
        key = extract_api_key(request.headers)
        if key is None:
            raise self._refuse("missing_key", errors.missing_key())
        if key == "":
            raise self._refuse("invalid_key", errors.invalid_key())
        digest = hash_api_key(key)
        try:
            owner = await self.config.owner(digest)
        except (RedisError, OSError, TimeoutError) as error:
            self.metrics.redis_errors.labels("lookup").inc()
            log.warning("key lookup failed", extra={"error": repr(error)})
            raise self._refuse("store_unavailable", errors.store_unavailable()) from None
        if owner is None:
            raise self._refuse("invalid_key", errors.invalid_key())
        context.current().customer, context.current().key_id = owner.customer_id, owner.key_name

        pricebook = self.config.pricebook
        if pricebook is None:
            raise self._refuse(
                "unpriced",
                errors.error_response(
                    503, "server_error", "pricebook_missing",
                    f"PriceBook {self.settings.pricebook} is not configured.",
                    headers={"Retry-After": "5"},
                ),
            )  # fmt: skip
        try:
            body = await read_body(request, self.settings.max_body_bytes)
            facts = await inspect(body, request.headers.get("Content-Type", ""))
        except BodyRefused as refused:
            raise self._refuse(refused.outcome, refused.response) from None
        rule = self._rule_for(pricebook, request, facts)
        form = self._form_for(rule, pricebook, request, body, facts)
        try:
            bound = form.bound(facts)
        except BadRequestBody as error:
            raise self._refuse(
                "bad_request",
                errors.error_response(400, "invalid_request_error", "invalid_body", str(error)),
            ) from None
        except NotPriceable as error:
            raise self._refuse(
                "unpriceable",
                errors.error_response(
                    400, "invalid_request_error", "unpriceable_request", str(error)
                ),
            ) from None
        except OutputLimitTooHigh as error:
            raise self._refuse(
                "bad_request",
                errors.error_response(
                    400, "invalid_request_error", "output_limit_too_high", str(error)
                ),
            ) from None
        request_id = context.current().request_id
        context.current().rule, context.current().currency = rule.name, pricebook.currency
        reservation = await self._reserve(owner, request_id, rule, bound, pricebook.currency)
        if reservation is not None and not reservation.ok:
            if reservation.outcome is Outcome.currency_mismatch:
                log.error(
                    "price book currency differs from the budget's",
                    extra={"customer": owner.customer_id, "budget_currency": reservation.detail},
                )
            outcome = reservation.outcome.value
            self.customer_view.refused(owner.customer_id, owner.key_name, outcome, facts.model)
            raise self._refuse(outcome, errors.refusal(reservation))
        self.metrics.decisions.labels("admitted" if reservation else "fail_open").inc()
        held = reservation.estimate if reservation is not None else bound.hold
        output_limit = form.output_for(bound, held)
        context.current().hold = held if reservation is not None else None
        clamped = output_limit_change(facts, bound, output_limit)
        if clamped is not None:
            body = with_output_limit(facts, request.path, output_limit)  # type: ignore[arg-type]
            self.metrics.output_limits.labels(clamped).inc()
        return Metered(
            owner=owner,
            request_id=request_id,
            rule=rule,
            form=form,
            facts=facts,
            currency=pricebook.currency,
            hold=held,
            reserved=reservation is not None,
            body=body,
            rate=reservation.rate if reservation is not None else None,
            available=reservation.available if reservation is not None else None,
            input_tokens=bound.input_tokens,
            output_limit=output_limit,
            output_change=clamped,
        )

    @staticmethod
    def _form_for(
        rule: PriceRule,
        pricebook: PriceBookSpec,
        request: web.Request,
        body: bytes,
        facts: RequestFacts,
    ) -> PricingForm:
        simple = RulePricing(rule, clamp=pricebook.clamp_output)
        if rule.pricing is None:
            return simple
        return ExpressionForm(
            rule, rule.pricing, request.method, request.path, request.headers, body,
            request.headers.get("Content-Type", ""), simple.input_tokens(facts),
        )  # fmt: skip

    def _rule_for(
        self, pricebook: PriceBookSpec, request: web.Request, facts: RequestFacts
    ) -> PriceRule:
        rule = pricebook.find_rule(request.method, request.path, facts.model)
        if rule is not None:
            return rule
        if pricebook.unmatched is Unmatched.free:
            return _FREE_RULE
        raise self._refuse(
            "unpriced",
            errors.error_response(
                404, "invalid_request_error", "unpriced_route",
                f"No price is defined for {request.method} {request.path}"
                + (f" with model {facts.model!r}" if facts.model else "") + ".",
            ),
        )  # fmt: skip

    async def _reserve(
        self, owner: KeyOwner, request_id: str, rule: PriceRule, bound: Bound, currency: str
    ) -> Reservation | None:
        try:
            return await self.ledger.reserve(
                owner.customer_id,
                request_id,
                bound.hold,
                minimum=bound.minimum,
                key_id=owner.key_name,
                currency=currency,
                ttl_ms=rule.timeout + self.settings.hold_grace_ms,
            )
        except LocalExhaustion as error:
            # Too many calls in flight here (pool or queue): backpressure after the wait,
            # never "unreachable" and never fail-open.
            self.metrics.backpressure.labels("reserve").inc()
            log.warning("money path saturated", extra={"error": str(error)})
            raise self._refuse(
                "backpressure",
                errors.error_response(
                    503, "server_error", "billing_busy",
                    "Too many requests in flight on this replica; retry shortly.",
                    headers={"Retry-After": "1"},
                ),
            ) from None  # fmt: skip
        except (RedisError, OSError, TimeoutError) as error:
            self.metrics.redis_errors.labels("reserve").inc()
            if self.settings.fail_mode is FailMode.open:
                log.warning(
                    "billing store unavailable; serving fail-open",
                    extra={"customer": owner.customer_id, "error": repr(error)},
                )
                return None
            log.warning(
                "billing store unavailable; refusing",
                extra={"customer": owner.customer_id, "error": repr(error)},
            )
            raise self._refuse("store_unavailable", errors.store_unavailable()) from None

    # ----------------------------------------------------------------- forwarding

    async def _forward(self, request: web.Request, metered: Metered) -> web.StreamResponse:
        url = self.upstream.url_for(request)
        # The rule's timeout bounds the whole exchange, streams included: the hold lives that
        # long (plus a grace period), so no stream can outlive its reservation.
        limit_s = metered.rule.timeout / 1000
        timeout = aiohttp.ClientTimeout(total=limit_s, sock_connect=min(5, limit_s))
        metered.upstream_started = time.monotonic()
        try:
            upstream_cm = self.session.request(
                request.method,
                url,
                data=metered.body or None,
                headers=forward_headers(request, metered.owner, metered.request_id),
                timeout=timeout,
                allow_redirects=False,
            )
            upstream = await upstream_cm.__aenter__()
        except TimeoutError:
            return self._upstream_failed(metered, 504, "upstream_timeout", "timeout")
        except aiohttp.ClientConnectorError as error:  # never reached the model: free
            log.warning("model container unreachable", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "connect")
        except aiohttp.ClientError as error:  # reached it, then it failed (crash, reset)
            log.warning("model container failed", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "disconnect")
        except asyncio.CancelledError:  # the client left (or shutdown gave up): still settle
            self._finish(metered, None, None, outcome="client_disconnect")
            raise
        try:
            return await self._relay(request, upstream, metered)
        finally:
            upstream.release()

    def _upstream_failed(self, metered: Metered, status: int, code: str, kind: str) -> web.Response:
        self.metrics.upstream_errors.labels(kind).inc()
        self._finish(metered, None, None, outcome=f"upstream_{kind}")
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
            admission_headers(response.headers, metered.currency, metered.hold, metered.available)
            response.headers.update(errors.rate_limit_headers(metered.rate))
            self._finish(metered, upstream, None, outcome="upstream_status")
            return response
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(response_headers(upstream))
        admission_headers(response.headers, metered.currency, metered.hold, metered.available)
        response.headers["X-Spendgate-Request-Id"] = metered.request_id
        response.headers.update(errors.rate_limit_headers(metered.rate))
        if metered.output_change is not None:
            response.headers[OUTPUT_LIMIT_HEADER] = (
                f"{metered.output_limit}; reason={metered.output_change}"
            )
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
            self._finish(metered, upstream, tap, outcome="client_disconnect")
            return response
        except asyncio.CancelledError:
            self._finish(metered, upstream, tap, outcome="client_disconnect")
            raise
        outcome = "ok" if upstream.status < 400 else "upstream_status"
        try:
            async for chunk in upstream.content.iter_any():
                pieces = tap.feed(chunk)
                if not await self._write_paid(response, metered, tap, pieces):
                    break
            else:
                rest = tap.finish()
                if rest:
                    await response.write(rest)
                await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            outcome = "client_disconnect"
        except (TimeoutError, aiohttp.ClientError) as error:
            log.warning("model stream failed", extra={"error": repr(error)})
            self.metrics.upstream_errors.labels("stream").inc()
            outcome = "upstream_stream"
            await self._end_failed_stream(response, tap, error)
        except asyncio.CancelledError:  # handler cancelled (client gone, shutdown timeout)
            cancelled = "cut_off" if metered.cut_off else "client_disconnect"
            self._finish(metered, upstream, tap, outcome=cancelled)
            raise
        if metered.cut_off:
            outcome = "cut_off"
        self._finish(metered, upstream, tap, outcome=outcome)
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
            log.warning("model response failed", extra={"error": repr(error)})
            return self._upstream_failed(metered, 502, "upstream_unavailable", "disconnect")
        except asyncio.CancelledError:
            self._finish(metered, upstream, tap, outcome="client_disconnect")
            raise
        tap.feed(body)
        tap.finish()
        response = web.Response(status=stream.status, reason=stream.reason, body=body)
        response.headers.update(stream.headers)
        outcome = "ok" if upstream.status < 400 else "upstream_status"
        cost = self._finish(metered, upstream, tap, outcome=outcome)
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
            if cost > metered.hold and not await self._extend(metered, cost - metered.hold):
                await response.write(bytes(paid))
                await self._cut_off(response, metered, tap)
                return False
            paid += piece
            metered.events_sent = events_after
        await response.write(bytes(paid))
        return True

    async def _extend(self, metered: Metered, needed: int = 1) -> bool:
        rule = metered.rule
        if metered.hold >= rule.max_cost:
            return True  # the cost can never exceed the rule's maximum
        step = max(metered.hold, rule.max_cost // 4, 1)
        extra = min(step, rule.max_cost - metered.hold)
        ttl_ms = rule.timeout + self.settings.hold_grace_ms
        customer, request_id = metered.owner.customer_id, metered.request_id
        try:
            extension = await self.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
            if not extension.ok and extension.reason == "insufficient":
                # Less than a full step is left: take what remains if it pays for this piece,
                # so the stream is cut off when the balance is gone, not before.
                extra = min(extra, extension.available or 0)
                if extra >= needed:
                    extension = await self.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
        except LocalExhaustion:
            self.metrics.backpressure.labels("extend").inc()
            return False  # cut the stream rather than serve what nobody holds
        except (RedisError, OSError, TimeoutError):
            self.metrics.redis_errors.labels("extend").inc()
            return self.settings.fail_mode is FailMode.open
        if extension.ok:
            metered.hold += extra
        return extension.ok

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

    # ----------------------------------------------------------------- settlement

    def _finish(
        self,
        metered: Metered,
        upstream: aiohttp.ClientResponse | None,
        tap: ResponseTap | None,
        *,
        outcome: str,
    ) -> int:
        """Price how the request ended and settle it in the background; returns the cost."""
        headers = upstream.headers if upstream is not None else None
        measured = measure(metered, headers, tap, self._usage_headers())
        status = upstream.status if upstream is not None else 0
        cost, usage = price_outcome(
            metered, measured, tap, outcome, self.settings.pod, status=status, headers=headers
        )
        report_cost_error(
            metered.form, self.metrics,
            customer=metered.owner.customer_id, request_id=metered.request_id,
        )  # fmt: skip
        context.current().outcome, context.current().cost = outcome, cost
        context.current().upstream_ms = metered.elapsed_ms() if metered.upstream_started else None
        task = asyncio.create_task(self._settle(metered, cost, usage))
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return cost

    def _usage_headers(self) -> UsageHeaders:
        pricebook = self.config.pricebook
        return pricebook.usage_headers if pricebook else UsageHeaders()

    async def _settle(self, metered: Metered, cost: int, usage: Usage) -> None:
        customer = metered.owner.customer_id
        try:
            if cost == 0 and metered.reserved:
                await self.ledger.release(customer, metered.request_id)
                self.metrics.settlements.labels("released").inc()
                return
            if cost == 0:
                return
            settled = await self.ledger.settle(
                customer, metered.request_id, cost, key_id=metered.owner.key_name, usage=usage
            )
            self.metrics.settlements.labels("settled").inc()
            self.metrics.spend.labels(metered.currency).inc(settled.charged)
            if settled.absorbed:
                self.metrics.absorbed.labels(metered.currency, metered.rule.name).inc(
                    settled.absorbed
                )
                log.error(
                    "cost above the hold absorbed",
                    extra={"customer": customer, "request_id": metered.request_id,
                           "rule": metered.rule.name, "cost": cost, "hold": metered.hold,
                           "absorbed": settled.absorbed},
                )  # fmt: skip
        except (RedisError, OSError, TimeoutError, LocalExhaustion) as error:
            self.metrics.redis_errors.labels("settle").inc()
            log.warning(
                "settle deferred",
                extra={"customer": customer, "request_id": metered.request_id,
                       "error": repr(error)},
            )  # fmt: skip
            if cost > 0:
                self.pending.add(
                    PendingCharge(customer, metered.request_id, cost, metered.owner.key_name, usage)
                )
                self.metrics.settlements.labels("deferred").inc()
