"""spendgate.operator.pricebooks.reconcile against a real Redis."""

from __future__ import annotations

import copy
from typing import Any

import pytest_asyncio
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.operator.kube import conditions as cond
from spendgate.operator.pricebooks import reconcile as p


def pricebook_body(generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "PriceBook",
        "metadata": {"name": "gpu", "namespace": "models", "generation": generation},
        "spec": {
            "currency": "USD",
            "rules": [{"name": "chat", "price": {"flat": "0.01"}}],
            **spec,
        },
    }


@pytest_asyncio.fixture
async def store(redis_client: redis.asyncio.Redis) -> ConfigStore:
    return ConfigStore(redis_client)


def ready(status: dict[str, Any]) -> dict[str, Any]:
    found = cond.find(status["conditions"], "Ready")
    assert found is not None
    return dict(found)


async def test_valid_pricebook_is_configured(store: ConfigStore) -> None:
    result = await p.reconcile_pricebook(pricebook_body(), store=store)
    assert result.error is None
    assert ready(result.status)["reason"] == "Configured"
    assert "1 rule in USD" in ready(result.status)["message"]
    assert result.status | {"conditions": None} == {
        "conditions": None,
        "observedGeneration": 1,
        "currency": "USD",
        "rules": 1,
    }
    assert [(e.type, e.reason) for e in result.events] == [("Normal", "Configured")]
    spec = await store.get_pricebook("models/gpu")
    assert spec is not None and spec.rules[0].name == "chat"


async def test_invalid_pricebook_keeps_the_last_valid_one(store: ConfigStore) -> None:
    first = await p.reconcile_pricebook(pricebook_body(), store=store)
    body = pricebook_body(
        generation=2,
        rules=[{"name": "tokens", "price": {"perMillionInputTokens": "1.00"}}],
    )
    body["status"] = first.status
    result = await p.reconcile_pricebook(body, store=store)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert "spec.rules[0]" in condition["message"] and "maximum" in condition["message"]
    assert "stays in effect" in condition["message"]
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "InvalidSpec")]
    spec = await store.get_pricebook("models/gpu")
    assert spec is not None and spec.rules[0].name == "chat"
    # Fixed again: Ready, with a Normal event.
    fixed = copy.deepcopy(pricebook_body(generation=3))
    fixed["status"] = result.status
    again = await p.reconcile_pricebook(fixed, store=store)
    assert ready(again.status)["status"] == "True"
    assert [(e.type, e.reason) for e in again.events] == [("Normal", "Configured")]


async def test_unchanged_pricebook_is_quiet(store: ConfigStore) -> None:
    first = await p.reconcile_pricebook(pricebook_body(), store=store)
    body = pricebook_body()
    body["status"] = first.status
    again = await p.reconcile_pricebook(body, store=store)
    assert again.events == [] and again.patch(body["status"]) == {}


async def test_deleted_pricebook_leaves_redis(store: ConfigStore) -> None:
    await p.reconcile_pricebook(pricebook_body(), store=store)
    events = await p.finalize_pricebook(pricebook_body(), store=store)
    assert events[0].reason == "Deleted"
    assert await store.get_pricebook("models/gpu") is None


async def test_a_bad_price_expression_is_a_condition_naming_rule_and_position(
    store: ConfigStore,
) -> None:
    await p.reconcile_pricebook(pricebook_body(), store=store)
    images = {
        "name": "images",
        "expression": {
            "prices": {"image": "0.04"},
            "bound": "int(request.n) * prices.image",
            "cost": "size(response.dta) * prices.image + respnse.n",
        },
    }
    body = pricebook_body(generation=2, rules=[images])
    result = await p.reconcile_pricebook(body, store=store)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert condition["message"].startswith(
        "spec.rules[0]: rule 'images': expression.cost: unknown variable 'respnse'"
    )
    assert "at line 1, column 37" in condition["message"]
    spec = await store.get_pricebook("models/gpu")
    assert spec is not None and spec.rules[0].name == "chat"  # the last valid one stays
    images["expression"]["cost"] = "size(response.data) * prices.image"  # type: ignore[index]
    fixed = await p.reconcile_pricebook(pricebook_body(generation=3, rules=[images]), store=store)
    assert ready(fixed.status)["reason"] == "Configured"
    spec = await store.get_pricebook("models/gpu")
    assert spec is not None and spec.rules[0].pricing is not None
