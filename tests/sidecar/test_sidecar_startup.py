"""What the sidecar says when it starts: bound first, then "started", naming its Redis (never
its password); a subscription is "lost" only once it was made; a wrong PriceBook names the
ones that exist."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.listening import ListenError
from spendgate.models import parse_resource
from spendgate.sidecar.config_cache import ConfigCache
from spendgate.sidecar.server import run
from spendgate.sidecar.settings import SidecarSettings
from tests.support.sidecar_env import PRICEBOOK

CONFIG_LOGGER = "spendgate.sidecar.config"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def messages(caplog: pytest.LogCaptureFixture, logger: str | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if logger is None or r.name == logger]


async def run_until(settings: SidecarSettings, caplog: pytest.LogCaptureFixture, text: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop))
    for _ in range(400):
        if text in messages(caplog) or task.done():
            break
        await asyncio.sleep(0.025)
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_started_names_redis_without_its_password(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    url = redis_url.replace("redis://", "redis://:hunter2@")
    settings = SidecarSettings(
        upstream="http://127.0.0.1:9", redis_url=url, listen_host="127.0.0.1", listen_port=port
    )
    await run_until(settings, caplog, "listening")
    (started,) = [r for r in caplog.records if r.getMessage() == "sidecar started"]
    assert started.redis == url.replace("hunter2", "[REDACTED]")  # type: ignore[attr-defined]
    assert "hunter2" not in " ".join(str(vars(r)) for r in caplog.records)
    assert messages(caplog).index("sidecar started") < messages(caplog).index("listening")


async def test_a_port_in_use_fails_before_anything_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = SidecarSettings(
            upstream="http://127.0.0.1:9", listen_host="127.0.0.1", listen_port=port
        )
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port} for the sidecar"):
            await run(settings, stop=asyncio.Event())
    assert "sidecar started" not in messages(caplog)


@pytest.fixture
def closed_redis_url() -> Iterator[str]:
    yield f"redis://127.0.0.1:{free_port()}/0"


async def test_a_subscription_never_made_is_not_reported_lost(
    closed_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.asyncio.Redis.from_url(closed_redis_url, socket_connect_timeout=0.2)
    cache = ConfigCache(ConfigStore(client), "default/default", refresh_s=60)
    cache.start()
    try:
        assert not await cache.wait_subscribed(within_s=0.5)
    finally:
        await cache.stop()
        await client.aclose()
    said = messages(caplog, CONFIG_LOGGER)
    assert "config subscription not established; retrying" in said
    assert not any("lost" in line for line in said)


async def test_a_subscription_made_then_dropped_is_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    admin = redis.asyncio.Redis.from_url(redis_url)
    await ConfigStore(client).apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    cache = ConfigCache(ConfigStore(client), "default/default", refresh_s=60)
    cache.start()
    try:
        assert await cache.wait_subscribed(within_s=5)
        await admin.client_kill_filter(_type="pubsub")
        for _ in range(200):
            if "config subscription lost; retrying" in messages(caplog, CONFIG_LOGGER):
                break
            await asyncio.sleep(0.01)
        assert "config subscription lost; retrying" in messages(caplog, CONFIG_LOGGER)
        assert await cache.wait_subscribed(within_s=5)  # and it comes back
    finally:
        await cache.stop()
        await client.aclose()
        await admin.aclose()


async def test_a_wrong_pricebook_lists_the_ones_that_exist(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client: Any = redis.asyncio.Redis.from_url(redis_url)
    store = ConfigStore(client)
    await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    other = {**PRICEBOOK, "metadata": {"name": "llama", "namespace": "models"}}
    await store.apply_pricebook(parse_resource(other))  # type: ignore[arg-type]
    cache = ConfigCache(store, "default/defualt", refresh_s=60)
    try:
        await cache.load()
    finally:
        await client.aclose()
    assert cache.pricebook is None
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "pricebook default/defualt not found; PriceBooks in Redis: default/default, models/llama"
    )
