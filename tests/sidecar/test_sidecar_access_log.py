"""Logs an operator can use: one access line per request, request ids everywhere, true 402s."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import replace

import pytest

from spendgate.ledger import Outcome, Reservation
from spendgate.sidecar import errors
from tests.support.sidecar_env import ACME_KEY, data_plane

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "spendgate.sidecar.access"]


async def test_one_access_line_per_request_with_its_fields_and_no_credential(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with data_plane(redis_url) as plane:
        served = await plane.post_chat(max_tokens=5)
        unknown = await plane.post_chat("sk-nobody-0123456789abcdef")
        bad = await plane.client.post(
            "/echo?api_key=sk-in-the-query-0123456789", data=b"{nope", headers={
                **AUTH, "Content-Type": "application/json"})  # fmt: skip
        await plane.settled()
    lines = _access_lines(caplog)
    assert len(lines) == 3
    by_id = {r.request_id: r for r in lines}  # type: ignore[attr-defined]
    ok = by_id[served.headers["X-Spendgate-Request-Id"]]
    assert (ok.status, ok.outcome, ok.customer, ok.key_id, ok.rule) == (  # type: ignore[attr-defined]
        200, "ok", "acme", "main", "chat",
    )  # fmt: skip
    assert ok.cost == "0.06" and ok.hold == "0.06" and ok.currency == "USD"  # type: ignore[attr-defined]
    assert isinstance(ok.upstream_ms, int) and ok.path == "/v1/chat/completions"  # type: ignore[attr-defined]
    refused = by_id[unknown.headers["X-Spendgate-Request-Id"]]
    assert (refused.status, refused.outcome) == (401, "invalid_key")  # type: ignore[attr-defined]
    assert not hasattr(refused, "customer")
    invalid = by_id[bad.headers["X-Spendgate-Request-Id"]]
    assert (invalid.status, invalid.outcome, invalid.path) == (400, "bad_request", "/echo")  # type: ignore[attr-defined]
    assert "sk-" not in caplog.text and ACME_KEY not in caplog.text


async def test_every_response_carries_a_request_id(redis_url: str) -> None:
    poor = lambda s: replace(s, max_body_bytes=100)  # noqa: E731
    async with data_plane(redis_url, settings=poor) as plane:
        responses = [
            await plane.post_chat(),
            await plane.client.post("/echo"),  # 401
            await plane.client.post("/echo", data=b"x" * 500, headers=AUTH),  # 413
            await plane.client.options("/echo"),
            await plane.client.post("/echo", data=b"[]", headers=AUTH),  # 400
        ]
        ids = [r.headers.get("X-Spendgate-Request-Id") for r in responses]
        assert all(ids) and len(set(ids)) == len(ids), ids


async def test_warnings_about_a_request_carry_its_id(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    nowhere = lambda s: replace(s, upstream=f"http://127.0.0.1:{closed}")  # noqa: E731
    caplog.set_level(logging.INFO)
    async with data_plane(redis_url, settings=nowhere) as plane:
        resp = await plane.post_chat()
        assert resp.status == 502
        await plane.settled()
    request_id = resp.headers["X-Spendgate-Request-Id"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings
    for record in warnings:
        assert getattr(record, "request_id", None) == request_id, record.getMessage()
        assert getattr(record, "customer", None) == "acme"


@pytest.mark.parametrize(
    ("outcome", "available", "says", "never"),
    [
        (Outcome.insufficient, -900_000, "-0.90", "0.00"),
        (Outcome.insufficient, 20_000, "0.02 of your balance is available", "-"),
        (Outcome.cap_reached, -50_000, "exceeded by 0.05", "available 0"),
        (Outcome.cap_reached, 10_000, "has 0.01 left", "exceeded"),
    ],
)
def test_402_messages_tell_the_real_figures(
    outcome: Outcome, available: int, says: str, never: str
) -> None:
    response = errors.refusal(Reservation(outcome, "r1", 110_000, available=available))
    assert response.status == 402
    message = json.loads(response.text or "")["error"]["message"]
    assert says in message and "0.11" in message
    assert never not in message


async def test_start_up_names_redis_and_never_reports_a_subscription_it_never_had(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from spendgate.config_store import ConfigStore
    from spendgate.ledger import Ledger
    from spendgate.sidecar.config_cache import ConfigCache

    caplog.set_level(logging.INFO)
    async with data_plane(redis_url):
        pass
    started = next(r for r in caplog.records if r.getMessage() == "sidecar started")
    assert started.redis == redis_url  # type: ignore[attr-defined]
    caplog.clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    client = redis.asyncio.Redis(port=closed, retry=Retry(NoBackoff(), 0))
    cache = ConfigCache(ConfigStore(client, Ledger(client)), "default/default", refresh_s=60)
    cache.start()
    for _ in range(100):
        if any("config subscription" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    await cache.stop()
    await client.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert "config subscription not established; retrying" in messages
    assert "config subscription lost; retrying" not in messages
