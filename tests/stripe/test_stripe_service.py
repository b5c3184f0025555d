"""Settings, secrets and the wiring the operator starts (StripeIntegration)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from spendgate.ledger import Ledger, Usage
from spendgate.operator.stripe.client import (
    StripeGateway,
    StripeNotConfigured,
    load_api_key,
    load_webhook_secrets,
)
from spendgate.operator.stripe.service import StripeIntegration
from spendgate.operator.stripe.settings import SecretRef, StripeSettings
from tests.support.redis_servers import _free_ports
from tests.support.stripe_fakes import (  # noqa: F401  (fixtures)
    API_KEY,
    WEBHOOK_SECRET,
    StripeDouble,
    apply_linked_budget,
    make_event,
    sign,
    stripe_double,
    wait_for,
)


def secret_reader(values: dict[tuple[str, str], str]) -> Any:
    async def reader(name: str, key: str) -> str | None:
        return values.get((name, key))

    return reader


def test_settings_from_environment() -> None:
    settings = StripeSettings.from_env(
        {
            "SPENDGATE_STRIPE_ENABLED": "true",
            "SPENDGATE_STRIPE_WEBHOOK_PORT": "9000",
            "SPENDGATE_STRIPE_EXPORT_REQUESTS_PER_S": "12.5",
            "SPENDGATE_STRIPE_METER_EVENT_NAME": "gpu",
            "SPENDGATE_STRIPE_API_KEY_SECRET": "billing/key",
            "SPENDGATE_STRIPE_API_BASE": "http://127.0.0.1:1",
        }
    )
    assert settings.enabled and settings.webhook_port == 9000
    assert settings.export_requests_per_s == 12.5 and settings.meter_event_name == "gpu"
    assert settings.api_key_secret == SecretRef("billing", "key")
    assert settings.api_base == "http://127.0.0.1:1"
    with pytest.raises(ValueError):
        StripeSettings(meter_value_unit="dollars")


async def test_keys_and_secrets_come_from_secrets_or_the_environment() -> None:
    settings = StripeSettings()
    reader = secret_reader(
        {
            ("spendgate-stripe", "api-key"): "sk_from_secret\n",
            ("spendgate-stripe", "webhook-secret"): "whsec_a",
            ("spendgate-stripe", "webhook-secret-next"): "whsec_b",
        }
    )
    assert await load_api_key(settings, reader, env={}) == "sk_from_secret"
    assert await load_webhook_secrets(settings, reader, env={}) == ["whsec_a", "whsec_b"]
    empty = secret_reader({})
    env = {"STRIPE_API_KEY": "sk_env", "STRIPE_WEBHOOK_SECRET": "whsec_x, whsec_y"}
    assert await load_api_key(settings, empty, env=env) == "sk_env"
    assert await load_webhook_secrets(settings, empty, env=env) == ["whsec_x", "whsec_y"]
    with pytest.raises(StripeNotConfigured):
        await load_api_key(settings, empty, env={})
    with pytest.raises(StripeNotConfigured):
        await load_webhook_secrets(settings, None, env={})


async def test_the_api_key_is_never_logged(
    stripe_double: StripeDouble,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_key = "sk_test_do_not_log_me_123456"
    settings = StripeSettings(api_base=stripe_double.url, max_attempts=2, backoff_base_s=0.001)
    gateway = StripeGateway.create(secret_key, settings)
    stripe_double.fail("credit_grants", 500, 500)
    caplog.set_level(logging.DEBUG)
    client = gateway.client
    with pytest.raises(Exception):  # noqa: B017
        await gateway.call(
            lambda: client.v1.billing.credit_grants.list_async({"customer": "cus_1"})
        )
    await gateway.close()
    assert "retry 1/1" in caplog.text
    assert secret_key not in caplog.text and secret_key not in repr(gateway)
    assert stripe_double.requests[0].headers["Authorization"] == f"Bearer {secret_key}"


async def test_integration_runs_the_leader_tasks_and_stops_cleanly(
    redis_url: str,
    stripe_double: StripeDouble,  # noqa: F811
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    ledger = Ledger(client)
    await apply_linked_budget(client, ledger, "5")
    stripe_double.add_grant("cus_ACME", 700)  # found by reconciliation
    settings = StripeSettings(
        enabled=True,
        api_base=stripe_double.url,
        webhook_host="127.0.0.1",
        webhook_port=_free_ports(1)[0],
        reconcile_interval_s=0.2,
        export_interval_s=0.2,
        processor_block_ms=100,
        replay_events=False,
    )
    reader = secret_reader(
        {
            ("spendgate-stripe", "api-key"): API_KEY,
            ("spendgate-stripe", "webhook-secret"): WEBHOOK_SECRET,
        }
    )
    events: list[tuple[str, str]] = []
    integration = await StripeIntegration.create(
        client,
        ledger,
        settings,
        reader=reader,
        consumer="op-0",
        on_event=lambda cid, reason, message, warning: events.append((cid, reason)),
    )
    stripe_double.customers["cus_ACME"] = {"id": "cus_ACME", "object": "customer", "metadata": {}}
    await integration.start_webhook()
    stop = asyncio.Event()
    leader = asyncio.create_task(integration.run_leader(stop))
    try:
        await ledger.settle("acme", "req-1", 1_000_000, usage=Usage(model="m"))
        body = json.dumps(
            make_event(
                "invoice.payment_failed",
                {"id": "in_1", "object": "invoice", "customer": "cus_ACME", "status": "open"},
            )
        )
        url = f"http://127.0.0.1:{settings.webhook_port}{settings.webhook_path}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers={"Stripe-Signature": sign(body)}) as response,
        ):
            assert response.status == 200

        async def all_done() -> bool:
            account = await ledger.account("acme")
            return (
                "payment" in account.suspensions
                and account.balance == 5_000_000 - 1_000_000 + 7_000_000
                and "req-1" in stripe_double.meter_events
            )

        await wait_for(all_done, limit_s=5)
    finally:
        stop.set()
        await asyncio.wait_for(leader, timeout=5)
        await integration.close()
        await client.aclose()
    assert ("acme", "Suspended") in events and ("acme", "StripeFunded") in events
