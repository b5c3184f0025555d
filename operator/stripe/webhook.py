"""The Stripe webhook receiver (its own port) and the leader's event processor.

Entry points for the operator::

    app = create_webhook_app(redis, settings, secrets)     # aiohttp app, POST settings.webhook_path
    runner = await start_webhook_server(app, settings)     # binds settings.webhook_host:port
    ...                                                    # (every replica receives)
    await runner.cleanup()

    # leader only, e.g. in a kopf daemon/timer or via service.run_leader_tasks():
    await run_processor(redis, ledger, settings, consumer=pod_name, stop=stop_event,
                        gateway=gateway, on_event=emit)
    # or one pass at a time:
    applied = await process_pending(redis, ledger, settings, consumer=pod_name, ...)

``secrets`` is a list of signing secrets (current and, during rotation, next) or a callable
returning them, so a Secret watch can swap them without restarting the server.

Receive path: size limit (413), ``Stripe-Signature`` verified with the stripe package's own
``WebhookSignature.verify_header`` against each secret (tolerance ``webhook_tolerance_s``);
anything unsigned, forged, stale or malformed is a 400 with no side effect. An accepted event
is recorded *before* the 2xx by one Lua script on one slot: ``SET sg:{stripe}:seen:<evt> NX EX``
(de-duplication by event id) and ``XADD sg:{stripe}:events``. If Redis is unavailable the
answer is 503 and Stripe retries. (The keys carry the hash tag ``{stripe}`` so the script is
atomic on Redis Cluster too: a crash can never mark an event seen without recording it.)

Processing: a consumer group ``settings.consumer_group`` on the stream. Each pass first takes
over entries another consumer left pending for ``claim_idle_ms`` (``XAUTOCLAIM``: a crashed or
deposed leader), then its own pending entries, then new ones (``XREADGROUP ... BLOCK``); each
entry is applied by :class:`~spendgate.operator.stripe.apply.Applier` (idempotent) and only
then ``XACK``ed and ``XDEL``eted. An entry that cannot be applied for a reason other than Redis
(a malformed body, a bug) goes to ``sg:{stripe}:events:dead`` and is acknowledged, so one bad
event never blocks the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import stripe
from aiohttp import web
from redis.exceptions import RedisError, ResponseError

from spendgate.ledger import Ledger
from spendgate.listening import bind_listener
from spendgate.loops import sleep_or_stop

from .apply import Applier, OnEvent
from .client import StripeGateway, list_all
from .mapping import HANDLED_EVENTS
from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe")

EVENTS_STREAM = "sg:{stripe}:events"
DEAD_EVENTS_STREAM = "sg:{stripe}:events:dead"
SEEN_PREFIX = "sg:{stripe}:seen:"

_RECORD = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) == false then return false end
return redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'type', ARGV[3], 'body', ARGV[4])
"""

Secrets = Sequence[str] | Callable[[], Sequence[str]]
_HANDLED = frozenset(HANDLED_EVENTS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def verify_signature(
    body: bytes, header: str | None, secrets: Sequence[str], tolerance: int
) -> bool:
    """True if ``header`` signs ``body`` with any of ``secrets`` within ``tolerance`` seconds."""
    if not header:
        return False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, tolerance)
            return True
        except stripe.SignatureVerificationError:
            continue
        except (UnicodeDecodeError, ValueError):
            return False
    return False


