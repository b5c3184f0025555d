"""From a Stripe webhook to the sidecar refusing: measured end to end on the real data plane."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from spendgate.models import parse_resource
from spendgate.operator.stripe.links import link_budget
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.webhook import create_webhook_app, run_processor
from tests.support.sidecar_env import ACME_KEY, DataPlane, budget, data_plane
from tests.support.stripe_fakes import WEBHOOK_SECRET, make_event, sign

SETTINGS = StripeSettings(enabled=True, processor_block_ms=500)


@asynccontextmanager
async def stripe_operator(plane: DataPlane, **spec: Any) -> AsyncIterator[TestClient]:
    """The acme budget linked to cus_ACME, the webhook receiver and the leader's processor."""
    resource = parse_resource(budget("acme", "10.00", stripe={"customerId": "cus_ACME"}, **spec))
    await plane.store.apply_budget(resource, {"main": ACME_KEY})  # type: ignore[arg-type]
    await link_budget(plane.redis, resource.spec)  # type: ignore[union-attr]
    receiver = TestClient(
        TestServer(create_webhook_app(plane.redis, SETTINGS, [WEBHOOK_SECRET]), host="127.0.0.1")
    )
    await receiver.start_server()
    stop = asyncio.Event()
    processor = asyncio.create_task(
        run_processor(plane.redis, plane.ledger, SETTINGS, consumer="op-0", stop=stop)
    )
    try:
        yield receiver
    finally:
        stop.set()
        await asyncio.wait_for(processor, timeout=5)
        await receiver.close()


async def send(receiver: TestClient, event: dict[str, Any]) -> None:
    body = json.dumps(event)
    response = await receiver.post(
        "/stripe/webhook", data=body, headers={"Stripe-Signature": sign(body)}
    )
    assert response.status == 200


async def status_within(plane: DataPlane, wanted: int, limit_s: float) -> tuple[float, Any]:
    started = time.monotonic()
    while True:
        # One output token: a request without max_tokens is given the rule's output limit
        # (4096 tokens here, 5.00), and two of those would spend the whole balance.
        response = await plane.post_chat(max_tokens=1)
        body = await response.json()
        if response.status == wanted:
            return time.monotonic() - started, body
        assert time.monotonic() - started < limit_s, f"still {response.status}: {body}"
        await asyncio.sleep(0.005)


async def test_payment_failure_to_sidecar_refusal_under_one_second(redis_url: str) -> None:
    async with data_plane(redis_url) as plane, stripe_operator(plane) as receiver:
        assert (await plane.post_chat()).status == 200
        invoice = {"id": "in_1", "object": "invoice", "customer": "cus_ACME", "status": "open"}
        started = time.monotonic()
        await send(receiver, make_event("invoice.payment_failed", invoice))
        elapsed, body = await status_within(plane, 403, limit_s=1.0)
        total = time.monotonic() - started
        assert total < 1.0, f"webhook to refusal took {total:.3f}s"
        print(f"webhook POST to sidecar 403: {total * 1000:.1f} ms")
        assert body["error"]["code"] == "account_suspended"
        # Paid: serving again, just as fast.
        paid = make_event(
            "invoice.paid", {**invoice, "status": "paid"}, created=int(time.time()) + 1
        )
        await send(receiver, paid)
        await status_within(plane, 200, limit_s=1.0)
        assert elapsed < 1.0


async def test_pending_payment_method_refuses_until_one_is_on_file(redis_url: str) -> None:
    async with (
        data_plane(redis_url) as plane,
        stripe_operator(plane, policy={"requirePaymentMethod": True}) as receiver,
    ):
        response = await plane.post_chat()
        assert response.status == 403
        assert (await plane.account()).suspensions == {
            "payment-method": "no payment method on file in Stripe yet"
        }
        pm = {"id": "pm_1", "object": "payment_method", "customer": "cus_ACME", "type": "card"}
        await send(receiver, make_event("payment_method.attached", pm))
        await status_within(plane, 200, limit_s=1.0)
