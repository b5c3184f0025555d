"""The operator moves a CustomerBudget whose spec.parent changed (through ConfigStore, like
``spendgate apply``): Ready again at its new place; a move whose holds in flight do not fit the
new parent is InvalidTree, naming spec.parent, and nothing moves."""

from __future__ import annotations

from typing import Any

import pytest_asyncio
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.keys import TREE
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.kube import conditions as cond

NS = "team-a"
UNIT = 1_000_000


def body(name: str, parent: str | None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    full = {
        "customerId": name,
        "currency": "USD",
        "apiKeys": [{"name": "main", "secretRef": {"name": f"{name}-keys"}}],
        **spec,
    }
    if parent:
        full["parent"] = parent
    meta = {"name": name, "namespace": NS, "generation": generation, "uid": f"uid-{name}"}
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": meta,
        "spec": full,
    }


async def read_secret(namespace: str, name: str) -> dict[str, Any] | None:
    key = f"sk-test-{name}-0123456789"
    return {"metadata": {"name": name, "namespace": namespace}, "stringData": {"api-key": key}}


def capped(limit: str) -> dict[str, str]:
    return {"mode": "capped", "limit": limit, "period": "month"}


@pytest_asyncio.fixture
async def store(redis_client: redis.asyncio.Redis) -> ConfigStore:
    store = ConfigStore(redis_client)
    for budget in (
        body("org", None, balance="100.00"),
        body("team-x", "org", **capped("30.00")),
        body("team-y", "org", **capped("2.00")),
        body("proj", "team-x", **capped("10.00")),
    ):
        result = await b.reconcile_budget(budget, store=store, read_secret=read_secret)
        assert cond.find(result.status["conditions"], "Ready")["status"] == "True"
    return store


async def test_a_changed_parent_moves_the_budget(store: ConfigStore) -> None:
    ledger = store.ledger
    held = await ledger.reserve(
        "proj", "r1", 3 * UNIT, key_id="main", currency="USD", ttl_ms=60_000
    )
    assert held.ok
    refused = await b.reconcile_budget(
        body("proj", "team-y", 2, **capped("2.00")), store=store, read_secret=read_secret
    )
    ready = cond.find(refused.status["conditions"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidTree")
    assert "spec.parent: moving 'proj' under 'team-y' would carry 1 holds" in ready["message"]
    assert await store.redis.hget(TREE, "proj") == b"team-x,org"
    await ledger.release("proj", "r1")
    moved = await b.reconcile_budget(
        body("proj", "team-y", 3, **capped("2.00")), store=store, read_secret=read_secret
    )
    assert cond.find(moved.status["conditions"], "Ready")["status"] == "True"
    assert await store.redis.hget(TREE, "proj") == b"team-y,org"
    assert await ledger.tree.ancestors("proj") == ("team-y", "org")