def create_webhook_app(
    redis: Any,
    settings: StripeSettings,
    secrets: Secrets,
    *,
    record_unhandled: bool = False,
) -> web.Application:
    """The receiver: ``POST settings.webhook_path`` and ``GET /healthz``."""
    record = redis.register_script(_RECORD)

    def current_secrets() -> Sequence[str]:
        return secrets() if callable(secrets) else secrets

    async def receive(request: web.Request) -> web.Response:
        if (request.content_length or 0) > settings.webhook_max_body_bytes:
            return _error(413, "payload too large")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "payload too large")
        header = request.headers.get("Stripe-Signature")
        if not verify_signature(body, header, current_secrets(), settings.webhook_tolerance_s):
            return _error(400, "missing or invalid Stripe-Signature")
        try:
            event = json.loads(body)
        except ValueError:
            return _error(400, "body is not JSON")
        if not (
            isinstance(event, dict)
            and isinstance(event.get("id"), str)
            and event["id"]
            and isinstance(event.get("type"), str)
        ):
            return _error(400, "not a Stripe event")
        if event["type"] not in _HANDLED and not record_unhandled:
            return web.json_response({"received": True, "ignored": True})
        try:
            entry = await asyncio.wait_for(
                record(
                    keys=[EVENTS_STREAM, SEEN_PREFIX + event["id"]],
                    args=[event["id"], settings.dedupe_ttl_s, event["type"], body],
                ),
                timeout=settings.webhook_store_timeout_s,
            )
        except (RedisError, TimeoutError) as error:
            log.error("stripe event %s not recorded: %s", event["id"], type(error).__name__)
            return _error(503, "event store unavailable; retry")
        return web.json_response({"received": True, "duplicate": entry is None})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=settings.webhook_max_body_bytes)
    app.router.add_post(settings.webhook_path, receive)
    app.router.add_get("/healthz", healthz)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def start_webhook_server(
    app: web.Application, settings: StripeSettings, *, sock: socket.socket | None = None
) -> web.AppRunner:
    if sock is None:
        what = "the Stripe webhook receiver"
        sock = bind_listener(settings.webhook_host, settings.webhook_port, what=what)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


# --------------------------------------------------------------------------- processor


