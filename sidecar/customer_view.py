"""What a customer sees of its own money through the sidecar: balance headers on every
response and ``GET /v1/spendgate/balance``.

Everything here comes from the calling key's own customer: the reservation made for this very
request, or the account of the customer the key belongs to. Headers of the same names sent by
the model are dropped, so a model cannot forge them.

Headers (amounts are exact decimals in ``X-Spendgate-Currency``):

- ``X-Spendgate-Remaining``: what the customer can still spend -- the prepaid balance, or what
  is left of the spend cap this period -- after this request (after its hold, for a stream);
- ``X-Spendgate-Cost-Limit``: the most this request can cost (its hold);
- ``X-Spendgate-Cost``: what it cost, on responses read in full before they are sent (for a
  stream the cost is known only at its end: see the ledger or the balance endpoint).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from redis.exceptions import RedisError

from spendgate.accounting.balance import balance_view
from spendgate.keys import hash_api_key
from spendgate.ledger import Ledger, Outcome
from spendgate.money import format_amount

from . import errors
from .config_cache import ConfigCache
from .headers import OWN_PREFIX, extract_api_key
from .metrics import SidecarMetrics
from .refusal_counts import RefusalCounter

log = logging.getLogger("spendgate.sidecar")

BALANCE_PATH = "/v1/spendgate/balance"
BALANCE_HOLD_TTL_MS = 5_000
REMAINING = "X-Spendgate-Remaining"
COST = "X-Spendgate-Cost"
COST_LIMIT = "X-Spendgate-Cost-Limit"
CURRENCY = "X-Spendgate-Currency"


def admission_headers(
    headers: CIMultiDict[str] | Any, currency: str, hold: int, available: int | None
) -> None:
    """Drop the model's own ``X-Spendgate-*`` headers; add this request's money headers."""
    for name in [n for n in headers if n.lower().startswith(OWN_PREFIX)]:
        del headers[name]
    headers[CURRENCY] = currency
    headers[COST_LIMIT] = format_amount(hold)
    if available is not None:
        headers[REMAINING] = format_amount(max(0, available))


def final_cost_headers(
    headers: CIMultiDict[str] | Any, hold: int, available: int | None, cost: int
) -> None:
    """For a response sent after its cost is known: the cost, and what remains after it."""
    headers[COST] = format_amount(cost)
    if available is not None:
        headers[REMAINING] = format_amount(max(0, available + hold - cost))


class CustomerView:
    def __init__(
        self,
        ledger: Ledger,
        config: ConfigCache,
        metrics: SidecarMetrics,
        refusals: RefusalCounter,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.metrics = metrics
        self.refusals = refusals

    def refused(self, customer_id: str, key_name: str, reason: str, model: str | None) -> None:
        self.refusals.count(customer_id, key_name, reason, model or "")

    async def balance(self, request: web.Request) -> web.Response:
        """``GET /v1/spendgate/balance`` with the customer's own key: free, rate limited."""
        if request.method not in ("GET", "HEAD"):
            return errors.error_response(
                405, "invalid_request_error", "method_not_allowed",
                f"{BALANCE_PATH} only answers GET.", headers={"Allow": "GET, HEAD"},
            )  # fmt: skip
        key = extract_api_key(request.headers)
        if key is None:
            return errors.missing_key()
        if key == "":
            return errors.invalid_key()
        try:
            owner = await self.config.owner(hash_api_key(key))
            if owner is None:
                return errors.invalid_key()
            pricebook = self.config.pricebook
            currency = pricebook.currency if pricebook is not None else ""
            request_id = uuid.uuid4().hex
            reservation = await self.ledger.reserve(
                owner.customer_id, request_id, 0, key_id=owner.key_name, currency=currency,
                ttl_ms=BALANCE_HOLD_TTL_MS,
            )  # fmt: skip
            if reservation.outcome is Outcome.rate_limited:
                self.metrics.decisions.labels("rate_limited").inc()
                self.refused(owner.customer_id, owner.key_name, "rate_limited", None)
                return errors.refusal(reservation, owner.customer_id)
            if reservation.ok:
                await self.ledger.release(owner.customer_id, request_id)
            account = await self.ledger.account(owner.customer_id)
        except (RedisError, OSError, TimeoutError) as error:
            self.metrics.redis_errors.labels("balance").inc()
            log.warning("balance read failed", extra={"error": repr(error)})
            return errors.store_unavailable()
        self.metrics.decisions.labels("balance").inc()
        view = balance_view(account, int(time.time() * 1000))
        view["key"] = owner.key_name
        headers = {"X-Spendgate-Request-Id": request_id, "Cache-Control": "no-store"}
        headers.update(errors.rate_limit_headers(reservation.rate))
        return web.Response(text=json.dumps(view), content_type="application/json", headers=headers)
