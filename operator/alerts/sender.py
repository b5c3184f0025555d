"""Outgoing budget alerts: JSON POSTed to a webhook, Slack-compatible, with bounded retries.

The body is what a Slack (or Mattermost, Teams-via-workflow, ...) incoming webhook accepts,
``{"text": "..."}``, plus the same facts as structured fields under ``"spendgate"`` for
machines::

    {"text": ":warning: CustomerBudget team-a/acme (customer acme) crossed 80% ...",
     "spendgate": {"kind": "ThresholdCrossed", "customerId": "acme",
                   "budget": "team-a/acme", "threshold": 80, "state": "Active", ...}}

Delivery is at most ``attempts`` POSTs with exponential backoff; connection errors, timeouts,
HTTP 408/429 and 5xx are retried, other answers are final. The webhook URL is a secret (Slack
puts the credential in the path), so logs name only its scheme and host. Alerts never carry
API keys: they are built from status fields only.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("spendgate.operator.alerts")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Alert:
    """One thing worth telling a human about a budget."""

    # ThresholdCrossed | StateChanged | SoftLimitReached (a notify soft limit) | AbnormalSpend
    # | CostAbsorbed
    kind: str
    budget: str  # namespace/name
    customer_id: str
    message: str
    severity: str = "warning"  # info | warning
    fields: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        icon = ":warning:" if self.severity == "warning" else ":information_source:"
        return {
            "text": f"{icon} {self.message}",
            "spendgate": {
                "kind": self.kind,
                "severity": self.severity,
                "budget": self.budget,
                "customerId": self.customer_id,
                **self.fields,
            },
        }


def redact_url(url: str) -> str:
    """``https://hooks.slack.com/...``: the path and query of a webhook URL are credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/…"


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    status: int | None = None
    error: str = ""


class AlertSender:
    """POSTs alerts to one webhook URL; ``dispatch`` sends in the background, bounded."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        timeout_s: float = 5.0,
        max_pending: int = 100,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"alert webhook {redact_url(url)}: expected an http(s) URL")
        self.url = url
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._session = session
        self._own_session = session is None
        self._tasks: set[asyncio.Task[DeliveryResult]] = set()
        self.dropped = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Alerts are rare: no idle keep-alive connections to the webhook.
                connector=aiohttp.TCPConnector(force_close=True),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"User-Agent": "spendgate-operator"},
            )
            self._own_session = True
        return self._session

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass
        base = min(self.backoff_s * (2 ** (attempt - 1)), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: many budgets alert at once

    async def send(self, alert: Alert) -> DeliveryResult:
        """Deliver one alert; returns after success, a final refusal or the last attempt."""
        where = redact_url(self.url)
        payload = alert.payload()
        status: int | None = None
        error = ""
        for attempt in range(1, self.attempts + 1):
            retry_after: str | None = None
            try:
                async with self._client().post(
                    self.url,
                    json=payload,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as response:
                    status = response.status
                    await response.read()
                    if 200 <= status < 300:
                        log.info(
                            "alert delivered",
                            extra={
                                "webhook": where,
                                "alert": alert.kind,
                                "budget": alert.budget,
                                "attempt": attempt,
                            },
                        )
                        return DeliveryResult(True, attempt, status)
                    error = f"HTTP {status}"
                    if status not in RETRY_STATUSES:
                        break
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status = None
                error = type(exc).__name__
            if attempt < self.attempts:
                await asyncio.sleep(self._delay(attempt, retry_after))
        log.warning(
            "alert not delivered",
            extra={
                "webhook": where,
                "alert": alert.kind,
                "budget": alert.budget,
                "error": error,
                "attempts": attempt,
            },
        )
        return DeliveryResult(False, attempt, status, error)

    def dispatch(self, alert: Alert) -> asyncio.Task[DeliveryResult] | None:
        """Send in the background, so a slow webhook never holds up reconciliation."""
        if len(self._tasks) >= self.max_pending:
            self.dropped += 1
            log.warning(
                "alert dropped: too many undelivered alerts",
                extra={"alert": alert.kind, "budget": alert.budget, "pending": len(self._tasks)},
            )
            return None
        task = asyncio.create_task(self.send(alert), name=f"alert {alert.kind} {alert.budget}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Give pending alerts ``timeout_s`` to finish, cancel the rest, close the session."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()


__all__ = ["Alert", "AlertSender", "DeliveryResult", "redact_url"]
