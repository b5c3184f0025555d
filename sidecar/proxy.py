"""The request path: identify, price, reserve (here), forward (:mod:`.relay`), settle
(:mod:`.settlement`).

See DESIGN.md, "The sidecar's request path". Settlement runs after the response has been
written, in a task the app drains on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from spendgate.backpressure import LocalExhaustion
from spendgate.config_store import KeyOwner
from spendgate.keys import hash_api_key
from spendgate.ledger import Ledger, Outcome, Reservation, TreeMoving
from spendgate.models import (
    Price,
    PriceBookSpec,
    PriceRule,
    Unmatched,
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
    with_field,
    with_output_limit,
)

from . import errors
from .billing import Metered
from .config_cache import ConfigCache
from .customer_view import BALANCE_PATH, CustomerView
from .downgrade import Downgrade, plan_downgrade
from .fail_open import FailOpenAllowance, upper_bound
from .front import context
from .front.body import BodyRefused, inspect, read_body
from .headers import extract_api_key
from .holds import Holds
from .journal import JournalError
from .metrics import SidecarMetrics
from .reconcile import PendingCharges
from .refusal_counts import RefusalCounter
from .relay import Relay
from .settings import FailMode, SidecarSettings
from .settlement import Settlement

log = logging.getLogger("spendgate.sidecar")

_FREE_RULE = PriceRule(name="unmatched", price=Price())
__all__ = ["Proxy", "output_limit_change"]


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
        fail_open: FailOpenAllowance | None = None,
    ) -> None:
        self.customer_view = customer_view or CustomerView(
            ledger, config, metrics, RefusalCounter(ledger.redis, tree=ledger.tree)
        )
        self.settings = settings
        self.ledger = ledger
        self.config = config
        self.metrics = metrics
        self.pending = pending
        self.fail_open = fail_open or FailOpenAllowance(
            settings.fail_open_allowance, pending.journal
        )
        self.settlement = Settlement(settings, ledger, config, metrics, pending)
        self.relay = Relay(
            settings,
            metrics,
            session,
            self.settlement,
            Holds(settings, ledger, metrics, self.fail_open),
        )

    @property
    def background(self) -> set[asyncio.Task[None]]:
        """Settlements still running (the app waits for them on shutdown)."""
        return self.settlement.background

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
        response = await self.relay.forward(request, metered)
        if not metered.reserved:  # its charge is on disk before the response is released
            await self.pending.durable(metered.owner.customer_id, metered.request_id)
        return response

    # ----------------------------------------------------------------- admission

    def _refuse(self, outcome: str, response: web.StreamResponse) -> _Refused:
        self.metrics.decisions.labels(outcome).inc()
        return _Refused(outcome, response)

    def _retry_shortly(self, outcome: str, code: str, message: str) -> _Refused:
        """A 503 the client may retry in a second (no money was touched)."""
        return self._refuse(
            outcome,
            errors.error_response(503, "server_error", code, message, headers={"Retry-After": "1"}),
        )

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
        downgrade = plan_downgrade(
            pricebook, rule, request.method, request.path, facts, bound,
            lambda target, target_body, target_facts: self._form_for(
                target, pricebook, request, target_body, target_facts
            ),
        )  # fmt: skip
        reservation = await self._reserve(
            owner, request_id, rule, bound, pricebook.currency, form, downgrade
        )
        if reservation is not None and not reservation.ok:
            if reservation.outcome is Outcome.currency_mismatch:
                log.error(
                    "price book currency differs from the budget's",
                    extra={"customer": owner.customer_id, "budget_currency": reservation.detail},
                )
            outcome = reservation.outcome.value
            self.customer_view.refused(owner.customer_id, owner.key_name, outcome, facts.model)
            raise self._refuse(outcome, errors.refusal(reservation, owner.customer_id))
        self.metrics.decisions.labels("admitted" if reservation else "fail_open").inc()
        downgraded = None
        if reservation is not None and reservation.downgraded and downgrade is not None:
            self.metrics.downgrades.labels(rule.name).inc()
            downgraded = downgrade.header(reservation.downgraded)
            rule, form, facts, body, bound = (
                downgrade.rule, downgrade.form, downgrade.facts, downgrade.body, downgrade.bound
            )  # fmt: skip
            context.current().rule = rule.name
        held = reservation.estimate if reservation is not None else bound.hold
        output_limit = form.output_for(bound, held)
        context.current().hold = held if reservation is not None else None
        clamped = output_limit_change(facts, bound, output_limit)
        if clamped is not None:
            body = with_output_limit(facts, request.path, output_limit)  # type: ignore[arg-type]
            self.metrics.output_limits.labels(clamped).inc()
        count = form.count_for(held) if reservation is not None else None
        if count is not None:
            body = with_field(facts, *count)
            self.metrics.count_limits.inc()
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
            bound=bound,
            output_limit=output_limit,
            output_change=clamped,
            count_change=count,
            downgraded=downgraded,
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
        self,
        owner: KeyOwner,
        request_id: str,
        rule: PriceRule,
        bound: Bound,
        currency: str,
        form: PricingForm,
        downgrade: Downgrade | None,
    ) -> Reservation | None:
        timeout = rule.timeout if downgrade is None else max(rule.timeout, downgrade.rule.timeout)
        try:
            return await self.ledger.reserve(
                owner.customer_id,
                request_id,
                bound.hold,
                minimum=bound.minimum,
                key_id=owner.key_name,
                currency=currency,
                ttl_ms=timeout + self.settings.hold_grace_ms,
                downgrade=None
                if downgrade is None
                else (downgrade.bound.hold, downgrade.bound.minimum),
            )
        except TreeMoving as error:  # its budget is being moved to another tree: never fail-open
            log.warning("budget moving", extra={"error": str(error)})
            raise self._retry_shortly(
                "moving", "budget_moving", "This budget is being moved; retry shortly."
            ) from None
        except LocalExhaustion as error:
            # Too many calls in flight here (pool or queue): backpressure after the wait,
            # never "unreachable" and never fail-open.
            self.metrics.backpressure.labels("reserve").inc()
            log.warning("money path saturated", extra={"error": str(error)})
            raise self._retry_shortly(
                "backpressure",
                "billing_busy",
                "Too many requests in flight on this replica; retry shortly.",
            ) from None
        except (RedisError, OSError, TimeoutError) as error:
            self.metrics.redis_errors.labels("reserve").inc()
            if self.settings.fail_mode is FailMode.open:
                upper = upper_bound(form, bound, rule.timeout)
                await self._admit_fail_open(owner, request_id, upper)
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

    async def _admit_fail_open(self, owner: KeyOwner, request_id: str, amount: int) -> None:
        """Take the request's upper bound from the customer's fail-open allowance, or refuse
        as if failing closed."""
        customer = owner.customer_id
        try:
            admitted = await self.fail_open.admit(
                customer, request_id, amount, int(time.time() * 1000)
            )
        except JournalError as error:
            log.error("fail-open refused: journal unusable", extra={"error": str(error)})
            admitted = False
        if not admitted:
            log.warning(
                "billing store unavailable; fail-open allowance used up, refusing",
                extra={"customer": customer, "bound": amount,
                       "used": self.fail_open.used(customer), "allowance": self.fail_open.limit},
            )  # fmt: skip
            raise self._refuse("fail_open_exhausted", errors.store_unavailable())
