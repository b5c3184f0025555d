"""The sidecar when things break: the model, the client, Redis, and the sidecar's own shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.sidecar.server import SIDECAR_KEY, Sidecar, create_app
from spendgate.sidecar.settings import FailMode, SidecarSettings
from spendgate.sidecar.standin import STATE, StandinConfig, StandinState
from spendgate.sidecar.standin import create_app as create_standin
from tests.support.redis_servers import RedisServer
from tests.support.sidecar_env import ACME_KEY, PRICEBOOK, DataPlane, budget, data_plane, replace

MICRO = 1_000_000
CENT = 10_000
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
CHAT_PATH = "/v1/chat/completions"


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)


async def usage_entries(plane: DataPlane, customer: str = "acme") -> list[dict[str, str]]:
    return [e for e in await plane.ledger.ledger_entries(customer) if e["type"] == "usage"]


def metric(plane: DataPlane, name: str, labels: dict[str, str] | None = None) -> float:
    value = plane.sidecar.metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def upstream_requests(plane: DataPlane, route: str) -> int:
    assert plane.upstream.app is not None
    return plane.upstream.app[STATE].requests[route]


async def openai_error(resp: aiohttp.ClientResponse) -> dict[str, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message"}
    return body["error"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_failing_app(delay_s: float, status: int = 500) -> web.Application:
    """GET /slow that works for ``delay_s`` (GPU time) and then fails."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay_s)
        error = {"type": "server_error", "code": "oom", "message": "CUDA out of memory"}
        return web.json_response({"error": error}, status=status)

    app = web.Application()
    app.router.add_get("/slow", handler)
    return app


# --------------------------------------------------------------------------- the model fails


async def test_upstream_5xx_is_passed_on_and_free_when_the_rule_says_so(redis_url: str) -> None:
    async with data_plane(redis_url, standin=StandinConfig(fail_status=500)) as plane:
        resp = await plane.post_chat(max_tokens=5)
        assert resp.status == 500
        assert (await openai_error(resp))["code"] == "standin_fail_status"  # the model's body
        await plane.settled()
        account = await plane.account()
        assert account.balance == 10 * MICRO
        assert account.held == 0
        assert await usage_entries(plane) == []
        assert await plane.ledger.holds("acme") == {}


async def test_upstream_5xx_is_charged_its_gpu_time_when_metered(redis_url: str) -> None:
    async with data_plane(redis_url, upstream_app=slow_failing_app(0.3)) as plane:
        resp = await plane.client.get("/slow", headers=AUTH)
        assert resp.status == 500
        assert (await openai_error(resp))["code"] == "oom"
        await plane.settled()
        (entry,) = await usage_entries(plane)
        cost = int(entry["cost"])
        # 0.01 flat + 1.00/s for the ~0.3 s the model worked before failing
        assert CENT + 300 * 1000 <= cost < CENT + 900 * 1000
        assert entry["outcome"] == "upstream_status"
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - cost


async def test_unreachable_model_gets_502_and_charges_nothing(redis_url: str) -> None:
    port = closed_port()
    with_closed_upstream = lambda s: replace(s, upstream=f"http://127.0.0.1:{port}")  # noqa: E731
    async with data_plane(redis_url, settings=with_closed_upstream) as plane:
        chat = await plane.post_chat(max_tokens=5)
        timed = await plane.client.get("/slow?ms=10", headers=AUTH)  # metered rule
        for resp in (chat, timed):
            assert resp.status == 502
            error = await openai_error(resp)
            assert error["code"] == "upstream_unavailable"
            assert error["type"] == "server_error"
        await plane.settled()
        account = await plane.account()
        # The model never saw the requests: no GPU time to meter, nothing to charge.
        assert account.balance == 10 * MICRO
        assert account.held == 0
        assert await usage_entries(plane) == []
        assert metric(plane, "spendgate_upstream_errors_total", {"kind": "connect"}) == 2


