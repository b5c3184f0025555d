"""Stripe in the budgets' reconciliation (operator/stripe/wiring.py through operator/budgets/),
against a real Redis and in-memory Secrets: links, conflicts, status fields, deletion, and
Stripe events as Kubernetes Events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf
import pytest
import pytest_asyncio
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.ledger import Usage
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.budgets.checks import parse_budget
from spendgate.operator.kube.client import KubeClient
from spendgate.operator.stripe.export_state import EXPORT_CURSORS
from spendgate.operator.stripe.links import STRIPE_CUSTOMERS, stripe_key
from spendgate.operator.stripe.wiring import (
    LAG_STEP_S,
    PENDING_UNLINKS,
    UNLINK_GRACE_S,
    BudgetEvents,
    BudgetLinks,
)
from tests.operator.test_operator_budgets import Secrets, budget_body, next_body, ready, secret
from tests.support.kube_emulator import Kubectl, started_emulator

STRIPE = {"customerId": "cus_ACME"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def store(redis_client: redis.asyncio.Redis) -> ConfigStore:
    return ConfigStore(redis_client)


async def reconcile(store: ConfigStore, body: dict[str, Any], links: BudgetLinks) -> b.Reconciled:
    return await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()), stripe=links)


async def test_a_reconciled_budget_is_linked_with_status_fields(store: ConfigStore) -> None:
    clock = Clock()
    links = BudgetLinks(store.redis, clock=clock)
    body = budget_body(stripe=STRIPE)
    result = await reconcile(store, body, links)
    assert ready(result.status)["status"] == "True"
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") == b"acme"
    assert result.status["lastStripeSync"] is None  # not pulled from Stripe yet
    assert result.status["exportLagSeconds"] == 0

    # The leader's reconciliation ran; usage waits for export for 95 s.
    await store.redis.hset(stripe_key("acme"), "synced_at", str(clock.now - 5))
    await store.ledger.settle("acme", "req-1", 1_000_000, usage=Usage(model="m"))
    entry_ms = int((await store.ledger.ledger_entries("acme"))[-1]["ts"])
    clock.now = entry_ms / 1000 + 95
    refreshed = await b.refresh_budget(
        next_body(body, result), store=store, read_secret=Secrets(secret()), stripe=links
    )
    assert refreshed.status["exportLagSeconds"] == 90  # in steps of 30 s
    assert refreshed.status["lastStripeSync"].endswith("Z")
    assert refreshed.status["exportLagSeconds"] % LAG_STEP_S == 0
    # Exported: the lag is 0 again.
    last = (await store.redis.xrange("sg:{acme}:ledger"))[-1][0]
    await store.redis.hset(EXPORT_CURSORS, "acme", last)
    assert (await links.status(parse_budget(body).spec))["exportLagSeconds"] == 0


async def test_a_budget_without_stripe_is_unlinked(store: ConfigStore) -> None:
    links = BudgetLinks(store.redis)
    body = budget_body(stripe=STRIPE)
    result = await reconcile(store, body, links)
    edited = next_body(body, result)
    edited["spec"].pop("stripe")
    result = await reconcile(store, edited, links)
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") is None
    assert result.status["lastStripeSync"] is None and result.status["exportLagSeconds"] is None


async def test_two_budgets_one_stripe_customer(store: ConfigStore) -> None:
    links = BudgetLinks(store.redis)
    await reconcile(store, budget_body(stripe=STRIPE), links)
    other = budget_body("other", customerId="other", apiKeys=[], stripe=STRIPE)
    result = await reconcile(store, other, links)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "StripeCustomerConflict")
    assert "spec.stripe.customerId: Stripe customer cus_ACME" in condition["message"]
    assert ("Warning", "StripeCustomerConflict") in [(e.type, e.reason) for e in result.events]
    assert await store.owner_of("other") == "team-a/other"  # the budget itself is applied
    assert result.status["state"] == "Active"
    assert result.status["exportLagSeconds"] is None  # not linked: nothing is exported
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") == b"acme"


async def test_deletion_releases_the_link_only_after_the_export(store: ConfigStore) -> None:
    clock = Clock()
    links = BudgetLinks(store.redis, clock=clock)
    body = budget_body(stripe=STRIPE)
    result = await reconcile(store, body, links)
    await store.ledger.settle("acme", "req-1", 1_000_000, usage=Usage(model="m"))
    events = await b.finalize_budget(next_body(body, result), store=store, stripe=links)
    assert [e.reason for e in events] == ["Revoked"]
    assert await store.redis.zscore(PENDING_UNLINKS, "acme") is not None
    assert await links.sweep(store) == []  # within the grace period
    clock.now += UNLINK_GRACE_S + 1
    assert await links.sweep(store) == []  # usage not exported yet: the link stays
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") == b"acme"

    # A second budget wanting the Stripe customer meanwhile is told why.
    other = budget_body("other", customerId="other", apiKeys=[], stripe=STRIPE)
    conflict = ready((await reconcile(store, other, links)).status)["message"]
    assert "was deleted: its link is released once its remaining usage is exported" in conflict

    last = (await store.redis.xrange("sg:{acme}:ledger"))[-1][0]
    await store.redis.hset(EXPORT_CURSORS, "acme", last)
    assert await links.sweep(store) == ["acme"]
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") is None
    assert await store.redis.zscore(PENDING_UNLINKS, "acme") is None
    assert ready((await reconcile(store, other, links)).status)["status"] == "True"


async def test_a_recreated_budget_keeps_its_link(store: ConfigStore) -> None:
    clock = Clock()
    links = BudgetLinks(store.redis, clock=clock)
    body = budget_body(stripe=STRIPE)
    result = await reconcile(store, body, links)
    await b.finalize_budget(next_body(body, result), store=store, stripe=links)
    await reconcile(store, budget_body(stripe=STRIPE, generation=1), links)
    assert await store.redis.zscore(PENDING_UNLINKS, "acme") is None
    clock.now += UNLINK_GRACE_S + 1
    assert await links.sweep(store) == []
    assert await store.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") == b"acme"


async def test_a_budget_never_linked_leaves_nothing_pending(store: ConfigStore) -> None:
    links = BudgetLinks(store.redis)
    body = budget_body()
    result = await reconcile(store, body, links)
    await b.finalize_budget(next_body(body, result), store=store, stripe=links)
    assert await store.redis.zcard(PENDING_UNLINKS) == 0


async def test_stripe_events_become_events_on_the_budget(store: ConfigStore) -> None:
    await reconcile(store, budget_body(stripe=STRIPE), BudgetLinks(store.redis))
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        created = await kubectl.create(
            "spendgate.dev/v1alpha1/customerbudgets",
            {**budget_body(stripe=STRIPE), "metadata": {"name": "acme", "namespace": "team-a"}},
        )
        kube = KubeClient(timeout_s=2)
        kube.configure(kopf.ConnectionInfo(server=url))
        events = BudgetEvents(store, kube, instance="op-0")
        try:
            events("acme", "StripeFunded", "funded 7.00 USD", False)
            events("nobody", "StripeFunded", "no budget", False)
            await events.drain()
            [posted] = kubectl.events("team-a", "acme")
            assert (posted["type"], posted["reason"]) == ("Normal", "StripeFunded")
            assert posted["involvedObject"]["uid"] == created["metadata"]["uid"]
            assert posted["reportingInstance"] == "op-0"
            assert not await events.post("nobody", "StripeFunded", "no budget", False)
            await kube.aclose()  # the API gone: logged and counted, never raised
            assert not await events.post("acme", "Suspended", "payment failed", True)
        finally:
            await kube.aclose()


@pytest.mark.parametrize("reason", [None, "conflict"])
async def test_hooks_errors_from_redis_are_retried(store: ConfigStore, reason: Any) -> None:
    class Broken(BudgetLinks):
        async def link(self, spec: Any) -> str | None:
            if reason:
                return "taken"
            raise redis.exceptions.ConnectionError("gone")

    result = await reconcile(store, budget_body(stripe=STRIPE), Broken(store.redis))
    if reason:
        assert ready(result.status)["reason"] == "StripeCustomerConflict"
    else:
        assert result.error is not None and ready(result.status)["reason"] == "RedisUnavailable"
    await asyncio.sleep(0)


async def test_the_exchange_rate_of_a_custom_unit_is_in_status(store: ConfigStore) -> None:
    links = BudgetLinks(store.redis)
    rate = {**STRIPE, "exchangeRate": {"currency": "USD", "units": "100"}}
    body = budget_body(currency="credits", stripe=rate)
    result = await reconcile(store, body, links)
    assert ready(result.status)["status"] == "True"
    assert result.status["exchangeRate"] == "100 credits per USD"
    edited = next_body(body, result)
    edited["spec"]["stripe"]["exchangeRate"]["units"] = "120"
    changed = await reconcile(store, edited, links)
    assert changed.status["exchangeRate"].startswith("120 credits per USD since 20")
    assert changed.status["exchangeRate"].endswith("Z")
    usd = await reconcile(store, budget_body("usd", customerId="usd", apiKeys=[]), links)
    assert usd.status["exchangeRate"] is None
