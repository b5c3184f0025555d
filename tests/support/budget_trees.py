"""Budget trees for tests: manifests of an organisation, applied through ConfigStore (the path
``spendgate apply`` and the operator take)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import CustomerBudget, parse_resource


@asynccontextmanager
async def target_ledger(redis: Any, target: Any, clock: Callable[[], int]) -> AsyncIterator[Ledger]:
    """A ledger with its scripts loaded on ``target`` (a ``RedisTarget``), over its pipelined
    channel when the target has one (closed afterwards)."""
    channel = target.script_channel()
    ledger = Ledger(redis, clock=clock, channel=channel)
    await ledger.load_scripts()
    try:
        yield ledger
    finally:
        if channel is not None:
            await channel.close()


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
