"""Budgets in a custom unit funded from Stripe: USD top-ups buy credits at the exchange rate in
force when the payment was made, exactly; a rate change never touches a balance."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
import redis.asyncio
from aiohttp.test_utils import TestClient, TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import CustomerBudget, parse_resource
from spendgate.operator.stripe.links import Link, current_exchange_rate, link_budget
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.webhook import create_webhook_app, process_pending
from tests.support.stripe_fakes import WEBHOOK_SECRET, make_event, paid_topup_session, sign

SETTINGS = StripeSettings(enabled=True, claim_idle_ms=60_000)
CREDIT = 1_000_000  # micro-units of one credit
T0_MS = 1_780_000_000_000  # when the first rate was configured
T1_MS = T0_MS + 86_400_000  # a day later, the rate changes


def credits_budget(units: str | None) -> CustomerBudget:
    stripe: dict[str, Any] = {"customerId": "cus_ACME"}
    if units is not None:
        stripe["exchangeRate"] = {"currency": "USD", "units": units}
    resource = parse_resource(
        {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": "acme", "namespace": "default"},
            "spec": {"customerId": "acme", "currency": "credits", "balance": "0",
                     "stripe": stripe},
        }
    )  # fmt: skip
    assert isinstance(resource, CustomerBudget)
    return resource


@dataclass
class Env:
    redis: Any
    ledger: Ledger
    store: ConfigStore
    client: TestClient
    events: list[tuple[str, str]] = field(default_factory=list)

    async def configure(self, units: str | None, now_ms: int) -> Link | None:
        budget = credits_budget(units)
        await self.store.apply_budget(budget, {})
        return await link_budget(self.redis, budget.spec, now_ms=now_ms)

    async def deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event)
        headers = {"Stripe-Signature": sign(body, WEBHOOK_SECRET),
                   "Content-Type": "application/json"}  # fmt: skip
        response = await self.client.post("/stripe/webhook", data=body, headers=headers)
        assert response.status == 200, await response.text()
        await process_pending(
            self.redis, self.ledger, SETTINGS, consumer="op-0", block_ms=0,
            on_event=lambda _c, reason, message, _w: self.events.append((reason, message)),
        )  # fmt: skip

    async def balance(self) -> int:
        return (await self.ledger.account("acme")).balance

    async def fund_notes(self) -> list[str]:
        entries = await self.ledger.ledger_entries("acme")
        return [entry.get("note", "") for entry in entries if entry["type"] == "fund"]


@pytest_asyncio.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    client_redis = redis.asyncio.Redis.from_url(redis_url)
    ledger = Ledger(client_redis)
    app = create_webhook_app(client_redis, SETTINGS, [WEBHOOK_SECRET])
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Env(client_redis, ledger, ConfigStore(client_redis, ledger), client)
    finally:
        await client.close()
        await client_redis.aclose()


def topup(cents: int, payment: str, paid_at_ms: int) -> dict[str, Any]:
    session = {**paid_topup_session(cents, payment), "id": f"cs_{payment}",
               "created": paid_at_ms // 1000}  # fmt: skip
    return make_event("checkout.session.completed", session, created=paid_at_ms // 1000 + 5)


async def test_a_usd_topup_funds_credits_at_the_rate_exactly(env: Env) -> None:
    link = await env.configure("100", T0_MS)
    assert link is not None and current_exchange_rate(link) == "100 credits per USD"
    await env.deliver(topup(1234, "pi_1", T0_MS + 60_000))  # $12.34
    assert await env.balance() == 1234 * CREDIT
    assert await env.fund_notes() == [
        "stripe top-up (checkout cs_pi_1) (12.34 USD at 100 credits per USD)"
    ]


async def test_a_rate_change_leaves_balances_and_earlier_payments_alone(env: Env) -> None:
    await env.configure("100", T0_MS)
    await env.deliver(topup(1000, "pi_1", T0_MS + 60_000))
    assert await env.balance() == 1000 * CREDIT
    link = await env.configure("120", T1_MS)
    assert link is not None
    assert current_exchange_rate(link) == "120 credits per USD since 2026-05-29T20:26:40Z"
    assert await env.balance() == 1000 * CREDIT  # untouched
    # Paid before the change, delivered after it (a late webhook): the old rate.
    await env.deliver(topup(500, "pi_2", T1_MS - 1_000))
    assert await env.balance() == (1000 + 500) * CREDIT
    # Paid after the change: the new rate.
    await env.deliver(topup(500, "pi_3", T1_MS + 1_000))
    assert await env.balance() == (1000 + 500 + 600) * CREDIT
    # Re-applying the budget (every reconcile) does not move the rate's start.
    link = await env.configure("120", T1_MS + 3_600_000)
    assert link is not None and [rate.since_ms for rate in link.rates] == [0, T1_MS]


async def test_a_refund_takes_back_what_the_payment_bought(env: Env) -> None:
    await env.configure("100", T0_MS)
    await env.deliver(topup(1000, "pi_1", T0_MS + 60_000))
    await env.configure("200", T1_MS)
    charge = {
        "id": "ch_1",
        "object": "charge",
        "customer": "cus_ACME",
        "payment_intent": "pi_1",
        "amount_refunded": 250,
        "currency": "usd",
        "created": (T0_MS + 60_000) // 1000,
    }
    await env.deliver(make_event("charge.refunded", charge))  # fmt: skip
    assert await env.balance() == (1000 - 250) * CREDIT


async def test_without_a_rate_a_usd_payment_is_not_applied(env: Env) -> None:
    await env.configure(None, T0_MS)
    await env.deliver(topup(1000, "pi_1", T0_MS + 60_000))
    assert await env.balance() == 0
    [(reason, message)] = env.events
    assert reason == "StripeCurrencyMismatch"
    assert "has no exchange rate for USD" in message
