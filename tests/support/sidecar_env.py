"""A running data plane for sidecar tests: real Redis, the stand-in model, the sidecar app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Account, Ledger
from spendgate.models import parse_resource
from spendgate.sidecar.front.protocol import GuardedAppRunner
from spendgate.sidecar.probes import create_probe_app
from spendgate.sidecar.server import SIDECAR_KEY, Sidecar, create_app, runner_options
from spendgate.sidecar.settings import SidecarSettings
from spendgate.sidecar.standin import StandinConfig
from spendgate.sidecar.standin import create_app as create_standin

ACME_KEY = "sk-test-acme-0123456789abcdef"
OTHER_KEY = "sk-test-other-0123456789abcdef"


def pricebook(*rules: dict[str, Any]) -> dict[str, Any]:
    """The PriceBook ``default/default`` (the one the data plane's sidecar reads), in USD."""
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "PriceBook",
        "metadata": {"name": "default", "namespace": "default"},
        "spec": {"currency": "USD", "rules": list(rules)},
    }


PRICEBOOK: dict[str, Any] = pricebook(
    {
        # 0.01 per request + 0.01 per output token: easy arithmetic in tests.
        "name": "chat",
        "match": {"path": "/v1/chat/completions"},
        "price": {"flat": "0.01", "perMillionOutputTokens": "10000"},
        "estimate": {"outputTokens": 10},
        "maximum": "5.00",
        "timeout": "5s",
        "onUpstreamError": "free",
        "onClientDisconnect": "metered",
    },
    {
        "name": "timed",
        "match": {"pathPrefix": "/slow", "methods": ["GET"]},
        "price": {"flat": "0.01", "perSecond": "1.00"},
        "estimate": {"seconds": "1s"},
        "maximum": "2.00",
        "timeout": "1s",
        "onUpstreamError": "metered",
    },
    {
        "name": "bytes",
        "match": {"pathPrefix": "/bytes"},
        "price": {"flat": "0.01"},
    },
    {
        "name": "echo",
        "match": {"path": "/echo"},
        "price": {"flat": "0.01"},
    },
)


def budget(customer: str, balance: str, key_name: str = "main", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": customer, "namespace": "default"},
        "spec": {
            "customerId": customer,
            "currency": "USD",
            "balance": balance,
            "apiKeys": [{"name": key_name, "secretRef": {"name": f"{customer}-keys"}}],
            **spec,
        },
    }


class SidecarTestServer(TestServer):
    """The customer-facing app served as ``spendgate sidecar`` serves it (protocol guard, access
    log, no automatic body decoding)."""

    def __init__(self, app: web.Application, settings: SidecarSettings) -> None:
        super().__init__(app, host="127.0.0.1")
        self.options = runner_options(settings)

    async def _make_runner(self, **kwargs: Any) -> GuardedAppRunner:
        return GuardedAppRunner(self.app, **{**self.options, **kwargs})


@dataclass
class DataPlane:
    redis: Any
    store: ConfigStore
    ledger: Ledger
    client: TestClient
    upstream: TestServer
    sidecar: Sidecar
    probes: TestClient

    async def apply_budget(self, manifest: dict[str, Any], api_key: str) -> None:
        resource = parse_resource(manifest)
        name = manifest["spec"]["apiKeys"][0]["name"]
        await self.store.apply_budget(resource, {name: api_key})  # type: ignore[arg-type]

    async def account(self, customer: str = "acme") -> Account:
        return await self.ledger.account(customer)

    async def settled(self) -> None:
        """Wait for background settlements (they run after responses are sent)."""
        proxy = self.sidecar.proxy
        for _ in range(200):
            if proxy is not None and not proxy.background:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("settlements did not finish")

    async def post_chat(
        self, key: str = ACME_KEY, *, headers: dict[str, str] | None = None, **body: Any
    ) -> Any:
        payload = {"model": "standin", "messages": [{"role": "user", "content": "hi"}], **body}
        return await self.client.post(
            "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        )


@asynccontextmanager
async def data_plane(
    redis_url: str,
    *,
    standin: StandinConfig | None = None,
    settings: Callable[[SidecarSettings], SidecarSettings] | None = None,
    acme_balance: str = "10.00",
    upstream_app: web.Application | None = None,
    cluster: bool = False,
    pricebook: dict[str, Any] | None = None,
) -> AsyncIterator[DataPlane]:
    client_redis: Any = (
        redis.asyncio.cluster.RedisCluster.from_url(redis_url)
        if cluster
        else redis.asyncio.Redis.from_url(redis_url)
    )
    store = ConfigStore(client_redis)
    await store.apply_pricebook(parse_resource(pricebook or PRICEBOOK))  # type: ignore[arg-type]
    await store.apply_budget(
        parse_resource(budget("acme", acme_balance)),  # type: ignore[arg-type]
        {"main": ACME_KEY},
    )
    upstream = TestServer(
        upstream_app or create_standin(standin or StandinConfig()), host="127.0.0.1"
    )
    await upstream.start_server()
    sidecar_settings = SidecarSettings(
        upstream=str(upstream.make_url("")).rstrip("/"),
        redis_url=redis_url,
        pricebook="default/default",
        pod="test-pod",
        drain_timeout_s=5,
        cluster=cluster,
    )
    if settings is not None:
        sidecar_settings = settings(sidecar_settings)
    app = create_app(sidecar_settings)
    client = TestClient(SidecarTestServer(app, sidecar_settings))
    await client.start_server()
    probes = TestClient(TestServer(create_probe_app(app[SIDECAR_KEY]), host="127.0.0.1"))
    await probes.start_server()
    try:
        yield DataPlane(
            redis=client_redis,
            store=store,
            ledger=Ledger(client_redis),
            client=client,
            upstream=upstream,
            sidecar=app[SIDECAR_KEY],
            probes=probes,
        )
    finally:
        await probes.close()
        await client.close()
        await upstream.close()
        await client_redis.aclose()


__all__ = [
    "ACME_KEY",
    "OTHER_KEY",
    "DataPlane",
    "SidecarTestServer",
    "budget",
    "data_plane",
    "pricebook",
    "replace",
]
