"""Local exhaustion is backpressure: waits, then 503 with Retry-After; never fail-open."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from spendgate.cli import UsageError, build_parser
from spendgate.cli.servers import sidecar_settings_from_args
from spendgate.sidecar.settings import FailMode
from tests.support.sidecar_env import ACME_KEY, data_plane, replace

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


async def test_a_saturated_pool_waits_then_answers_503_and_never_fails_open(
    redis_url: str,
) -> None:
    settings = lambda s: replace(  # noqa: E731
        s, redis_pool_size=2, redis_timeout_s=0.3, fail_mode=FailMode.open
    )
    async with data_plane(redis_url, settings=settings) as plane:
        limiter = plane.sidecar.limiter
        held = [await _take(limiter) for _ in range(limiter.size)]  # every slot busy
        resp = await plane.client.post("/echo", data=b"{}", headers=AUTH)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "billing_busy"
        registry = plane.sidecar.metrics.registry
        assert (
            registry.get_sample_value("spendgate_backpressure_total", {"operation": "reserve"}) == 1
        )
        assert not registry.get_sample_value("spendgate_decisions_total", {"outcome": "fail_open"})
        for release in held:
            release.set()
        await asyncio.sleep(0.05)
        assert (await plane.client.post("/echo", data=b"{}", headers=AUTH)).status == 200


async def _take(limiter: Any) -> asyncio.Event:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with limiter.slot():
            entered.set()
            await release.wait()

    asyncio.get_running_loop().create_task(hold())
    await entered.wait()
    return release


@pytest.mark.cluster
async def test_a_small_pool_on_the_cluster_queues_instead_of_failing(
    redis_cluster_url: str,
) -> None:
    """200 concurrent requests through 4 slots: every one waits its turn; none is a 503."""
    settings = lambda s: replace(s, redis_pool_size=4, redis_timeout_s=2.0)  # noqa: E731
    async with data_plane(
        redis_cluster_url, cluster=True, settings=settings, acme_balance="1.00"
    ) as plane:
        responses = await asyncio.gather(
            *(plane.client.post("/echo", data=b"{}", headers=AUTH) for _ in range(200))
        )
        statuses = sorted(r.status for r in responses)
        assert statuses.count(200) == 100 and statuses.count(402) == 100
        await plane.settled()
        account = await plane.account()
        assert (account.balance, account.held) == (0, 0)


def test_pool_size_and_hold_settings_from_flags_and_environment() -> None:
    parser = build_parser()
    ns = parser.parse_args(
        ["sidecar", "--upstream", "http://m:8000", "--redis-pool-size", "32",
         "--hold-grace", "45s", "--redis-timeout", "1500ms"]
    )  # fmt: skip
    settings = sidecar_settings_from_args(ns, {"SPENDGATE_HOLD_SWEEP_INTERVAL": "0"})
    assert (settings.redis_pool_size, settings.hold_grace_ms) == (32, 45_000)
    assert settings.redis_timeout_s == 1.5
    assert settings.hold_sweep_interval_ms == 0
    for bad in (["--redis-pool-size", "0"], ["--hold-grace", "soon"]):
        ns = parser.parse_args(["sidecar", "--upstream", "http://m:8000", *bad])
        with pytest.raises(UsageError, match=bad[0]):
            sidecar_settings_from_args(ns, {})
    assert isinstance(ns, argparse.Namespace)
