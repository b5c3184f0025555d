"""spendgate.operator.alerts.sender: a local webhook receiver that fails on purpose."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from spendgate.operator.alerts.sender import Alert, AlertSender, redact_url

ALERT = Alert(
    kind="ThresholdCrossed",
    budget="team-a/acme",
    customer_id="acme",
    message="CustomerBudget team-a/acme (customer acme) crossed 80% of its balance",
    fields={"threshold": 80, "balance": "20.00", "currency": "USD"},
)


@dataclass
class Receiver:
    """Answers with ``statuses`` in turn (then 200) and records every body it got."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status == 200 else "nope")


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/services/T000/B000/s3cr3t-token", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    recv.url = f"http://127.0.0.1:{port}/services/T000/B000/s3cr3t-token"
    yield recv
    await runner.cleanup()


def sender(url: str, **kwargs: Any) -> AlertSender:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 2.0)
    return AlertSender(url, **kwargs)


async def test_slack_compatible_payload(receiver: Receiver) -> None:
    alerts = sender(receiver.url)
    result = await alerts.send(ALERT)
    await alerts.aclose()
    assert result.delivered and result.attempts == 1
    [body] = receiver.received
    assert body["text"].startswith(":warning: CustomerBudget team-a/acme")
    assert body["spendgate"] == {
        "kind": "ThresholdCrossed",
        "severity": "warning",
        "budget": "team-a/acme",
        "customerId": "acme",
        "threshold": 80,
        "balance": "20.00",
        "currency": "USD",
    }


async def test_failing_twice_then_succeeding_is_retried(receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    alerts = sender(receiver.url, attempts=4)
    result = await alerts.send(ALERT)
    await alerts.aclose()
    assert (result.delivered, result.attempts, result.status) == (True, 3, 200)
    assert len(receiver.received) == 3
    assert all(body == receiver.received[0] for body in receiver.received)


async def test_never_more_than_the_attempts(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [503] * 10
    alerts = sender(receiver.url, attempts=3)
    with caplog.at_level(logging.INFO, logger="spendgate.operator.alerts"):
        result = await alerts.send(ALERT)
    await alerts.aclose()
    assert (result.delivered, result.attempts, result.error) == (False, 3, "HTTP 503")
    assert len(receiver.received) == 3
    # The webhook URL holds a credential: it never reaches the logs.
    assert "s3cr3t" not in caplog.text and "T000" not in caplog.text
    assert "alert not delivered" in caplog.text


async def test_client_errors_are_final(receiver: Receiver) -> None:
    receiver.statuses = [404]
    alerts = sender(receiver.url, attempts=5)
    result = await alerts.send(ALERT)
    await alerts.aclose()
    assert (result.delivered, result.attempts) == (False, 1)


async def test_rate_limited_is_retried(receiver: Receiver) -> None:
    receiver.statuses = [429]
    alerts = sender(receiver.url, attempts=2)
    assert (await alerts.send(ALERT)).delivered
    await alerts.aclose()


async def test_timeouts_and_refused_connections_are_bounded(receiver: Receiver) -> None:
    receiver.delay_s = 1.0
    alerts = sender(receiver.url, attempts=2, timeout_s=0.1)
    started = asyncio.get_running_loop().time()
    result = await alerts.send(ALERT)
    assert not result.delivered and result.attempts == 2 and result.error == "TimeoutError"
    assert asyncio.get_running_loop().time() - started < 1.0
    await alerts.aclose()

    refused = sender("http://127.0.0.1:9/hook", attempts=2)
    result = await refused.send(ALERT)
    assert not result.delivered and result.attempts == 2
    await refused.aclose()


async def test_dispatch_runs_in_the_background_and_close_drains(receiver: Receiver) -> None:
    receiver.delay_s = 0.05
    alerts = sender(receiver.url, max_pending=2)
    tasks = [alerts.dispatch(ALERT) for _ in range(3)]
    assert tasks[2] is None and alerts.dropped == 1  # bounded
    assert alerts.pending == 2
    await alerts.aclose(timeout_s=5)
    assert len(receiver.received) == 2 and alerts.pending == 0


def test_bad_urls_and_redaction() -> None:
    with pytest.raises(ValueError, match="http"):
        AlertSender("ftp://example.com/x")
    with pytest.raises(ValueError, match="attempts"):
        AlertSender("https://example.com/x", attempts=0)
    assert (
        redact_url("https://hooks.slack.com/services/T/B/secret?x=1") == "https://hooks.slack.com/…"
    )


def test_info_alerts_have_another_icon() -> None:
    make: Callable[..., Alert] = Alert
    alert = make(kind="StateChanged", budget="a/b", customer_id="b", message="m", severity="info")
    assert json.loads(json.dumps(alert.payload()))["text"] == ":information_source: m"
