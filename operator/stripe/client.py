"""The Stripe API client: ``stripe.StripeClient`` on aiohttp, keys from Secrets, bounded retries.

Entry points for the operator::

    api_key = await load_api_key(settings, reader)          # Secret, else $STRIPE_API_KEY
    gateway = StripeGateway.create(api_key, settings)       # StripeClient + AIOHTTPClient
    ...
    await gateway.close()                                   # on shutdown

``reader`` is ``async (secret_name, key) -> str | None`` in the operator's namespace: the
operator's is ``StripeService.read_secret`` (:mod:`.wiring`), on its one API client.

Every call goes through :meth:`StripeGateway.call`, which retries 429, 409 (lock timeouts),
5xx and connection errors with exponential backoff and full jitter, bounded by
``settings.max_attempts`` and ``backoff_cap_s``; the stripe library's own retries are off so
there is exactly one retry policy. Every POST that moves money or records usage carries an
idempotency key derived from what it does (``idempotency_key(...)``), so a retry -- ours, or
a whole pass repeated after a crash -- can never apply twice.

The API key is never logged: it lives only inside the ``StripeClient`` and ``repr()`` of the
gateway does not show it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import stripe

from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe")

SecretReader = Callable[[str, str], Awaitable[str | None]]
T = TypeVar("T")


class StripeNotConfigured(RuntimeError):
    """No API key or no webhook secret could be found."""


async def _read(reader: SecretReader | None, ref: Any) -> str | None:
    if reader is None or ref is None:
        return None
    value = await reader(ref.name, ref.key)
    return value.strip() if value else None


async def load_api_key(
    settings: StripeSettings,
    reader: SecretReader | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The secret API key: from the Secret ``settings.api_key_secret``, else the environment."""
    env = os.environ if env is None else env
    key = await _read(reader, settings.api_key_secret) or env.get(settings.api_key_env, "").strip()
    if not key:
        raise StripeNotConfigured(
            "no Stripe API key: create the Secret "
            f"{settings.api_key_secret.name if settings.api_key_secret else '?'} or set "
            f"{settings.api_key_env}"
        )
    return key


async def load_webhook_secrets(
    settings: StripeSettings,
    reader: SecretReader | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Signing secrets accepted now: current and (during rotation) next; at least one."""
    env = os.environ if env is None else env
    secrets = [
        s
        for s in (
            await _read(reader, settings.webhook_secret),
            await _read(reader, settings.webhook_secret_next),
        )
        if s
    ]
    if not secrets:
        secrets = [s.strip() for s in env.get(settings.webhook_secret_env, "").split(",")]
        secrets = [s for s in secrets if s]
    if not secrets:
        raise StripeNotConfigured(
            "no Stripe webhook signing secret: create the Secret "
            f"{settings.webhook_secret.name if settings.webhook_secret else '?'} or set "
            f"{settings.webhook_secret_env}"
        )
    return secrets[:2]


def idempotency_key(*parts: str) -> str:
    """A stable idempotency key for one money-moving or usage-recording POST."""
    text = "\x1f".join(parts)
    if len(text) <= 200 and text.isascii():
        return "sg-" + text.replace("\x1f", ":")
    return "sg-" + hashlib.sha256(text.encode()).hexdigest()


def is_retryable(error: BaseException) -> bool:
    """429, 409 (not an idempotency mismatch), 5xx and connection errors are worth a retry."""
    if isinstance(error, stripe.IdempotencyError):
        return False
    if isinstance(error, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    if isinstance(error, stripe.StripeError):
        status = error.http_status
        return status is None or status == 409 or status == 429 or status >= 500
    return isinstance(error, asyncio.TimeoutError | ConnectionError)


def is_permanent_rejection(error: BaseException) -> bool:
    """A 4xx other than 429/409: sending the same request again cannot succeed."""
    if not isinstance(error, stripe.StripeError) or is_retryable(error):
        return False
    status = error.http_status
    return status is not None and 400 <= status < 500


def _retry_after(error: BaseException) -> float | None:
    headers = getattr(error, "headers", None) or {}
    try:
        raw = headers.get("retry-after") or headers.get("Retry-After")
        return float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


async def retry_call(
    op: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_s: float,
    cap_s: float,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
    what: str = "stripe call",
) -> T:
    """Run ``op`` with bounded retries: exponential backoff, full jitter, Retry-After honoured."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except Exception as error:
            if attempt >= attempts or not is_retryable(error):
                raise
            delay = rng() * min(cap_s, base_s * 2 ** (attempt - 1))
            hinted = _retry_after(error)
            if hinted is not None:
                delay = max(delay, min(hinted, cap_s))
            log.warning(
                "%s failed (%s, HTTP %s); retry %d/%d in %.2fs",
                what,
                type(error).__name__,
                getattr(error, "http_status", None),
                attempt,
                attempts - 1,
                delay,
            )
            await sleep(delay)


class RateLimiter:
    """Paces request starts at ``rate`` per second (shared by all customers of one exporter)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = self.clock()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


class StripeGateway:
    """A ``StripeClient`` (async, aiohttp) plus the retry policy; what the other modules use."""

    def __init__(
        self,
        client: stripe.StripeClient,
        http: stripe.AIOHTTPClient | None,
        settings: StripeSettings,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.http = http
        self.settings = settings
        self.sleep = sleep
        self.rng = rng

    @classmethod
    def create(cls, api_key: str, settings: StripeSettings, **kwargs: Any) -> StripeGateway:
        http = stripe.AIOHTTPClient(timeout=settings.request_timeout_s)
        bases: dict[str, str] = {}
        if settings.api_base:
            bases["api"] = settings.api_base.rstrip("/")
        if settings.meter_events_base or settings.api_base:
            bases["meter_events"] = (settings.meter_events_base or settings.api_base or "").rstrip(
                "/"
            )
        client = stripe.StripeClient(
            api_key,
            http_client=http,
            base_addresses=bases or None,  # type: ignore[arg-type]
            max_network_retries=0,  # one retry policy: ours
        )
        return cls(client, http, settings, **kwargs)

    def __repr__(self) -> str:
        return f"StripeGateway(api_base={self.settings.api_base or 'stripe'!r})"

    async def call(self, op: Callable[[], Awaitable[T]], what: str = "stripe call") -> T:
        return await retry_call(
            op,
            attempts=self.settings.max_attempts,
            base_s=self.settings.backoff_base_s,
            cap_s=self.settings.backoff_cap_s,
            sleep=self.sleep,
            rng=self.rng,
            what=what,
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close_async()


def to_dict(obj: Any) -> dict[str, Any]:
    """A Stripe response as plain dicts and lists (the pure code never sees StripeObjects)."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    return obj.to_dict(recursive=True) if hasattr(obj, "to_dict") else dict(obj)


async def list_all(
    gateway: StripeGateway,
    list_page: Callable[[dict[str, Any]], Awaitable[Any]],
    params: Mapping[str, Any],
    what: str,
    *,
    max_pages: int,
    on_truncated: Callable[[], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The items of a Stripe list, page by page (``starting_after``), each page through
    ``gateway.call``; at most ``max_pages`` pages, then ``on_truncated()`` if more are left."""
    after: str | None = None
    for _ in range(max_pages):
        page_params = dict(params)
        if after:
            page_params["starting_after"] = after
        page = to_dict(await gateway.call(lambda p=page_params: list_page(p), what))
        data = list(page.get("data") or [])
        for item in data:
            yield item
        if not page.get("has_more") or not data:
            return
        after = str(data[-1]["id"])
    if on_truncated is not None:
        on_truncated()
