"""What a budget tree costs per request: reserve + settle on a single budget and on the leaf of
trees of 2, 3 and 4 levels, against a throwaway redis-server; each depth also with soft limits
at every level (a throttle and a downgrade, both reached, so each request is throttled-checked
and downgraded at every level).

    .venv/bin/python benchmarks/tree_depth.py [--requests 3000]

Reports, per depth, the client's sequential req/s (one reserve + one settle per request, one
round trip each) and Redis' own time per script call (INFO commandstats, evalsha): the cost
that a tree's one shard pays for every level. Everything shares the machine's cores: compare
the rows within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.local_redis import RedisServer
from spendgate.models import CustomerBudget, parse_resource

LIMITS = [{"requests": 1_000_000, "per": "second"}]
# Reached from the first request (less than 2000000 is always left), never refusing.
SOFT_LIMITS = [
    {"action": "throttle", "below": "2000000", "rateLimits": LIMITS},
    {"action": "downgrade", "below": "2000000"},
]


def _budget(name: str, parent: str | None, soft: bool) -> CustomerBudget:
    spec: dict[str, object] = {
        "customerId": name,
        "currency": "USD",
        "rateLimits": LIMITS,
        "apiKeys": [{"name": "main", "secretRef": {"name": f"{name}-keys"}}],
    }
    if soft:
        spec["policy"] = {"softLimits": SOFT_LIMITS}
    if parent is None:
        spec["balance"] = "1000000"
    else:
        spec.update(parent=parent, mode="capped", limit="1000000", period="month")
    resource = parse_resource(
        {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }
    )
    assert isinstance(resource, CustomerBudget)
    return resource


async def _measure(url: str, depth: int, requests: int, soft: bool) -> tuple[float, float]:
    client = redis.asyncio.Redis.from_url(url)
    await client.flushall()
    ledger = Ledger(client)
    await ledger.load_scripts()
    store = ConfigStore(client, ledger)
    parent = None
    for level in range(depth):
        name = f"d{depth}-l{level}"
        budget = _budget(name, parent, soft)
        await store.apply_budget(budget, {"main": f"sk-bench-{name}-0123456789"})
        parent = name
    leaf = parent or ""
    await client.config_resetstat()
    start = time.perf_counter()
    downgrade = (800, 800) if soft else None
    for i in range(requests):
        held = await ledger.reserve(
            leaf, f"r{i}", 1000, key_id="main", currency="USD", ttl_ms=60_000, downgrade=downgrade
        )
        assert held.ok and bool(held.downgraded) == soft, held
        await ledger.settle(leaf, f"r{i}", 600)
    elapsed = time.perf_counter() - start
    stats = (await client.info("commandstats"))["cmdstat_evalsha"]
    account = await ledger.account(f"d{depth}-l0")
    assert account.charged == 600 * requests and account.held == 0, account
    await client.aclose()
    return requests / elapsed, float(stats["usec_per_call"])


async def main(requests: int) -> None:
    server = RedisServer()
    server.start()
    try:
        print(f"{'levels':>6}  {'soft limits':>11}  {'req/s':>8}  {'Redis µs per script':>20}")
        for depth in (1, 2, 3, 4):
            for soft in (False, True):
                rate, usec = await _measure(server.url, depth, requests, soft)
                print(
                    f"{depth:>6}  {'2 a level' if soft else 'none':>11}  {rate:>8.0f}"
                    f"  {usec:>20.1f}"
                )
    finally:
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    asyncio.run(main(parser.parse_args().requests))
