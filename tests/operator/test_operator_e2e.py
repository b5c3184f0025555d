"""The operator end to end: kopf running in the test's event loop against an in-memory
Kubernetes API (tests/support/kube_emulator.py, on kmock) and a real Redis.

Each test starts its own operator (the leader of its Lease) and drives it like a user with
kubectl would: create, edit and delete objects, then wait for Redis, status and Events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web
from redis.backoff import NoBackoff
from redis.retry import Retry

from spendgate.config_store import ConfigStore
from spendgate.keys import hash_api_key
from spendgate.ledger import Outcome
from spendgate.money import parse_amount
from spendgate.operator.kube import conditions as cond
from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.kube_emulator import (
    API_CALLS,
    Kubectl,
    KubeEmulator,
    rbac_rules,
    started_emulator,
)
from tests.support.operator_runs import operator_on_emulator
from tests.support.redis_servers import RedisServer

NS = "default"
BUDGETS = "spendgate.dev/v1alpha1/customerbudgets"
PRICEBOOKS = "spendgate.dev/v1alpha1/pricebooks"
SECRETS = "v1/secrets"
KEY = "sk-e2e-acme-0123456789abcdef"
KEY2 = "sk-e2e-acme-rotated-fedcba9876543210"

pytestmark = pytest.mark.timeout(30)


def budget(name: str = "acme", customer: str = "acme", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "customerId": customer,
            "currency": "USD",
            "balance": "100.00",
            "apiKeys": [{"name": "main", "secretRef": {"name": f"{name}-keys"}}],
            **spec,
        },
    }


def secret(name: str = "acme-keys", value: str = KEY) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "stringData": {"api-key": value},
    }


def pricebook(name: str = "gpu", currency: str = "USD", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "PriceBook",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "currency": currency,
            "rules": [{"name": "chat", "price": {"flat": "0.01"}}],
            **spec,
        },
    }


@dataclass
class AlertInbox:
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(text="ok")


@dataclass
class Env:
    kubectl: Kubectl
    emulator: KubeEmulator
    store: ConfigStore
    alerts: AlertInbox

    def budget(self, name: str = "acme") -> dict[str, Any] | None:
        return self.kubectl.get(BUDGETS, NS, name)

    def status(self, name: str = "acme") -> dict[str, Any]:
        obj = self.budget(name)
        return dict((obj or {}).get("status") or {})

    def ready(self, name: str = "acme", kind: str = BUDGETS) -> dict[str, Any] | None:
        obj = self.kubectl.get(kind, NS, name) or {}
        found = cond.find((obj.get("status") or {}).get("conditions"), "Ready")
        return dict(found) if found is not None else None

    def event_reasons(self, name: str = "acme") -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.kubectl.events(NS, name)]

    async def wait(self, predicate: Any, what: str, within: float = 30.0) -> Any:
        return await self.kubectl.wait_for(predicate, within=within, what=what)


@contextlib.asynccontextmanager
async def alert_inbox() -> AsyncIterator[AlertInbox]:
    inbox = AlertInbox()
    app = web.Application()
    app.router.add_post("/hook", inbox.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    inbox.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield inbox
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_operator(
    redis_url: str, *, before: Any = None, **overrides: Any
) -> AsyncIterator[Env]:
    """The operator on the emulator; ``overrides`` of its settings, ``before(kubectl)`` runs
    before it starts (objects it must find at startup, like the Stripe Secret)."""
    client = redis.asyncio.Redis.from_url(
        redis_url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    async with started_emulator() as (emulator, url), alert_inbox() as inbox:
        kubectl = Kubectl(emulator)
        await kubectl.create("v1/namespaces", {"metadata": {"name": NS}})
        if before is not None:
            await before(kubectl)
        settings = OperatorSettings(
            **{
                "redis_url": redis_url,
                "status_interval_s": 0.5,
                "retry_delay_s": 0.3,
                "reconcile_timeout_s": 5.0,
                "kube_timeout_s": 3.0,
                "alert_webhook_url": inbox.url,
                "pod_name": "operator-test-0",
                **overrides,
            }
        )
        async with operator_on_emulator(settings, client, url):
            yield Env(kubectl, emulator, ConfigStore(client), inbox)


# The operator runs inside each test's own task, not in a fixture: kopf cancels, at exit, the
# tasks created after it started, and pytest-asyncio runs fixture teardowns in new tasks.


# --------------------------------------------------------------------------- scenarios


async def test_created_budget_is_configured_with_status_and_events(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)


async def created_budget(env: Env) -> None:
    await env.kubectl.create(SECRETS, secret())
    await env.kubectl.create(BUDGETS, budget())
    await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready=True")
    assert await env.store.owner_of("acme") == f"{NS}/acme"
    owner = await env.store.lookup_key(hash_api_key(KEY))
    assert owner is not None and owner.customer_id == "acme"
    status = env.status()
    assert status["state"] == "Active" and status["balance"] == "100.00"
    assert status["observedGeneration"] == 1
    obj = env.budget()
    assert obj is not None and "spendgate.dev/finalizer" in obj["metadata"]["finalizers"]
    await env.wait(
        lambda: {("Normal", "Configured"), ("Normal", "StateChanged")} <= set(env.event_reasons()),
        "Configured and StateChanged events",
    )
    event = env.kubectl.events(NS, "acme")[0]
    assert event["involvedObject"]["kind"] == "CustomerBudget"
    assert event["reportingComponent"] == "spendgate-operator"
    assert event["action"] == "Reconcile"  # what the operator did, not kopf's "Action?"
    # kopf's own bookkeeping lives under spendgate.dev/, never under kopf.zalando.org/. The
    # status is written during the handler, kopf's annotations just after it.
    obj = await env.wait(
        lambda: (
            "spendgate.dev/last-handled-configuration"
            in ((env.budget() or {}).get("metadata", {}).get("annotations") or {})
            and env.budget()
        ),
        "kopf's annotations",
    )
    annotations = obj["metadata"].get("annotations") or {}
    assert not [a for a in annotations if a.startswith("kopf.zalando.org")]
    assert "kopf" not in (obj.get("status") or {})


async def test_spec_change_updates_redis(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        await env.kubectl.patch(
            BUDGETS,
            NS,
            "acme",
            {"spec": {"balance": "150.00", "rateLimits": [{"requests": 42, "per": "minute"}]}},
        )

        async def applied() -> bool:
            account = await env.store.ledger.account("acme")
            cfg = await env.store.redis.hget("sg:{acme}:cfg", "rl")
            return account.balance == parse_amount("150.00") and b'"amount": 42' in cfg

        await env.wait(applied, "balance and rate limit in Redis")
        await env.wait(lambda: env.status().get("observedGeneration") == 2, "observedGeneration 2")
        assert env.status()["balance"] == "150.00"
        await env.wait(
            lambda: any("balance +50.00" in e["message"] for e in env.kubectl.events(NS, "acme")),
            "a Configured event naming the change",
        )


async def test_rotated_secret_takes_effect_in_seconds(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await env.kubectl.patch(SECRETS, NS, "acme-keys", {"stringData": {"api-key": KEY2}})

        async def rotated() -> bool:
            old = await env.store.lookup_key(hash_api_key(KEY))
            new = await env.store.lookup_key(hash_api_key(KEY2))
            return old is None and new is not None and new.customer_id == "acme"

        await env.wait(rotated, "the new key in, the old key out", within=5)
        assert loop.time() - started < 3  # the status timer (0.5 s here) is not what did it
        annotations = env.budget()["metadata"]["annotations"]  # type: ignore[index]
        assert annotations["refresh.spendgate.dev/trigger"].startswith("Secret/acme-keys@")

        # Deleting the Secret revokes its key at once (fail closed) and says why.
        await env.kubectl.delete(SECRETS, NS, "acme-keys")

        async def revoked() -> bool:
            return await env.store.lookup_key(hash_api_key(KEY2)) is None

        await env.wait(revoked, "the key revoked", within=5)
        await env.wait(
            lambda: (env.ready() or {}).get("reason") == "SecretMissing", "SecretMissing"
        )
        assert env.status()["state"] == "Active"  # the account itself is untouched


async def test_deleted_budget_is_revoked_and_released(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        await env.kubectl.delete(BUDGETS, NS, "acme")
        await env.wait(lambda: env.budget() is None, "the finalizer removed, the budget gone")
        assert await env.store.lookup_key(hash_api_key(KEY)) is None
        assert await env.store.owner_of("acme") is None
        account = await env.store.ledger.account("acme")
        assert "deleted" in account.suspensions
        assert account.balance == parse_amount("100.00")  # the account itself is kept
        revoked = [e for e in env.kubectl.events(NS, "acme") if e["reason"] == "Revoked"]
        assert revoked and "1 API key revoked" in revoked[0]["message"]


async def test_budget_deleted_during_a_status_refresh_is_released_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf keeps the finalizer until the status timer has exited. A refresh in progress when
    the budget is deleted is abandoned, and kopf looks again within a second, not a minute."""
    from spendgate.operator.budgets import reconcile as budgets

    refreshing = asyncio.Event()
    original = budgets.refresh_budget

    async def slow_refresh(*args: Any, **kwargs: Any) -> Any:
        refreshing.set()
        await asyncio.sleep(120)  # a Redis or API call that hangs
        return await original(*args, **kwargs)

    async with running_operator(redis_url, reconcile_timeout_s=300.0) as env:
        await created_budget(env)
        monkeypatch.setattr(budgets, "refresh_budget", slow_refresh)
        await asyncio.wait_for(refreshing.wait(), 10)
        await env.kubectl.delete(BUDGETS, NS, "acme")
        await env.wait(lambda: env.budget() is None, "the budget gone", within=8)
        assert await env.store.lookup_key(hash_api_key(KEY)) is None


