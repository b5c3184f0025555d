"""Usage out: settled usage from the ledger streams to Stripe meter events (leader only).

Entry points for the operator::

    exporter = Exporter(redis, settings, gateway, on_event=emit)
    await exporter.run(stop)                      # loop, every settings.export_interval_s
    await exporter.export_all()                   # one pass over every Stripe-linked budget
    lag = await export_lag_seconds(redis, cid)    # status field / metric: age in seconds of the
                                                  # oldest ledger entry not yet exported

What is sent: one meter event per ``usage`` entry with a cost above zero::

    event_name = settings.meter_event_name
    identifier = the request id (Stripe de-duplicates on it for at least 24 h)
    timestamp  = the entry's settle time (seconds)
    payload    = {settings.meter_customer_key: "cus_...", settings.meter_value_key: VALUE}

An entry of a budget tree (the root's ledger holds every descendant's usage; only the root
links a Stripe customer, so each request is exported once) adds
``settings.meter_budget_key: "<customerId of the key's budget>"``, a meter dimension.

``VALUE`` is the cost as an integer string in ``settings.meter_value_unit``: ``micros``
(default: micro-units of the budget currency, exact; price the meter at 1e-6 of the currency
per unit, e.g. ``unit_amount_decimal = "0.0001"`` cents) or ``minor`` (the currency's minor
unit, each event rounded *up*, which over-bills fractions of a cent per request).

Delivery: per customer, entries after the cursor (``sg:stripe:export`` hash, customerId -> last
handled ledger entry id) are sent in order, ``export_concurrency`` at a time, paced by a token
bucket at ``export_requests_per_s``; 429/5xx/connection errors are retried with backoff
(``StripeGateway.call``). The cursor moves only over a prefix of entries that Stripe accepted
or permanently rejected -- never past a transient failure -- so a crash or restart resends at
most the last batch, which Stripe drops by ``identifier``: nothing is lost, nothing is billed
twice. A permanent rejection (4xx other than 409/429) goes to ``sg:{customerId}:deadletter``
(stream: the entry, the error) and ``on_event(customer, "StripeUsageRejected", ...)``.

Trimming: after the cursor moves, the ledger stream is ``XTRIM``-ed with ``MINID`` = the cursor
(or now - ``ledger_retention_s`` if that is older), so Redis keeps only unexported entries plus
the retention window. Budgets that are not linked to Stripe are neither exported nor trimmed.

With ``settings.export_v2_stream`` the high-throughput v2 meter event stream is used instead: a
meter event session (``/v2/billing/meter_event_session``, renewed before it expires) and
batches of up to 100 events per ``/v2/billing/meter_event_stream`` request. A batch Stripe
rejects permanently is resent event by event on v1, so the dead letter names the bad event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from spendgate.accounting.audit import record_export, trim_ledger
from spendgate.keys import for_customer
from spendgate.loops import run_every

from .apply import OnEvent
from .client import (
    RateLimiter,
    StripeGateway,
    idempotency_key,
    is_permanent_rejection,
    to_dict,
)
from .currency import micros_to_minor_ceil
from .export_state import EXPORT_CURSORS, deadletter_key, entry_ms, export_lag_seconds, text
from .links import linked_customers, load_link
from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe")

V2_BATCH = 100

EXPORTED = Counter(
    "spendgate_stripe_meter_events_total", "Usage entries sent to Stripe, by outcome", ["outcome"]
)
EXPORT_LAG = Gauge(
    "spendgate_stripe_export_lag_seconds",
    "Age of the oldest ledger entry not yet exported to Stripe (largest over all budgets)",
)


@dataclass
class ExportResult:
    sent: int = 0
    skipped: int = 0
    dead: int = 0
    failed: int = 0  # transient, left for the next pass
    cursor: str | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    entry_id: str
    fields: dict[str, str]
    params: dict[str, Any] | None  # None: nothing to send (not usage, or cost 0)


class Exporter:
    def __init__(
        self,
        redis: Any,
        settings: StripeSettings,
        gateway: StripeGateway,
        *,
        on_event: OnEvent | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.gateway = gateway
        self.on_event = on_event
        self.clock = clock
        self.limiter = RateLimiter(settings.export_requests_per_s)
        self._session: tuple[str, float] | None = None  # v2 token, expiry (epoch s)

    # ------------------------------------------------------------------ passes

    async def export_all(self) -> dict[str, ExportResult]:
        results: dict[str, ExportResult] = {}
        worst = 0.0
        for cid in sorted(await linked_customers(self.redis)):
            total = ExportResult()
            for _ in range(20):  # bounded per pass; the next pass continues
                result = await self.export_customer(cid)
                total.sent += result.sent
                total.skipped += result.skipped
                total.dead += result.dead
                total.failed += result.failed
                total.errors += result.errors
                total.cursor = result.cursor or total.cursor
                if (
                    result.failed
                    or result.sent + result.skipped + result.dead < self.settings.export_batch
                ):
                    break
            results[cid] = total
            worst = max(worst, await export_lag_seconds(self.redis, cid, self.clock()))
        EXPORT_LAG.set(worst)
        return results

    async def run(self, stop: asyncio.Event) -> None:
        await run_every(
            stop,
            self.settings.export_interval_s,
            self.export_all,
            log=log,
            failed="stripe export pass failed",
        )

    async def export_customer(self, customer_id: str) -> ExportResult:
        """Send the next batch of one customer's ledger; move the cursor over what is done."""
        result = ExportResult()
        link = await load_link(self.redis, customer_id)
        if link is None:
            return result
        cursor = await self.redis.hget(EXPORT_CURSORS, customer_id)
        start = f"({text(cursor)}" if cursor is not None else "-"
        ledger_key = for_customer(customer_id).ledger
        raw = await self.redis.xrange(ledger_key, min=start, count=self.settings.export_batch)
        if not raw:
            return result
        items = [
            self._item(text(eid), fields, link.stripe_customer, link.currency)
            for eid, fields in raw
        ]
        outcomes = await self._send(customer_id, items)
        done_upto: str | None = None
        sent_cost = rejected_cost = 0
        for item in items:
            outcome = outcomes.get(item.entry_id, "skip")
            if outcome == "fail":
                break
            if outcome == "skip":
                result.skipped += 1
            elif outcome == "ok":
                result.sent += 1
                sent_cost += int(item.fields.get("cost") or 0)
            else:  # permanently rejected: the error text
                result.dead += 1
                rejected_cost += int(item.fields.get("cost") or 0)
                await self._dead_letter(customer_id, item, outcome)
            done_upto = item.entry_id
        result.failed = sum(1 for o in outcomes.values() if o == "fail")
        EXPORTED.labels("sent").inc(result.sent)
        EXPORTED.labels("rejected").inc(result.dead)
        if done_upto is not None:
            # The totals first: `spendgate audit` checks them against the ledger up to their
            # own cursor, so a crash between the two writes only resends the batch.
            await record_export(self.redis, customer_id, done_upto, sent_cost, rejected_cost)
            await self.redis.hset(EXPORT_CURSORS, customer_id, done_upto)
            result.cursor = done_upto
            await self._trim(customer_id, done_upto)
        return result

    def _item(
        self, entry_id: str, raw: Mapping[Any, Any], stripe_customer: str, currency: str
    ) -> _Item:
        fields = {text(k): text(v) for k, v in raw.items()}
        if fields.get("type") != "usage":
            return _Item(entry_id, fields, None)
        cost = int(fields.get("cost") or 0)
        if cost <= 0:
            return _Item(entry_id, fields, None)
        value = (
            cost
            if self.settings.meter_value_unit == "micros"
            else micros_to_minor_ceil(cost, currency)
        )
        ts_ms = int(fields.get("ts") or entry_ms(entry_id))
        params = {
            "event_name": self.settings.meter_event_name,
            "identifier": fields.get("request_id") or entry_id,
            "timestamp": ts_ms // 1000,
            "payload": {
                self.settings.meter_customer_key: stripe_customer,
                self.settings.meter_value_key: str(value),
            },
        }
        if fields.get("budget"):  # an entry of a tree: the budget whose key made the request
            params["payload"][self.settings.meter_budget_key] = fields["budget"]
        return _Item(entry_id, fields, params)

    async def _trim(self, customer_id: str, cursor: str) -> None:
        """Drop what is exported (beyond the retention window), keeping its totals in the
        ledger base so the audit still adds it up."""
        minid = cursor
        if self.settings.ledger_retention_s > 0:
            horizon = int((self.clock() - self.settings.ledger_retention_s) * 1000)
            if horizon < entry_ms(cursor):
                minid = f"{max(horizon, 0)}-0"
        await trim_ledger(self.redis, customer_id, minid)

    async def _dead_letter(self, customer_id: str, item: _Item, error: str) -> None:
        await self.redis.xadd(
            deadletter_key(customer_id),
            {"entry_id": item.entry_id, "error": error[:1000], **item.fields},
            maxlen=100_000,
        )
        message = (
            f"Stripe rejected usage of request {item.fields.get('request_id')} "
            f"(ledger entry {item.entry_id}): {error[:300]}"
        )
        log.warning("stripe export: %s: %s", customer_id, message)
        if self.on_event is not None:
            try:
                outcome = self.on_event(customer_id, "StripeUsageRejected", message, True)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("event callback failed")

    # ------------------------------------------------------------------ sending

    async def _send(self, customer_id: str, items: list[_Item]) -> dict[str, str]:
        """entry id -> "ok" | "fail" (transient) | error text (permanent) for items to send."""
        to_send = [i for i in items if i.params is not None]
        if not to_send:
            return {}
        if self.settings.export_v2_stream:
            return await self._send_v2(customer_id, to_send)
        return await self._send_v1(customer_id, to_send)

    async def _send_v1(self, customer_id: str, items: list[_Item]) -> dict[str, str]:
        semaphore = asyncio.Semaphore(self.settings.export_concurrency)
        client = self.gateway.client
        gave_up = asyncio.Event()  # after a transient failure, start nothing new (order)

        async def one(item: _Item) -> tuple[str, str]:
            params = item.params or {}
            options = {
                "idempotency_key": idempotency_key("meter", customer_id, params["identifier"])
            }

            async def op() -> Any:
                await self.limiter.acquire()
                return await client.v1.billing.meter_events.create_async(
                    params,  # type: ignore[arg-type]
                    options,  # type: ignore[arg-type]
                )

            async with semaphore:
                if gave_up.is_set():
                    return item.entry_id, "fail"
                try:
                    await self.gateway.call(op, "meter event")
                    return item.entry_id, "ok"
                except Exception as error:
                    if is_permanent_rejection(error):
                        return item.entry_id, _describe(error)
                    log.warning("stripe export: %s: %s", customer_id, _describe(error))
                    gave_up.set()
                    return item.entry_id, "fail"

        return dict(await asyncio.gather(*(one(item) for item in items)))

    async def _session_token(self) -> str:
        now = self.clock()
        if self._session is None or self._session[1] - 60 <= now:
            client = self.gateway.client
            session = to_dict(
                await self.gateway.call(
                    lambda: client.v2.billing.meter_event_session.create_async(),
                    "meter event session",
                )
            )
            expires = _parse_time(session.get("expires_at")) or now + 900
            self._session = (str(session["authentication_token"]), expires)
        return self._session[0]

    async def _send_v2(self, customer_id: str, items: list[_Item]) -> dict[str, str]:
        outcomes: dict[str, str] = {}
        client = self.gateway.client
        for start in range(0, len(items), V2_BATCH):
            batch = items[start : start + V2_BATCH]
            events = []
            for item in batch:
                params = dict(item.params or {})
                params["timestamp"] = _iso(int(params["timestamp"]))
                events.append(params)
            try:
                for attempt in range(2):
                    token = await self._session_token()

                    key = idempotency_key(
                        "meter-stream", customer_id, *(str(e["identifier"]) for e in events)
                    )

                    async def op(
                        token: str = token, events: list[Any] = events, key: str = key
                    ) -> Any:
                        await self.limiter.acquire()
                        return await client.v2.billing.meter_event_stream.create_async(
                            {"events": events},  # type: ignore[typeddict-item]
                            {"api_key": token, "idempotency_key": key},
                        )

                    try:
                        await self.gateway.call(op, "meter event stream")
                        break
                    except Exception as error:
                        if getattr(error, "http_status", None) == 401 and attempt == 0:
                            self._session = None  # expired session: renew once
                            continue
                        raise
                outcomes.update({item.entry_id: "ok" for item in batch})
            except Exception as error:
                if is_permanent_rejection(error):
                    # Which event was bad? Ask v1, one by one, for precise dead letters.
                    outcomes.update(await self._send_v1(customer_id, batch))
                else:
                    log.warning("stripe export (v2): %s: %s", customer_id, _describe(error))
                    outcomes.update({item.entry_id: "fail" for item in batch})
                    break  # keep order: nothing after a transient failure
        return outcomes


def _describe(error: BaseException) -> str:
    status = getattr(error, "http_status", None)
    message = getattr(error, "user_message", None) or str(error)
    return f"HTTP {status}: {message}" if status else f"{type(error).__name__}: {message}"


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _parse_time(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