async def ensure_group(redis: Any, settings: StripeSettings) -> None:
    try:
        await redis.xgroup_create(EVENTS_STREAM, settings.consumer_group, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


async def process_pending(
    redis: Any,
    ledger: Ledger,
    settings: StripeSettings,
    *,
    consumer: str,
    applier: Applier | None = None,
    gateway: StripeGateway | None = None,
    on_event: OnEvent | None = None,
    block_ms: int | None = None,
    claim_idle_ms: int | None = None,
) -> int:
    """One pass of the processor; returns how many events it applied (and acknowledged)."""
    applier = applier or Applier(redis, ledger, settings, gateway=gateway, on_event=on_event)
    group = settings.consumer_group
    await ensure_group(redis, settings)
    idle = settings.claim_idle_ms if claim_idle_ms is None else claim_idle_ms
    claimed = await redis.xautoclaim(
        EVENTS_STREAM, group, consumer, idle, start_id="0-0", count=settings.processor_batch
    )
    for gone in claimed[2] if len(claimed) > 2 else []:  # deleted while pending
        await redis.xack(EVENTS_STREAM, group, gone)
    entries = await _read(redis, group, consumer, "0", settings.processor_batch, None)
    if not entries:
        block = settings.processor_block_ms if block_ms is None else block_ms
        entries = await _read(redis, group, consumer, ">", settings.processor_batch, block or None)
    applied = 0
    for entry_id, fields in entries:
        if not fields:  # pending but deleted
            await redis.xack(EVENTS_STREAM, group, entry_id)
            continue
        await _apply_entry(redis, applier, settings, entry_id, fields)
        applied += 1
    return applied


async def _read(
    redis: Any, group: str, consumer: str, start: str, count: int, block: int | None
) -> list[tuple[Any, dict[Any, Any]]]:
    response = await redis.xreadgroup(
        group, consumer, {EVENTS_STREAM: start}, count=count, block=block
    )
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        return list(next(iter(response.values()))[0]) if response else []
    return list(response[0][1])


async def _apply_entry(
    redis: Any, applier: Applier, settings: StripeSettings, entry_id: Any, fields: dict[Any, Any]
) -> None:
    data = {_text(k): v for k, v in fields.items()}
    event_id = _text(data.get("id", b"?"))
    try:
        event = json.loads(data["body"])
        effects = await applier.handle_event(event)
        log.info("stripe event %s %s: %s", event_id, event.get("type"), ", ".join(effects))
    except (RedisError, asyncio.CancelledError):
        raise  # stays pending; retried (or claimed by the next leader)
    except Exception as error:
        log.exception("stripe event %s could not be applied; dead-lettered", event_id)
        await redis.xadd(
            DEAD_EVENTS_STREAM,
            {"id": event_id, "body": data.get("body", b""), "error": repr(error)[:500]},
            maxlen=10_000,
        )
    await redis.xack(EVENTS_STREAM, settings.consumer_group, entry_id)
    await redis.xdel(EVENTS_STREAM, entry_id)


async def run_processor(
    redis: Any,
    ledger: Ledger,
    settings: StripeSettings,
    *,
    consumer: str,
    stop: asyncio.Event,
    gateway: StripeGateway | None = None,
    on_event: OnEvent | None = None,
) -> None:
    """The leader's processor loop until ``stop`` is set; Redis outages back off and retry."""
    applier = Applier(redis, ledger, settings, gateway=gateway, on_event=on_event)
    delay = 0.1
    while not stop.is_set():
        try:
            await process_pending(redis, ledger, settings, consumer=consumer, applier=applier)
            delay = 0.1
        except RedisError as error:
            log.warning("stripe processor: Redis error %s; retrying in %.1fs", error, delay)
            await sleep_or_stop(stop, delay)
            delay = min(delay * 2, 5.0)


async def stream_lag_seconds(
    redis: Any, settings: StripeSettings, now: float | None = None
) -> float:
    """Age of the oldest event received but not yet applied (0 when none)."""
    now = time.time() if now is None else now
    try:
        pending = await redis.xpending_range(
            EVENTS_STREAM, settings.consumer_group, min="-", max="+", count=1
        )
    except ResponseError:
        pending = []
    oldest: str | None = _text(pending[0]["message_id"]) if pending else None
    if oldest is None:
        info = await redis.xinfo_groups(EVENTS_STREAM) if await redis.exists(EVENTS_STREAM) else []
        last = next(
            (
                _text(g["last-delivered-id"])
                for g in info
                if _text(g["name"]) == settings.consumer_group
            ),
            None,
        )
        newer = await redis.xrange(EVENTS_STREAM, min=f"({last}" if last else "-", count=1)
        oldest = _text(newer[0][0]) if newer else None
    if oldest is None:
        return 0.0
    return max(0.0, now - int(oldest.split("-")[0]) / 1000)


# --------------------------------------------------------------------------- catch-up

REPLAY_CHECKPOINT = "sg:{stripe}:replayed-until"
REPLAY_FIRST_WINDOW_S = 3 * 86_400  # Stripe retries webhooks for up to three days
REPLAY_MAX_PAGES = 50


async def replay_missed_events(
    redis: Any,
    gateway: StripeGateway,
    settings: StripeSettings,
    *,
    since: int | None = None,
    now: float | None = None,
) -> int:
    """Record events Stripe has but the receiver never got (it was down, or a delivery was
    lost); returns how many were new. Reads ``GET /v1/events`` (Stripe keeps 30 days) created
    since the checkpoint ``sg:{stripe}:replayed-until`` (first time: three days), newest first,
    page by page, and records each handled event exactly like the receiver (same de-duplication
    by event id), so the processor applies it once. Reconciliation runs it every round."""
    now = time.time() if now is None else now
    if since is None:
        raw = await redis.get(REPLAY_CHECKPOINT)
        since = int(_text(raw)) if raw is not None else int(now) - REPLAY_FIRST_WINDOW_S
    record = redis.register_script(_RECORD)
    added = 0
    events = list_all(
        gateway,
        gateway.client.v1.events.list_async,
        {"created": {"gte": since}, "limit": 100},
        "list events",
        max_pages=REPLAY_MAX_PAGES,
        on_truncated=lambda: log.warning(
            "stripe event catch-up stopped after %d pages", REPLAY_MAX_PAGES
        ),
    )
    async for event in events:
        if event.get("type") not in _HANDLED or not event.get("id"):
            continue
        entry = await record(
            keys=[EVENTS_STREAM, SEEN_PREFIX + str(event["id"])],
            args=[event["id"], settings.dedupe_ttl_s, event["type"], json.dumps(event)],
        )
        added += entry is not None
    # Overlap by the clock skew allowance: events are de-duplicated, so re-reading is harmless.
    await redis.set(REPLAY_CHECKPOINT, str(int(now) - settings.clock_skew_s))
    if added:
        log.info("stripe event catch-up recorded %d missed events", added)
    return added