async def test_budget_deleted_while_requests_are_in_flight(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        ledger = env.store.ledger
        held = await ledger.reserve(
            "acme",
            "inflight-1",
            parse_amount("2.00"),
            key_id="main",
            currency="USD",
            ttl_ms=60_000,
        )
        assert held.ok
        await env.kubectl.delete(BUDGETS, NS, "acme")
        await env.wait(lambda: env.budget() is None, "the budget gone")
        settled = await ledger.settle("acme", "inflight-1", parse_amount("1.25"), key_id="main")
        assert not settled.duplicate and settled.balance == parse_amount("98.75")
        entries = await ledger.ledger_entries("acme")
        assert [e["cost"] for e in entries if e.get("request_id") == "inflight-1"] == ["1250000"]
        refused = await ledger.reserve(
            "acme", "inflight-2", 1, key_id="main", currency="USD", ttl_ms=60_000
        )
        assert refused.outcome is Outcome.suspended


async def test_two_budgets_one_customer_id(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        await env.kubectl.create(SECRETS, secret("copy-keys", "sk-e2e-copy-0123456789abcdef"))
        await env.kubectl.create(BUDGETS, budget("copy", customer="acme"))
        await env.wait(
            lambda: (env.ready("copy") or {}).get("reason") == "CustomerIdConflict",
            "CustomerIdConflict",
        )
        condition = env.ready("copy")
        assert condition is not None and condition["status"] == "False"
        assert "already claimed by CustomerBudget default/acme" in condition["message"]
        assert env.status("copy")["state"] == "Misconfigured"
        await env.wait(
            lambda: ("Warning", "CustomerIdConflict") in env.event_reasons("copy"),
            "a Warning Event",
        )
        assert await env.store.owner_of("acme") == f"{NS}/acme"
        assert await env.store.lookup_key(hash_api_key("sk-e2e-copy-0123456789abcdef")) is None


async def test_missing_secret_then_created(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await env.kubectl.create(BUDGETS, budget())
        await env.wait(
            lambda: (env.ready() or {}).get("reason") == "SecretMissing", "SecretMissing"
        )
        assert "Secret default/acme-keys not found" in env.ready()["message"]  # type: ignore[index]
        await env.wait(
            lambda: ("Warning", "SecretMissing") in env.event_reasons(), "a Warning Event"
        )
        await env.kubectl.create(SECRETS, secret())
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready once it exists")
        assert await env.store.lookup_key(hash_api_key(KEY)) is not None


async def test_redis_unavailable_is_retried_and_recovers(fresh_redis_server: RedisServer) -> None:
    async with running_operator(fresh_redis_server.url) as env:
        await created_budget(env)
        fresh_redis_server.stop()
        await env.kubectl.patch(BUDGETS, NS, "acme", {"spec": {"balance": "120.00"}})
        await env.wait(
            lambda: (env.ready() or {}).get("reason") == "RedisUnavailable",
            "Ready=Unknown RedisUnavailable",
        )
        assert env.ready()["status"] == "Unknown"  # type: ignore[index]
        await env.wait(
            lambda: ("Warning", "RedisUnavailable") in env.event_reasons(), "a Warning Event"
        )
        fresh_redis_server.start()  # back, empty: the operator re-applies everything
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready again")

        async def configured() -> bool:
            return await env.store.owner_of("acme") == f"{NS}/acme"

        await env.wait(configured, "the customer configured again")
        assert (await env.store.lookup_key(hash_api_key(KEY))) is not None
        assert (await env.store.ledger.account("acme")).balance == parse_amount("120.00")
        assert env.status()["observedGeneration"] == 2


async def test_threshold_crossing_alerts_once(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await created_budget(env)
        await env.store.ledger.settle("acme", "big-1", parse_amount("85.00"), key_id="main")
        await env.wait(lambda: env.status().get("alertedThreshold") == 80, "alerted 80%")
        await env.wait(lambda: env.alerts.received, "the webhook got the alert")
        [alert] = env.alerts.received
        assert alert["spendgate"]["kind"] == "ThresholdCrossed"
        assert alert["spendgate"]["threshold"] == 80 and "crossed 80%" in alert["text"]
        assert ("Warning", "ThresholdCrossed") in env.event_reasons()
        await asyncio.sleep(1.2)  # two more status refreshes
        assert len(env.alerts.received) == 1
        assert env.event_reasons().count(("Warning", "ThresholdCrossed")) == 1
        assert env.status()["balance"] == "15.00"


async def test_pricebooks(redis_url: str) -> None:
    async with running_operator(redis_url) as env:
        await env.kubectl.create(PRICEBOOKS, pricebook("gpu"))
        await env.kubectl.create(PRICEBOOKS, pricebook("euro", currency="EUR"))
        bad = pricebook("bad", rules=[{"name": "t", "price": {"perSecond": "0.01"}}])
        await env.kubectl.create(PRICEBOOKS, bad)

        async def configured() -> bool:
            return await env.store.list_pricebooks() == ["default/euro", "default/gpu"]

        await env.wait(configured, "both valid PriceBooks in Redis")
        await env.wait(
            lambda: (env.ready("bad", PRICEBOOKS) or {}).get("reason") == "InvalidSpec",
            "the invalid one reported",
        )
        assert "maximum" in env.ready("bad", PRICEBOOKS)["message"]  # type: ignore[index]

        await env.kubectl.create(SECRETS, secret())
        await env.kubectl.create(BUDGETS, budget(priceBooks=["gpu", "euro"]))
        await env.wait(
            lambda: (env.ready() or {}).get("reason") == "CurrencyMismatch", "CurrencyMismatch"
        )
        await env.kubectl.patch(BUDGETS, NS, "acme", {"spec": {"priceBooks": ["gpu"]}})
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready")

        # The PriceBook changes currency: the budget using it is told at once.
        await env.kubectl.patch(PRICEBOOKS, NS, "gpu", {"spec": {"currency": "EUR"}})
        await env.wait(
            lambda: (env.ready() or {}).get("reason") == "CurrencyMismatch", "CurrencyMismatch"
        )
        await env.kubectl.patch(PRICEBOOKS, NS, "gpu", {"spec": {"currency": "USD"}})
        await env.wait(lambda: (env.ready() or {}).get("status") == "True", "Ready again")

        await env.kubectl.delete(PRICEBOOKS, NS, "gpu")
        await env.wait(lambda: env.kubectl.get(PRICEBOOKS, NS, "gpu") is None, "gpu deleted")
        assert await env.store.get_pricebook("default/gpu") is None
        await env.wait(  # the budget using it is told at once, not at the next resync
            lambda: (env.ready() or {}).get("reason") == "PriceBookMissing", "PriceBookMissing"
        )


async def test_api_calls_are_recorded_for_rbac(redis_url: str) -> None:
    before = len(API_CALLS)
    async with running_operator(redis_url) as env:
        await created_budget(env)
        await env.kubectl.delete(BUDGETS, NS, "acme")
        await env.wait(lambda: env.budget() is None, "the budget gone")
    calls = API_CALLS[before:]
    assert calls and all(not c.user_agent.startswith("kmock/") for c in calls)
    rules = set(rbac_rules(calls))
    for rule in [
        ("spendgate.dev", "customerbudgets", "list"),
        ("spendgate.dev", "customerbudgets", "watch"),
        ("spendgate.dev", "customerbudgets", "patch"),
        ("spendgate.dev", "customerbudgets/status", "patch"),
        ("", "secrets", "list"),
        ("", "secrets", "watch"),
        ("", "secrets", "get"),
        ("", "events", "create"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ]:
        assert rule in rules, rule
    # Nothing the chart would not expect: no writes to Secrets, no deletes at all.
    assert not [r for r in rules if r[1] == "secrets" and r[2] not in ("get", "list", "watch")]
    assert not [r for r in rules if r[2] in ("delete", "deletecollection", "update")]
