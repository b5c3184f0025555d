"""`make bench`'s configuration: the PriceBook, the measured customers and the other budgets
applied to a Redis (single or Cluster) before the sidecars start, and the ledger totals of the
measured customers afterwards."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spendgate import keys as rkeys
from spendgate import redis_connect
from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.script_channel import ClusterScriptChannel, ScriptChannel

CUSTOMERS = 32  # measured customers: one per connection
MEDIA_PRICEBOOK = Path(__file__).resolve().parents[1] / "examples" / "pricebook-media.yaml"


def _images_rule() -> dict[str, Any]:
    manifest = yaml.safe_load(MEDIA_PRICEBOOK.read_text())
    rule: dict[str, Any] = next(r for r in manifest["spec"]["rules"] if r["name"] == "images")
    return rule


PRICEBOOK: dict[str, Any] = {
    "apiVersion": "spendgate.dev/v1alpha1",
    "kind": "PriceBook",
    "metadata": {"name": "bench", "namespace": "default"},
    "spec": {
        "currency": "USD",
        "unmatched": "deny",
        "rules": [
            {
                "name": "chat",
                "match": {"methods": ["POST"], "path": "/v1/chat/completions"},
                "price": {
                    "flat": "0.0001",
                    "perMillionInputTokens": "0.50",
                    "perMillionOutputTokens": "1.50",
                },
                "estimate": {"outputTokens": 256},
                "maximum": "0.50",
                "timeout": "10m",
                "onUpstreamError": "free",
                "onClientDisconnect": "metered",
            },
            _images_rule(),
        ],
    },
}


def budget(customer: str, balance: str, rate_limits: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": customer, "namespace": "default"},
        "spec": {
            "customerId": customer,
            "mode": "prepaid",
            "currency": "USD",
            "balance": balance,
            "rateLimits": rate_limits,
            "apiKeys": [{"name": "main", "secretRef": {"name": f"{customer}-keys"}}],
        },
    }


# The measured customers: enormous balances, generous limits that are still checked.
MEASURED = [f"bench-{i:02d}" for i in range(CUSTOMERS)]
MEASURED_KEYS = [f"sk-bench-{i:02d}-0123456789abcdef0123" for i in range(CUSTOMERS)]
MEASURED_LIMITS = [{"requests": 1_000_000, "per": "second"}, {"cost": "1000000.00", "per": "hour"}]


async def configure(redis_url: str, cluster: bool, budgets: int) -> None:
    """The PriceBook, the measured customers and ``budgets`` more, each with one key."""
    client = redis_connect.connect(redis_url, cluster=cluster, timeout_s=10, max_connections=64)
    try:
        store = ConfigStore(client)
        await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
        semaphore = asyncio.Semaphore(48)

        async def one(manifest: dict[str, Any], key: str) -> None:
            async with semaphore:
                await store.apply_budget(parse_resource(manifest), {"main": key})  # type: ignore[arg-type]

        measured = [
            one(budget(c, "100000000.00", MEASURED_LIMITS), k)
            for c, k in zip(MEASURED, MEASURED_KEYS, strict=True)
        ]
        limits = [{"requests": 600, "per": "minute"}]
        others = [
            one(
                budget(f"customer-{i:05d}", f"{10 + i % 90}.00", limits),
                f"sk-bench-{i:05d}-{os.urandom(8).hex()}",
            )
            for i in range(budgets)
        ]
        await asyncio.gather(*measured, *others)
        configured = await client.hlen(rkeys.CUSTOMERS)
        if configured < budgets + CUSTOMERS:
            raise RuntimeError(f"only {configured} budgets configured on {redis_url}")
    finally:
        await client.aclose()


async def ledger_totals(redis_url: str, cluster: bool, settle_wait_s: float = 10) -> dict[str, int]:
    """Ledger entries and holds of the measured customers, once every settlement has landed."""
    client = redis_connect.connect(redis_url, cluster=cluster, timeout_s=10)
    try:
        ledger = Ledger(client)
        deadline = time.monotonic() + settle_wait_s
        while True:
            held = sum([(await ledger.account(c)).held for c in MEASURED])
            if not held or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        entries = sum([await client.xlen(for_customer(c).ledger) for c in MEASURED])
        return {"ledger_entries": entries, "held_micros": held}
    finally:
        await client.aclose()


def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def sweep_cost(
    redis_url: str, cluster: bool, redis_cpu: Callable[[], float]
) -> dict[str, Any]:
    """One pass of the sidecar's expired-hold sweep over every configured customer.

    The sidecars run it every ``--hold-sweep-interval`` (10 s by default; one sidecar per
    Redis per interval); the benchmark's sidecars run with it off so that it does not land in
    some rows and not others, and its cost is measured here instead.
    """
    from spendgate.sidecar.hold_sweep import HoldSweep

    client = redis_connect.connect(redis_url, cluster=cluster, timeout_s=10)
    channel = (ClusterScriptChannel if cluster else ScriptChannel)(redis_url, timeout_s=10)
    try:
        customers = await client.hlen(rkeys.CUSTOMERS)
        sweep = HoldSweep(client, Ledger(client, channel=channel), interval_ms=0)
        redis_before, started = redis_cpu(), time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        client_before = usage.ru_utime + usage.ru_stime
        await sweep.sweep_once()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "customers": customers,
            "wall_s": round(time.perf_counter() - started, 3),
            "client_cpu_s": round(usage.ru_utime + usage.ru_stime - client_before, 3),
            "redis_cpu_s": round(redis_cpu() - redis_before, 3),
        }
    finally:
        await channel.close()
        await client.aclose()