async def test_upstream_timeout_gets_504_and_is_charged_by_policy(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        started = time.monotonic()
        resp = await plane.client.get("/slow?ms=1600", headers=AUTH)  # the rule allows 1 s
        assert resp.status == 504
        assert time.monotonic() - started < 1.5
        assert (await openai_error(resp))["code"] == "upstream_timeout"
        await plane.settled()
        (entry,) = await usage_entries(plane)
        cost = int(entry["cost"])
        assert entry["outcome"] == "upstream_timeout"
        assert CENT + MICRO <= cost <= CENT + 1_400_000  # flat + the second it was given
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10 * MICRO - cost


# --------------------------------------------------------------------------- the client leaves


@dataclass
class Running:
    app: web.Application
    runner: web.AppRunner
    url: str
    ledger: Ledger
    upstream_state: StandinState

    @property
    def sidecar(self) -> Sidecar:
        return self.app[SIDECAR_KEY]

    async def usage(self) -> list[dict[str, str]]:
        return [e for e in await self.ledger.ledger_entries("acme") if e["type"] == "usage"]


@asynccontextmanager
async def running_sidecar(
    redis_url: str,
    standin: StandinConfig,
    *,
    shutdown_timeout: float = 5.0,
    handler_cancellation: bool = False,
) -> AsyncIterator[Running]:
    """The sidecar on a plain AppRunner, as ``run()`` serves it (no test-server defaults)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    store = ConfigStore(client)
    await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    await store.apply_budget(
        parse_resource(budget("acme", "10.00")),  # type: ignore[arg-type]
        {"main": ACME_KEY},
    )
    upstream_app = create_standin(standin)
    upstream_runner = web.AppRunner(upstream_app, shutdown_timeout=1)
    await upstream_runner.setup()
    await web.TCPSite(upstream_runner, "127.0.0.1", 0).start()
    settings = SidecarSettings(
        upstream=f"http://127.0.0.1:{upstream_runner.addresses[0][1]}",
        redis_url=redis_url,
        pricebook="default/default",
        pod="test-pod",
        drain_timeout_s=5,
    )
    app = create_app(settings)
    runner = web.AppRunner(
        app, shutdown_timeout=shutdown_timeout, handler_cancellation=handler_cancellation
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield Running(app, runner, url, Ledger(client), upstream_app[STATE])
    finally:
        await runner.cleanup()
        await upstream_runner.cleanup()
        await client.aclose()


def stream_body(max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": "standin", "messages": messages, "max_tokens": max_tokens, "stream": True}


async def read_events(resp: aiohttp.ClientResponse, count: int) -> bytes:
    received = b""
    while received.count(b"\n\n") < count:
        received += await asyncio.wait_for(resp.content.readany(), 2)
    return received


@pytest.mark.parametrize("handler_cancellation", [False, True], ids=["write-fails", "cancelled"])
async def test_client_disconnect_mid_stream_settles_what_was_streamed(
    redis_url: str, handler_cancellation: bool
) -> None:
    """Either way aiohttp may tell the handler: a failed write, or cancelling it."""
    standin = StandinConfig(token_interval_ms=40)
    async with (
        running_sidecar(redis_url, standin, handler_cancellation=handler_cancellation) as sc,
        aiohttp.ClientSession() as session,
    ):
        # ~1.6 s of streaming; hold 0.41
        resp = await session.post(f"{sc.url}{CHAT_PATH}", json=stream_body(40), headers=AUTH)
        assert resp.status == 200
        request_id = resp.headers["X-Spendgate-Request-Id"]
        await read_events(resp, 3)
        resp.close()  # drops the connection mid-stream

        async def charged() -> bool:
            return bool(await sc.usage())

        await eventually(charged, 3, "the disconnected request is settled")
        (entry,) = await sc.usage()
        assert entry["request_id"] == request_id
        assert entry["outcome"] == "client_disconnect"
        cost = int(entry["cost"])
        assert CENT + 3 * CENT <= cost < CENT + 40 * CENT  # metered: what was streamed
        assert entry["output_tokens"] == str((cost - CENT) // CENT)

        async def hold_freed() -> bool:
            return (await sc.ledger.account("acme")).held == 0

        await eventually(hold_freed, 2, "the hold is freed")
        assert (await sc.ledger.account("acme")).balance == 10 * MICRO - cost
        assert len(sc.sidecar.pending) == 0

        async def model_stopped() -> bool:
            return sc.upstream_state.aborted_streams == 1

        await eventually(model_stopped, 2, "the model's stream is aborted too")
        assert sc.upstream_state.completed_streams == 0


# --------------------------------------------------------------------------- Redis fails


async def test_redis_down_fail_closed_refuses_without_calling_the_model(
    fresh_redis_server: RedisServer,
) -> None:
    async with data_plane(fresh_redis_server.url) as plane:
        assert (await plane.client.post("/echo", data=b"{}", headers=AUTH)).status == 200
        fresh_redis_server.stop()
        started = time.monotonic()
        resp = await plane.client.post("/echo", data=b"{}", headers=AUTH)
        elapsed = time.monotonic() - started
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert (await openai_error(resp))["code"] == "billing_unavailable"
        assert upstream_requests(plane, "POST /echo") == 1  # only the first request
        assert elapsed < 2.0, f"a dead Redis took {elapsed:.2f} s to refuse"
        assert metric(plane, "spendgate_decisions_total", {"outcome": "store_unavailable"}) == 1
        await plane.settled()
        fresh_redis_server.start()  # let the teardown's clients close cleanly


async def test_hung_redis_fail_closed_refuses_within_the_redis_timeout(
    fresh_redis_server: RedisServer,
) -> None:
    quick = lambda s: replace(s, redis_timeout_s=0.2)  # noqa: E731
    async with data_plane(fresh_redis_server.url, settings=quick) as plane:
        assert (await plane.client.post("/echo", data=b"{}", headers=AUTH)).status == 200
        await plane.settled()
        fresh_redis_server.freeze()
        try:
            started = time.monotonic()
            resp = await asyncio.wait_for(plane.client.post("/echo", data=b"{}", headers=AUTH), 15)
            elapsed = time.monotonic() - started
            assert resp.status == 503
            assert (await openai_error(resp))["code"] == "billing_unavailable"
            assert upstream_requests(plane, "POST /echo") == 1
            assert elapsed < 1.0, f"a hung Redis held the request for {elapsed:.2f} s"
        finally:
            fresh_redis_server.thaw()


async def test_redis_hung_fail_open_serves_and_reconciles_later(
    fresh_redis_server: RedisServer,
) -> None:
    fail_open = lambda s: replace(s, fail_mode=FailMode.open, redis_timeout_s=0.2)  # noqa: E731
    async with data_plane(fresh_redis_server.url, settings=fail_open) as plane:
        fresh_redis_server.freeze()
        try:
            resp = await asyncio.wait_for(plane.client.post("/echo", data=b"{}", headers=AUTH), 15)
            assert resp.status == 200
            request_id = resp.headers["X-Spendgate-Request-Id"]
            assert upstream_requests(plane, "POST /echo") == 1

            async def deferred() -> bool:
                return metric(plane, "spendgate_pending_settlements") > 0

            await eventually(deferred, 15, "the charge is kept pending")
            assert metric(plane, "spendgate_decisions_total", {"outcome": "fail_open"}) == 1
        finally:
            fresh_redis_server.thaw()

        async def reconciled() -> bool:
            return len(plane.sidecar.pending) == 0 and bool(await usage_entries(plane))

        await eventually(reconciled, 10, "the pending charge reaches Redis")
        (entry,) = await usage_entries(plane)
        assert entry["request_id"] == request_id
        assert entry["cost"] == str(CENT)
        account = await plane.account()
        assert account.balance == 10 * MICRO - CENT
        assert account.held == 0
        assert metric(plane, "spendgate_pending_settlements") == 0


async def test_settle_failing_after_serving_is_kept_and_reconciled(
    fresh_redis_server: RedisServer,
) -> None:
    quick = lambda s: replace(s, redis_timeout_s=0.2)  # noqa: E731
    standin = StandinConfig(token_interval_ms=30)
    async with data_plane(fresh_redis_server.url, settings=quick, standin=standin) as plane:
        resp = await plane.post_chat(max_tokens=10, stream=True)  # holds 0.11
        assert resp.status == 200
        request_id = resp.headers["X-Spendgate-Request-Id"]
        first = await asyncio.wait_for(resp.content.readany(), 2)
        fresh_redis_server.freeze()  # admitted and streaming: now Redis hangs
        try:
            rest = await asyncio.wait_for(resp.read(), 5)
            assert (first + rest).endswith(b"data: [DONE]\n\n")  # the customer was served

            async def deferred() -> bool:
                return len(plane.sidecar.pending) == 1

            await eventually(deferred, 15, "the failed settlement is kept pending")
            assert metric(plane, "spendgate_pending_settlements") == 1
            assert metric(plane, "spendgate_settlements_total", {"outcome": "deferred"}) == 1
        finally:
            fresh_redis_server.thaw()

        async def reconciled() -> bool:
            return len(plane.sidecar.pending) == 0 and bool(await usage_entries(plane))

        await eventually(reconciled, 10, "the pending charge reaches Redis")
        (entry,) = await usage_entries(plane)
        assert entry["request_id"] == request_id
        assert entry["cost"] == str(CENT + 10 * CENT)
        account = await plane.account()
        assert account.balance == 10 * MICRO - 11 * CENT
        assert account.held == 0  # the settle also dropped the hold


# --------------------------------------------------------------------------- shutdown


async def test_graceful_shutdown_drains_and_settles_the_request_in_flight(
    redis_url: str,
) -> None:
    standin = StandinConfig(token_interval_ms=40)
    async with running_sidecar(redis_url, standin) as sc, aiohttp.ClientSession() as session:
        # ~0.8 s of streaming
        resp = await session.post(f"{sc.url}{CHAT_PATH}", json=stream_body(20), headers=AUTH)
        assert resp.status == 200
        request_id = resp.headers["X-Spendgate-Request-Id"]
        first = await read_events(resp, 1)
        shutdown = asyncio.create_task(sc.runner.cleanup())
        rest = await asyncio.wait_for(resp.read(), 5)
        await asyncio.wait_for(shutdown, 10)
        assert (first + rest).endswith(b"data: [DONE]\n\n")  # drained, not dropped
        assert not sc.sidecar.proxy.background  # type: ignore[union-attr]
        # Settled before the shutdown completed: the entry is there the moment it returns.
        entries = await sc.usage()
        assert [e["request_id"] for e in entries] == [request_id]
        assert entries[0]["cost"] == str(CENT + 20 * CENT)
        account = await sc.ledger.account("acme")
        assert account.held == 0
        assert account.balance == 10 * MICRO - 21 * CENT


async def test_shutdown_timeout_cuts_a_long_stream_but_still_settles_it(redis_url: str) -> None:
    """A stream longer than the drain period is cancelled by aiohttp, and still charged."""
    standin = StandinConfig(token_interval_ms=40)
    async with (
        running_sidecar(redis_url, standin, shutdown_timeout=0.3) as sc,
        aiohttp.ClientSession() as session,
    ):
        # ~4 s of streaming: longer than the 0.3 s drain
        resp = await session.post(f"{sc.url}{CHAT_PATH}", json=stream_body(100), headers=AUTH)
        assert resp.status == 200
        request_id = resp.headers["X-Spendgate-Request-Id"]
        await read_events(resp, 2)
        await asyncio.wait_for(sc.runner.cleanup(), 10)
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(resp.read(), 2)
        resp.close()
        entries = await sc.usage()  # settled before cleanup returned
        assert [e["request_id"] for e in entries] == [request_id]
        cost = int(entries[0]["cost"])
        assert CENT + 2 * CENT <= cost < CENT + 100 * CENT
        account = await sc.ledger.account("acme")
        assert account.held == 0
        assert account.balance == 10 * MICRO - cost
