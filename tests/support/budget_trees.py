"""Budget trees for tests: manifests of an organisation, applied through ConfigStore (the path
``spendgate apply`` and the operator take)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import redis.asyncio
import redis.asyncio.cluster

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import CustomerBudget, parse_resource


@asynccontextmanager
async def target_ledger(
    redis: Any, target: Any, clock: Callable[[], int], channel_timeout_s: float | None = None
) -> AsyncIterator[Ledger]:
    """A ledger with its scripts loaded on ``target`` (a ``RedisTarget``), over its pipelined
    channel when the target has one (closed afterwards)."""
    channel = target.script_channel(channel_timeout_s)
    ledger = Ledger(redis, clock=clock, channel=channel)
    await ledger.load_scripts()
    try:
        yield ledger
    finally:
        if channel is not None:
            await channel.close()


@asynccontextmanager
async def concurrent_ledger(
    target: Any, concurrency: int, clock: Callable[[], int]
) -> AsyncIterator[Ledger]:
    """A ledger on ``target`` (a ``RedisTarget``) with a client of its own, whose pool takes
    ``concurrency`` calls at once (and a pipelined channel that queues them without timing out
    on a loaded 2-core machine)."""
    client: Any
    # 500 connections opening at once on a loaded machine: a generous connect timeout
    options = {"max_connections": concurrency + 10, "socket_connect_timeout": 30}
    if target.cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(target.url, **options)
    else:
        client = redis.asyncio.Redis.from_url(target.url, **options)
    try:
        async with target_ledger(client, target, clock, channel_timeout_s=30) as ledger:
            yield ledger
    finally:
        await client.aclose()


@contextmanager
def crashing_move(moves: Any, *, at_step: int = 0, after_it: bool = True) -> Iterator[None]:
    """Moves by ``moves`` (a ``TreeMoves``) crash with ConnectionError at their ``at_step``-th
    step (counted from 0), before or after that step runs, until the block ends."""
    advance, calls = moves._advance, 0

    async def crashing(plan: Any, step: str | None) -> Any:
        nonlocal calls
        index, calls = calls, calls + 1
        if index == at_step and not after_it:
            raise ConnectionError("crashed")
        result = await advance(plan, step)
        if index == at_step:
            raise ConnectionError("crashed")
        return result

    moves._advance = crashing
    try:
        yield
    finally:
        moves._advance = advance


def tree_budget(name: str, parent: str | None = None, **spec: Any) -> CustomerBudget:
    """A CustomerBudget ``name`` (customerId = name) with one key ``<name>-key``."""
    body: dict[str, Any] = {
        "customerId": name,
        "currency": "USD",
        "apiKeys": [{"name": "main", "secretRef": {"name": f"{name}-keys"}}],
        **spec,
    }
    if parent is not None:
        body["parent"] = parent
    manifest = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }
    resource = parse_resource(manifest)
    assert isinstance(resource, CustomerBudget)
    return resource


def key_material(budget: CustomerBudget) -> dict[str, str]:
    return {
        key.name: f"sk-{budget.spec.customer_id}-{key.name}-0123456789"
        for key in budget.spec.api_keys
    }


async def apply_tree(store: ConfigStore, *budgets: CustomerBudget) -> None:
    """Apply budgets in the order given (parents first)."""
    for budget in budgets:
        await store.apply_budget(budget, key_material(budget))
