"""The Stripe webhook receiver and the leader's event processor, on a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from aiohttp.test_utils import TestClient, TestServer

from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.operator.stripe.access import GRACE_INDEX
from spendgate.operator.stripe.apply import Applier
from spendgate.operator.stripe.client import StripeGateway
from spendgate.operator.stripe.links import STRIPE_CUSTOMERS, StripeLinkConflict, link_budget
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.webhook import (
    DEAD_EVENTS_STREAM,
    EVENTS_STREAM,
    SEEN_PREFIX,
    create_webhook_app,
    process_pending,
    stream_lag_seconds,
)
from tests.support.redis_servers import RedisServer
from tests.support.stripe_fakes import (  # noqa: F401  (fixtures)
    API_KEY,
    WEBHOOK_SECRET,
    WEBHOOK_SECRET_NEXT,
    StripeDouble,
    make_event,
    paid_topup_session,
    sign,
    stripe_double,
)

SETTINGS = StripeSettings(enabled=True, claim_idle_ms=60_000)


def budget_manifest(customer: str = "acme", stripe_id: str = "cus_ACME", **policy: Any) -> Any:
    return parse_resource(
        {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": customer, "namespace": "default"},
            "spec": {
                "customerId": customer,
                "currency": "USD",
                "balance": "0",
                "stripe": {"customerId": stripe_id},
                "policy": policy,
            },
        }
    )


@dataclass
class Env:
    redis: Any
    ledger: Ledger
    store: ConfigStore
    client: TestClient
    events: list[tuple[str, str, str, bool]] = field(default_factory=list)

    async def configure(self, customer: str = "acme", stripe_id: str = "cus_ACME", **policy: Any):
        budget = budget_manifest(customer, stripe_id, **policy)
        await self.store.apply_budget(budget, {})
        return await link_budget(self.redis, budget.spec)

    async def post(self, event: dict[str, Any], secret: str = WEBHOOK_SECRET, **kw: Any) -> Any:
        body = json.dumps(event)
        return await self.client.post(
            "/stripe/webhook",
            data=body,
            headers={
                "Stripe-Signature": sign(body, secret, **kw),
                "Content-Type": "application/json",
            },
        )

    def on_event(self, customer: str, reason: str, message: str, warning: bool) -> None:
        self.events.append((customer, reason, message, warning))

    async def process(self, consumer: str = "op-0", **kw: Any) -> int:
        return await process_pending(
            self.redis,
            self.ledger,
            SETTINGS,
            consumer=consumer,
            on_event=self.on_event,
            block_ms=0,
            **kw,
        )

    async def deliver(self, event: dict[str, Any]) -> None:
        response = await self.post(event)
        assert response.status == 200, await response.text()
        await self.process()

    async def balance(self, customer: str = "acme") -> int:
        return (await self.ledger.account(customer)).balance

    async def suspensions(self, customer: str = "acme") -> dict[str, str]:
        return (await self.ledger.account(customer)).suspensions


@pytest_asyncio.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    client_redis = redis.asyncio.Redis.from_url(redis_url)
    ledger = Ledger(client_redis)
    app = create_webhook_app(client_redis, SETTINGS, [WEBHOOK_SECRET, WEBHOOK_SECRET_NEXT])
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    environment = Env(client_redis, ledger, ConfigStore(client_redis, ledger), client)
    await environment.configure()
    try:
        yield environment
    finally:
        await client.close()
        await client_redis.aclose()


def grant_event(grant_id: str = "credgr_1", value: int = 2500, **extra: Any) -> dict[str, Any]:
    obj = {
        "id": grant_id,
        "object": "billing.credit_grant",
        "customer": "cus_ACME",
        "amount": {"type": "monetary", "monetary": {"currency": "usd", "value": value}},
        "voided_at": None,
        "expires_at": None,
        **extra,
    }
    return make_event(f"billing.credit_grant.{'updated' if extra else 'created'}", obj)


def invoice_event(kind: str, created: int, status: str = "open") -> dict[str, Any]:
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_ACME", "status": status}
    return make_event(kind, invoice, created=created)


# --------------------------------------------------------------------------- receiving


async def test_accepted_event_is_recorded_before_the_response(env: Env) -> None:
    event = grant_event()
    response = await env.post(event)
    assert response.status == 200
    assert await response.json() == {"received": True, "duplicate": False}
    # Durable before the 2xx: the raw event is in the stream and its id is marked seen.
    entries = await env.redis.xrange(EVENTS_STREAM)
    assert len(entries) == 1 and entries[0][1][b"id"] == event["id"].encode()
    assert await env.redis.exists(SEEN_PREFIX + event["id"])
    assert await stream_lag_seconds(env.redis, SETTINGS) >= 0
    assert await env.balance() == 0  # not applied until the processor runs
    assert await env.process() == 1
    assert await env.balance() == 25_000_000
    assert await env.redis.xlen(EVENTS_STREAM) == 0  # acknowledged and removed
    assert await stream_lag_seconds(env.redis, SETTINGS) == 0
    assert any(reason == "StripeFunded" for _, reason, _, _ in env.events)


async def test_replays_have_one_effect(env: Env) -> None:
    event = grant_event()
    for _ in range(3):
        response = await env.post(event)
        assert response.status == 200
    assert (await response.json())["duplicate"] is True
    assert await env.redis.xlen(EVENTS_STREAM) == 1
    await env.process()
    # The same grant in another event (e.g. .updated), and the same event applied again
    # behind the receiver's back: funding is keyed by the grant id.
    await env.deliver(grant_event())
    await env.redis.xadd(
        EVENTS_STREAM, {"id": event["id"], "type": event["type"], "body": json.dumps(event)}
    )
    await env.process()
    assert await env.balance() == 25_000_000
    funds = [e for e in await env.ledger.ledger_entries("acme") if e["type"] == "fund"]
    assert len(funds) == 1


@pytest.mark.parametrize(
    "case", ["unsigned", "forged", "wrong-secret", "stale", "tampered", "not-json", "not-event"]
)
async def test_bad_requests_are_refused_without_side_effects(env: Env, case: str) -> None:
    event = grant_event()
    body = json.dumps(event)
    headers = {"Stripe-Signature": sign(body)}
    if case == "unsigned":
        headers = {}
    elif case == "forged":
        headers = {"Stripe-Signature": f"t={int(time.time())},v1={'0' * 64}"}
    elif case == "wrong-secret":
        headers = {"Stripe-Signature": sign(body, "whsec_someone_else")}
    elif case == "stale":
        headers = {"Stripe-Signature": sign(body, timestamp=int(time.time()) - 301)}
    elif case == "tampered":
        body = body.replace("2500", "250000")
    elif case == "not-json":
        body = "{not json"
        headers = {"Stripe-Signature": sign(body)}
    elif case == "not-event":
        body = json.dumps([1, 2, 3])
        headers = {"Stripe-Signature": sign(body)}
    response = await env.client.post("/stripe/webhook", data=body, headers=headers)
    assert response.status == 400
    assert await env.redis.xlen(EVENTS_STREAM) == 0
    assert not await env.redis.keys(SEEN_PREFIX + "*")
    await env.process()
    assert await env.balance() == 0


async def test_rotation_accepts_both_secrets_and_oversized_is_413(env: Env) -> None:
    assert (await env.post(grant_event("credgr_a"), WEBHOOK_SECRET_NEXT)).status == 200
    assert (await env.post(grant_event("credgr_b"), WEBHOOK_SECRET)).status == 200
    big = grant_event("credgr_c", padding="x" * (SETTINGS.webhook_max_body_bytes + 10))
    assert (await env.post(big)).status == 413
    assert await env.redis.xlen(EVENTS_STREAM) == 2


async def test_unhandled_event_types_are_acknowledged_but_not_recorded(env: Env) -> None:
    response = await env.post(make_event("product.created", {"id": "prod_1"}))
    assert response.status == 200 and (await response.json())["ignored"] is True
    assert await env.redis.xlen(EVENTS_STREAM) == 0


async def test_redis_down_answers_503_so_stripe_retries(fresh_redis_server: RedisServer) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client_redis = redis.asyncio.Redis.from_url(
        fresh_redis_server.url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    app = create_webhook_app(client_redis, SETTINGS, [WEBHOOK_SECRET])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        fresh_redis_server.stop()
        body = json.dumps(grant_event())
        response = await client.post(
            "/stripe/webhook", data=body, headers={"Stripe-Signature": sign(body)}
        )
        assert response.status == 503
    await client_redis.aclose()


# --------------------------------------------------------------------------- processing


class Crash(BaseException):
    """The operator process dies (not an exception the processor may handle)."""


class CrashingApplier(Applier):
    def __init__(self, *args: Any, after_apply: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_apply = after_apply

    async def handle_event(self, event: Any) -> list[str]:
        if self.after_apply:
            await super().handle_event(event)
        raise Crash()


@pytest.mark.parametrize("after_apply", [False, True], ids=["before-apply", "before-ack"])
async def test_crash_between_receiving_and_applying_loses_nothing(
    env: Env, after_apply: bool
) -> None:
    assert (await env.post(grant_event())).status == 200
    crashing = CrashingApplier(env.redis, env.ledger, SETTINGS, after_apply=after_apply)
    with pytest.raises(Crash):
        await process_pending(
            env.redis, env.ledger, SETTINGS, consumer="op-dead", applier=crashing, block_ms=0
        )
    pending = await env.redis.xpending(EVENTS_STREAM, SETTINGS.consumer_group)
    assert pending["pending"] == 1  # delivered to the dead consumer, never acknowledged
    # Another replica becomes leader: a young pending entry is left alone ...
    assert await env.process(consumer="op-new") == 0
    # ... one idle past claim_idle_ms is claimed (XAUTOCLAIM) and applied exactly once.
    assert await env.process(consumer="op-new", claim_idle_ms=0) == 1
    assert await env.balance() == 25_000_000
    assert (await env.redis.xpending(EVENTS_STREAM, SETTINGS.consumer_group))["pending"] == 0
    assert await env.process(consumer="op-new", claim_idle_ms=0) == 0
    assert await env.balance() == 25_000_000


async def test_a_poison_event_is_dead_lettered_and_does_not_block(env: Env) -> None:
    await env.redis.xadd(EVENTS_STREAM, {"id": "evt_bad", "type": "x", "body": "{oops"})
    assert (await env.post(grant_event())).status == 200
    assert await env.process() == 2
    assert await env.balance() == 25_000_000
    assert await env.redis.xlen(DEAD_EVENTS_STREAM) == 1


async def test_out_of_order_a_late_failure_never_undoes_a_newer_payment(env: Env) -> None:
    await env.deliver(invoice_event("invoice.paid", created=200, status="paid"))
    await env.deliver(invoice_event("invoice.payment_failed", created=100))
    assert await env.suspensions() == {}
    await env.deliver(invoice_event("invoice.payment_failed", created=300))
    assert "payment" in await env.suspensions()
    await env.deliver(invoice_event("invoice.paid", created=250, status="paid"))  # older: ignored
    assert "payment" in await env.suspensions()
    await env.deliver(invoice_event("invoice.paid", created=400, status="paid"))
    assert await env.suspensions() == {}
    reasons = [reason for _, reason, _, _ in env.events]
    assert reasons.count("Suspended") == 1 and reasons.count("Resumed") == 1


async def test_grace_period_suspends_when_it_runs_out_unless_paid(env: Env) -> None:
    await env.configure(onPaymentFailure={"action": "grace", "gracePeriod": "1h"})
    now = int(time.time())
    await env.deliver(invoice_event("invoice.payment_failed", created=now))
    assert await env.suspensions() == {}
    deadline = (now + 3600) * 1000
    assert await env.redis.zscore(GRACE_INDEX, "acme\tpayment") == deadline
    applier = Applier(env.redis, env.ledger, SETTINGS, on_event=env.on_event)
    assert await applier.apply_due_grace(now_ms=deadline - 1) == 0
    assert await applier.apply_due_grace(now_ms=deadline) == 1
    assert "payment" in await env.suspensions()
    # Paid: lifted; a second failure starts a new grace period, which a payment then cancels.
    await env.deliver(invoice_event("invoice.paid", created=now + 4000, status="paid"))
    await env.deliver(invoice_event("invoice.payment_failed", created=now + 5000))
    await env.deliver(invoice_event("invoice.paid", created=now + 5001, status="paid"))
    assert await applier.apply_due_grace(now_ms=(now + 99_999) * 1000) == 0
    assert await env.suspensions() == {}
    assert await env.redis.zcard(GRACE_INDEX) == 0


async def test_alert_policy_only_tells(env: Env) -> None:
    await env.configure(onPaymentFailure={"action": "alert"})
    await env.deliver(invoice_event("invoice.payment_failed", created=100))
    assert await env.suspensions() == {}
    assert ("acme", "StripePaymentFailed") in [(c, r) for c, r, _, _ in env.events]


def topup(pid: str = "pi_1", amount: int = 1000) -> dict[str, Any]:
    return make_event(
        "payment_intent.succeeded",
        {
            "id": pid,
            "object": "payment_intent",
            "customer": "cus_ACME",
            "amount": amount,
            "amount_received": amount,
            "currency": "usd",
            "metadata": {"spendgate_topup": "true"},
        },
    )


async def test_topup_from_checkout_and_payment_intent_is_counted_once(env: Env) -> None:
    session = paid_topup_session()
    await env.deliver(make_event("checkout.session.completed", session))
    await env.deliver(topup())
    assert await env.balance() == 10_000_000


async def test_refunds_take_back_the_refunded_amount_once(env: Env) -> None:
    await env.deliver(topup())

    def refunded(total: int, pi: str = "pi_1", charge: str = "ch_1") -> dict[str, Any]:
        obj = {
            "id": charge,
            "object": "charge",
            "customer": "cus_ACME",
            "payment_intent": pi,
            "amount_refunded": total,
            "currency": "usd",
        }
        return make_event("charge.refunded", obj)

    await env.deliver(refunded(400))
    await env.deliver(refunded(400))  # a second event with the same total
    assert await env.balance() == 6_000_000
    await env.deliver(refunded(1000))
    assert await env.balance() == 0
    await env.deliver(refunded(500, pi="pi_invoice", charge="ch_2"))  # not a top-up: no effect
    assert await env.balance() == 0


async def test_dispute_takes_the_money_and_suspends_until_won(env: Env) -> None:
    await env.deliver(topup())
    dispute = {
        "id": "du_1",
        "object": "dispute",
        "customer": "cus_ACME",
        "charge": "ch_1",
        "payment_intent": "pi_1",
        "amount": 1000,
        "currency": "usd",
        "reason": "fraudulent",
    }
    await env.deliver(make_event("charge.dispute.created", dispute, created=10))
    await env.deliver(make_event("charge.dispute.created", dispute, created=10))  # replay
    assert await env.balance() == 0
    assert "dispute" in await env.suspensions()
    await env.deliver(make_event("charge.dispute.closed", {**dispute, "status": "won"}, created=20))
    assert await env.balance() == 10_000_000
    assert await env.suspensions() == {}


async def test_money_taken_back_applies_even_below_zero(env: Env) -> None:
    """A dispute of a top-up already spent: the money is gone, so the balance goes negative
    (Ledger.adjust refuses that by default; the Stripe path allows it explicitly)."""
    await env.deliver(topup())
    await env.ledger.settle("acme", "r1", 4_000_000)
    dispute = {"id": "du_2", "object": "dispute", "customer": "cus_ACME", "charge": "ch_1"}
    dispute |= {"payment_intent": "pi_1", "amount": 1000, "currency": "usd"}
    await env.deliver(make_event("charge.dispute.created", dispute, created=10))
    assert await env.balance() == -4_000_000


async def test_voided_grant_reverses_the_full_amount_without_stripe(env: Env) -> None:
    await env.deliver(grant_event())
    await env.deliver(grant_event(voided_at=int(time.time())))
    await env.deliver(grant_event(voided_at=int(time.time())))  # again: nothing more
    assert await env.balance() == 0
    # A grant voided before it was ever funded: nothing now, nothing later.
    await env.deliver(grant_event("credgr_2", voided_at=int(time.time())))
    await env.deliver(grant_event("credgr_2", voided_at=int(time.time())))
    await env.deliver(grant_event("credgr_2"))
    assert await env.balance() == 0


async def test_voided_grant_reverses_what_stripe_says_is_left(
    env: Env,
    stripe_double: StripeDouble,  # noqa: F811
) -> None:
    stripe_double.add_grant("cus_ACME", 2500, grant_id="credgr_1", remaining=300)
    gateway = StripeGateway.create(API_KEY, StripeSettings(api_base=stripe_double.url))
    await env.deliver(grant_event())
    await env.post(grant_event(voided_at=int(time.time())))
    await process_pending(
        env.redis, env.ledger, SETTINGS, consumer="op", gateway=gateway, block_ms=0
    )
    assert await env.balance() == 25_000_000 - 3_000_000
    await gateway.close()


async def test_customer_deleted_suspends_and_keeps_the_ledger(env: Env) -> None:
    await env.deliver(grant_event())
    await env.deliver(make_event("customer.deleted", {"id": "cus_ACME", "object": "customer"}))
    account = await env.ledger.account("acme")
    assert "stripe-deleted" in account.suspensions
    assert account.balance == 25_000_000 and account.configured
    assert await env.ledger.ledger_entries("acme")


async def test_events_of_unlinked_customers_are_acknowledged(env: Env) -> None:
    event = grant_event()
    event["data"]["object"]["customer"] = "cus_SOMEONE"
    await env.deliver(event)
    assert await env.redis.xlen(EVENTS_STREAM) == 0
    assert await env.balance() == 0


async def test_link_budget_refuses_a_second_claim_and_follows_relinks(env: Env) -> None:
    with pytest.raises(StripeLinkConflict):
        await env.configure("other", "cus_ACME")
    await env.deliver(make_event("customer.deleted", {"id": "cus_ACME", "object": "customer"}))
    await env.configure("acme", "cus_NEW")  # re-linked: the old deletion no longer applies
    assert await env.redis.hget(STRIPE_CUSTOMERS, "cus_NEW") == b"acme"
    assert await env.redis.hget(STRIPE_CUSTOMERS, "cus_ACME") is None
    assert await env.suspensions() == {}
    assert await env.redis.hexists(for_customer("acme").suspensions, "stripe-deleted") == 0
