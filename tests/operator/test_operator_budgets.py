"""spendgate.operator.budgets.reconcile: reconciliation, status, state machine and alert thresholds,
against a real Redis and an in-memory Secret reader (no Kubernetes)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from spendgate.config_store import ConfigStore
from spendgate.keys import hash_api_key
from spendgate.ledger import Account, Outcome
from spendgate.models import BudgetState, CustomerBudget
from spendgate.money import parse_amount
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.budgets.checks import parse_budget, pricebook_names, secret_names
from spendgate.operator.budgets.status import (
    Thresholds,
    account_conditions,
    budget_state,
    evaluate_thresholds,
)
from spendgate.operator.kube import conditions as cond
from spendgate.operator.kube.objects import EventSpec, status_patch
from spendgate.operator.kube.retry import KubernetesUnavailable, RedisUnavailable
from tests.support.redis_servers import RedisServer

KEY = "sk-test-acme-0123456789"
KEY2 = "sk-test-acme-rotated-9876543210"
OTHER_KEY = "sk-test-other-0123456789"
NS = "team-a"


def budget_body(
    name: str = "acme",
    *,
    generation: int = 1,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    full_spec: dict[str, Any] = {
        "customerId": "acme",
        "currency": "USD",
        "balance": "100.00",
        "apiKeys": [{"name": "main", "secretRef": {"name": "acme-keys"}}],
    }
    full_spec.update(spec)
    body: dict[str, Any] = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": name, "namespace": NS, "generation": generation, "uid": f"uid-{name}"},
        "spec": full_spec,
    }
    if status is not None:
        body["status"] = status
    return body


def next_body(body: dict[str, Any], result: b.Reconciled, **spec: Any) -> dict[str, Any]:
    """The body as the API server would hold it after the status patch (and a spec edit)."""
    new = copy.deepcopy(body)
    status = dict(new.get("status") or {})
    for key, value in result.patch(status).items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    new["status"] = status
    if spec:
        new["spec"].update(spec)
        new["metadata"]["generation"] += 1
    return new


def secret(name: str = "acme-keys", **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "stringData": data or {"api-key": KEY},
    }


class Secrets:
    """A SecretReader over a dict, counting reads."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
        self.reads = 0

    async def __call__(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return copy.deepcopy(self.objects.get((namespace, name)))


@pytest_asyncio.fixture
async def store(redis_client: redis.asyncio.Redis) -> ConfigStore:
    return ConfigStore(redis_client)


def ready(status: dict[str, Any]) -> dict[str, Any]:
    condition = cond.find(status["conditions"], "Ready")
    assert condition is not None
    return dict(condition)


def reasons(events: list[EventSpec]) -> list[str]:
    return [e.reason for e in events]


# --------------------------------------------------------------------------- happy path


async def test_new_budget_is_configured_and_reports_its_account(store: ConfigStore) -> None:
    body = budget_body()
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    assert result.error is None
    status = result.status
    assert ready(status)["status"] == "True" and ready(status)["reason"] == "Configured"
    assert ready(status)["observedGeneration"] == 1
    assert status["observedGeneration"] == 1
    assert status["state"] == "Active" and status["stateReasons"] == []
    assert (status["balance"], status["held"], status["available"]) == ("100.00", "0.00", "100.00")
    assert status["spentThisPeriod"] == "0.00" and status["currency"] == "USD"
    assert status["customerId"] == "acme" and status["activeKeys"] == 1
    assert status["periodStart"] is None
    assert cond.status_of(status["conditions"], "Funded") == "True"
    assert cond.status_of(status["conditions"], "Suspended") == "False"
    assert status["alertedThreshold"] == 0
    assert status["alertBaseline"] == {"balance": "100.00", "charged": "0.00"}
    assert reasons(result.events) == ["Configured", "StateChanged"]
    assert result.events[1].type == "Normal"
    assert result.alerts == []  # the first observation is no state change worth an alert
    owner = await store.lookup_key(hash_api_key(KEY))
    assert owner is not None and owner.customer_id == "acme"
    assert await store.owner_of("acme") == f"{NS}/acme"
    # No key material anywhere in what goes to Kubernetes.
    assert KEY not in repr(result)


async def test_reapplying_is_quiet_and_the_patch_empty(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    first = await b.reconcile_budget(body, store=store, read_secret=secrets)
    body = next_body(body, first)
    again = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert again.events == [] and again.alerts == []
    assert again.patch(body["status"]) == {}
    refreshed = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert refreshed.patch(body["status"]) == {}
    assert refreshed.events == []


async def test_spec_change_updates_redis(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body(rateLimits=[{"requests": 10, "per": "second"}])
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    body = next_body(
        body,
        b.Reconciled(status=body["status"]),
        balance="150.00",
        rateLimits=[{"requests": 99, "per": "minute"}],
    )
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert result.applied is not None and result.applied.balance_change == 50_000_000
    assert result.status["balance"] == "150.00"
    assert result.status["observedGeneration"] == 2
    configured = [e for e in result.events if e.reason == "Configured"]
    assert configured and "balance +50.00" in configured[0].message
    cfg = await store.redis.hgetall("sg:{acme}:cfg")
    assert b'"amount": 99' in cfg[b"rl"] and b"60000" in cfg[b"rl"]


async def test_rotated_key_replaces_the_old_hash(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    secrets.objects[(NS, "acme-keys")] = secret(**{"api-key": KEY2})
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert await store.lookup_key(hash_api_key(KEY)) is None
    assert (await store.lookup_key(hash_api_key(KEY2))) is not None
    assert any("1 key revoked" in e.message for e in result.events if e.reason == "Configured")


# --------------------------------------------------------------------------- failures


async def test_invalid_spec_names_every_field_and_applies_nothing(store: ConfigStore) -> None:
    body = budget_body(currency="dollars!", rateLimits=[{"requests": 5, "per": "fortnight"}])
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert "spec.rateLimits[0].per" in condition["message"]
    assert "spec.currency" in condition["message"]
    assert result.status["state"] == "Misconfigured"
    assert result.status["observedGeneration"] == 1
    assert [(e.type, e.reason) for e in result.events] == [
        ("Warning", "InvalidSpec"),
        ("Warning", "StateChanged"),
    ]
    assert await store.owner_of("acme") is None
    assert result.error is None  # not retried: only a new spec can fix it


async def test_invalid_spec_keeps_the_last_valid_configuration(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    body = next_body(body, b.Reconciled(status=body["status"]), balance="-5")
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert ready(result.status)["reason"] == "InvalidSpec"
    assert "spec.balance" in ready(result.status)["message"]
    assert await store.lookup_key(hash_api_key(KEY)) is not None
    assert (await store.ledger.account("acme")).balance == 100_000_000


async def test_missing_secret_revokes_that_key_and_applies_the_rest(store: ConfigStore) -> None:
    keys = [
        {"name": "main", "secretRef": {"name": "acme-keys"}},
        {"name": "ci", "secretRef": {"name": "ci-keys"}},
    ]
    secrets = Secrets(secret(), secret("ci-keys", **{"api-key": OTHER_KEY}))
    body = budget_body(apiKeys=keys)
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    assert await store.lookup_key(hash_api_key(OTHER_KEY)) is not None
    del secrets.objects[(NS, "ci-keys")]
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "SecretMissing")
    assert "spec.apiKeys[1].secretRef: Secret team-a/ci-keys not found" in condition["message"]
    assert await store.lookup_key(hash_api_key(OTHER_KEY)) is None  # fail closed
    assert await store.lookup_key(hash_api_key(KEY)) is not None
    assert result.status["state"] == "Active" and result.status["activeKeys"] == 1
    assert ("Warning", "SecretMissing") in [(e.type, e.reason) for e in result.events]


async def test_missing_data_key_in_a_secret(store: ConfigStore) -> None:
    body = budget_body(apiKeys=[{"name": "main", "secretRef": {"name": "acme-keys", "key": "k"}}])
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    assert ready(result.status)["reason"] == "SecretMissing"
    assert "has no key 'k'" in ready(result.status)["message"]


@pytest.mark.parametrize(
    ("value", "why"),
    [("short", "at least 16"), (KEY + "\n", "trailing newline"), ("", "is empty")],
)
async def test_unusable_key_material(store: ConfigStore, value: str, why: str) -> None:
    body = budget_body()
    result = await b.reconcile_budget(
        body, store=store, read_secret=Secrets(secret(**{"api-key": value}))
    )
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "SecretInvalid")
    assert why in condition["message"]
    assert value.strip() not in condition["message"] or not value.strip()
    assert await store.list_customers() == {"acme": f"{NS}/acme"}  # the rest is applied


async def test_bad_secret_object(store: ConfigStore) -> None:
    bad = secret()
    bad["type"] = "kubernetes.io/tls"
    result = await b.reconcile_budget(budget_body(), store=store, read_secret=Secrets(bad))
    assert ready(result.status)["reason"] == "SecretInvalid"
    assert "Opaque" in ready(result.status)["message"]


async def test_disabled_keys_need_no_secret(store: ConfigStore) -> None:
    body = budget_body(apiKeys=[{"name": "main", "secretRef": {"name": "gone"}, "disabled": True}])
    secrets = Secrets()
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert ready(result.status)["status"] == "True"
    assert secrets.reads == 0 and result.status["activeKeys"] == 0


async def test_customer_id_conflict(store: ConfigStore) -> None:
    secrets = Secrets(secret(), secret("other-keys", **{"api-key": OTHER_KEY}))
    first = budget_body()
    await b.reconcile_budget(first, store=store, read_secret=secrets)
    second = budget_body(
        "acme-copy", apiKeys=[{"name": "main", "secretRef": {"name": "other-keys"}}]
    )
    result = await b.reconcile_budget(second, store=store, read_secret=secrets)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "CustomerIdConflict")
    assert "claimed by CustomerBudget team-a/acme" in condition["message"]
    assert result.status["state"] == "Misconfigured"
    assert result.status["balance"] is None  # never another budget's money
    assert cond.find(result.status["conditions"], "Funded") is None
    assert ("Warning", "CustomerIdConflict") in [(e.type, e.reason) for e in result.events]
    assert await store.lookup_key(hash_api_key(OTHER_KEY)) is None
    assert await store.owner_of("acme") == f"{NS}/acme"

    # The owner goes away: the second budget can take the customer over.
    await b.finalize_budget(first, store=store)
    body = next_body(second, result)
    taken = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert ready(taken.status)["status"] == "True"
    assert await store.owner_of("acme") == f"{NS}/acme-copy"
    assert taken.status["state"] == "Active"  # the "deleted" suspension was lifted


async def test_api_key_used_by_another_customer(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    await b.reconcile_budget(budget_body(), store=store, read_secret=secrets)
    other = budget_body("other", customerId="other")
    result = await b.reconcile_budget(other, store=store, read_secret=secrets)
    assert ready(result.status)["reason"] == "ApiKeyConflict"
    assert await store.owner_of("other") is None


async def test_pricebooks_missing_and_in_another_currency(store: ConfigStore) -> None:
    from spendgate.models import parse_resource

    for name, currency in (("gpu", "USD"), ("euro", "EUR")):
        pricebook = parse_resource(
            {
                "apiVersion": "spendgate.dev/v1alpha1",
                "kind": "PriceBook",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"currency": currency, "rules": [{"name": "all", "price": {"flat": 1}}]},
            }
        )
        await store.apply_pricebook(pricebook)  # type: ignore[arg-type]
    body = budget_body(priceBooks=["gpu", "euro", "nope"])
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "PriceBookMissing")
    assert "spec.priceBooks[2]: PriceBook team-a/nope is not configured" in condition["message"]
    assert "spec.priceBooks[1]: PriceBook team-a/euro charges in EUR" in condition["message"]
    assert result.status["state"] == "Active"  # the budget itself is applied
    only_currency = budget_body(priceBooks=["gpu", "euro"])
    result = await b.reconcile_budget(only_currency, store=store, read_secret=Secrets(secret()))
    assert ready(result.status)["reason"] == "CurrencyMismatch"
    fine = budget_body(priceBooks=["gpu"])
    result = await b.reconcile_budget(fine, store=store, read_secret=Secrets(secret()))
    assert ready(result.status)["status"] == "True"


async def test_a_currency_no_pricebook_charges_in_is_a_condition(store: ConfigStore) -> None:
    """Without spec.priceBooks, some configured PriceBook must charge in the budget's currency:
    "usd" against "USD" PriceBooks answers every request 500 otherwise."""
    from spendgate.models import parse_resource

    secrets = Secrets(secret())
    body = budget_body(currency="usd")
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert ready(result.status)["status"] == "True"  # no PriceBook yet: nothing to compare
    pricebook = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "PriceBook",
        "metadata": {"name": "gpu", "namespace": NS},
        "spec": {"currency": "USD", "rules": [{"name": "all", "price": {"flat": 1}}]},
    }
    await store.apply_pricebook(parse_resource(pricebook))  # type: ignore[arg-type]
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("False", "CurrencyMismatch")
    assert condition["message"].startswith(
        "spec.currency: 'usd' is charged by no PriceBook (they charge in 'USD') -- did you mean"
        " 'USD'?"
    )
    fixed = budget_body(currency="USD")
    result = await b.reconcile_budget(fixed, store=store, read_secret=secrets)
    assert ready(result.status)["status"] == "True"


async def test_problems_order_the_reason_and_all_are_listed(store: ConfigStore) -> None:
    keys = [
        {"name": "main", "secretRef": {"name": "acme-keys"}},
        {"name": "gone", "secretRef": {"name": "gone"}},
    ]
    body = budget_body(apiKeys=keys, priceBooks=["missing"])
    result = await b.reconcile_budget(body, store=store, read_secret=Secrets(secret()))
    condition = ready(result.status)
    assert condition["reason"] == "SecretMissing"
    assert "Secret team-a/gone not found" in condition["message"]
    assert "PriceBook team-a/missing" in condition["message"]


async def test_kubernetes_api_trouble_is_retryable(store: ConfigStore) -> None:
    async def broken(namespace: str, name: str) -> dict[str, Any] | None:
        raise KubernetesUnavailable("GET secrets: HTTP 503")

    result = await b.reconcile_budget(budget_body(), store=store, read_secret=broken)
    assert isinstance(result.error, KubernetesUnavailable)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("Unknown", "KubernetesApiUnavailable")
    assert await store.owner_of("acme") is None  # nothing half-applied


@pytest_asyncio.fixture
async def dying_store(fresh_redis_server: RedisServer) -> AsyncIterator[ConfigStore]:
    client = redis.asyncio.Redis.from_url(
        fresh_redis_server.url,
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    yield ConfigStore(client)
    await client.aclose()


async def test_redis_unavailable(dying_store: ConfigStore, fresh_redis_server: RedisServer) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    body = next_body(body, await b.reconcile_budget(body, store=dying_store, read_secret=secrets))
    fresh_redis_server.stop()
    result = await b.reconcile_budget(body, store=dying_store, read_secret=secrets)
    assert isinstance(result.error, RedisUnavailable)
    condition = ready(result.status)
    assert (condition["status"], condition["reason"]) == ("Unknown", "RedisUnavailable")
    assert ("Warning", "RedisUnavailable") in [(e.type, e.reason) for e in result.events]
    # The rest of the status (the last known account) is left alone.
    patch = result.patch(body["status"])
    assert set(patch) == {"conditions"}
    refreshed = await b.refresh_budget(body, store=dying_store, read_secret=secrets)
    assert isinstance(refreshed.error, RedisUnavailable)
    with pytest.raises(RedisUnavailable):
        await b.finalize_budget(body, store=dying_store)

    fresh_redis_server.start()  # back, and empty: the config is applied again
    body = next_body(body, result)
    recovered = await b.refresh_budget(body, store=dying_store, read_secret=secrets)
    assert recovered.error is None
    assert ready(recovered.status)["status"] == "True"
    assert ("Normal", "Configured") in [(e.type, e.reason) for e in recovered.events]
    assert await dying_store.lookup_key(hash_api_key(KEY)) is not None


async def test_refresh_reapplies_when_redis_lost_the_customer(
    store: ConfigStore, redis_client: redis.asyncio.Redis
) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    reads = secrets.reads
    await b.refresh_budget(body, store=store, read_secret=secrets)
    assert secrets.reads == reads  # a healthy refresh reads Redis only
    await redis_client.flushall()
    result = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert secrets.reads == reads + 1
    assert await store.lookup_key(hash_api_key(KEY)) is not None
    assert result.status["balance"] == "100.00"


# --------------------------------------------------------------------------- deletion


async def test_finalize_revokes_and_freezes_but_keeps_the_ledger(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    await b.reconcile_budget(body, store=store, read_secret=secrets)
    ledger = store.ledger
    held = await ledger.reserve(
        "acme", "req-1", 1_000_000, key_id="main", currency="USD", ttl_ms=60_000
    )
    assert held.ok
    events = await b.finalize_budget(body, store=store)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Revoked")]
    assert "1 API key revoked" in events[0].message
    assert await store.lookup_key(hash_api_key(KEY)) is None
    assert await store.owner_of("acme") is None
    # The request in flight still settles and is recorded; new requests are refused.
    settled = await ledger.settle("acme", "req-1", 400_000, key_id="main")
    assert not settled.duplicate and settled.balance == 99_600_000
    entries = await ledger.ledger_entries("acme")
    assert any(e.get("request_id") == "req-1" and e.get("cost") == "400000" for e in entries)
    refused = await ledger.reserve("acme", "req-2", 1, key_id="main", currency="USD", ttl_ms=60_000)
    assert refused.outcome is Outcome.suspended and "deleted" in refused.detail


async def test_finalize_of_a_budget_that_owns_nothing(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    await b.reconcile_budget(budget_body(), store=store, read_secret=secrets)
    loser = budget_body("acme-copy")
    events = await b.finalize_budget(loser, store=store)
    assert "nothing to revoke" in events[0].message
    assert await store.lookup_key(hash_api_key(KEY)) is not None
    invalid = budget_body("x", customerId="not valid!")
    assert "nothing was configured" in (await b.finalize_budget(invalid, store=store))[0].message


# --------------------------------------------------------------------------- state machine


def account(**overrides: Any) -> Account:
    values: dict[str, Any] = {
        "customer_id": "acme",
        "configured": True,
        "currency": "USD",
        "mode": "prepaid",
        "limit": 0,
        "period": None,
        "balance": 100_000_000,
        "held": 0,
        "spent": 0,
        "period_start_ms": 0,
        "funded": 0,
        "charged": 0,
        "expired_holds": 0,
        "suspensions": {},
    }
    values.update(overrides)
    return Account(**values)


NOW_MS = int(datetime(2025, 3, 15, 12, tzinfo=UTC).timestamp() * 1000)
MARCH_MS = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp() * 1000)
FEB_MS = int(datetime(2025, 2, 1, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("acct", "state", "why"),
    [
        (account(), BudgetState.active, ""),
        (account(balance=0), BudgetState.exhausted, "no balance available"),
        (account(balance=5, held=5), BudgetState.exhausted, "no balance available"),
        (account(balance=-3), BudgetState.exhausted, "no balance available"),
        (
            account(limit=10, period="month", spent=10, period_start_ms=MARCH_MS),
            BudgetState.exhausted,
            "spend cap reached",
        ),
        (
            account(limit=10, period="month", spent=10, period_start_ms=FEB_MS),
            BudgetState.active,  # a new month began; Redis resets spent at the next request
            "",
        ),
        (
            account(
                mode="capped", limit=10, period="month", spent=9, held=5, period_start_ms=MARCH_MS
            ),
            BudgetState.active,  # capped: exhausted when spent reaches the cap
            "",
        ),
        (
            account(mode="capped", limit=10, period="month", spent=10, period_start_ms=MARCH_MS),
            BudgetState.exhausted,
            "spend cap reached",
        ),
        (account(suspensions={"spec": "suspended in the spec"}), BudgetState.suspended, "spec:"),
        (
            account(suspensions={"payment-method": "no card on file"}),
            BudgetState.pending_payment_method,
            "payment-method: no card on file",
        ),
        (
            account(suspensions={"payment-method": "no card", "payment": "declined"}),
            BudgetState.suspended,
            "payment: declined",
        ),
        (
            account(balance=0, suspensions={"dispute": "opened"}),
            BudgetState.suspended,  # suspension wins over exhaustion
            "dispute: opened",
        ),
    ],
)
def test_budget_state(acct: Account, state: BudgetState, why: str) -> None:
    found, reasons_ = budget_state(acct, NOW_MS)
    assert found is state
    assert why in "; ".join(reasons_)
    if not why:
        assert reasons_ == []


def test_condition_reasons_for_the_account() -> None:
    now = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    cases = [
        (account(balance=0), ("False", "BalanceExhausted"), ("False", "NotSuspended")),
        (
            account(mode="capped", limit=10, period="month", spent=10, period_start_ms=MARCH_MS),
            ("False", "SpendCapReached"),
            ("False", "NotSuspended"),
        ),
        (
            account(mode="capped", limit=10_000_000, period="month", period_start_ms=MARCH_MS),
            ("True", "WithinSpendCap"),
            ("False", "NotSuspended"),
        ),
        (
            account(suspensions={"spec": "x"}),
            ("True", "BalanceAvailable"),
            ("True", "SuspendedInSpec"),
        ),
        (
            account(suspensions={"payment-method": "x"}),
            ("True", "BalanceAvailable"),
            ("True", "PendingPaymentMethod"),
        ),
        (
            account(suspensions={"payment": "x", "dispute": "y"}),
            ("True", "BalanceAvailable"),
            ("True", "MultipleReasons"),
        ),
    ]
    for acct, funded, suspended in cases:
        state, why = budget_state(acct, NOW_MS)
        found = account_conditions(acct, state, why, 4, now)
        assert [(c["status"], c["reason"]) for c in found] == [funded, suspended]
        assert all(c["observedGeneration"] == 4 for c in found)


async def test_suspension_in_spec_and_payment_method(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body(policy={"suspended": True})
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert result.status["state"] == "Suspended"
    assert result.status["stateReasons"] == ["spec: suspended in the CustomerBudget spec"]
    assert cond.find(result.status["conditions"], "Suspended")["reason"] == "SuspendedInSpec"  # type: ignore[index]
    body = next_body(body, result, policy={"suspended": False, "requirePaymentMethod": True})
    await store.ledger.suspend("acme", "payment-method", "no payment method on file")
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert result.status["state"] == "PendingPaymentMethod"
    alerts = [a for a in result.alerts if a.kind == "StateChanged"]
    assert alerts and alerts[0].fields["state"] == "PendingPaymentMethod"
    body = next_body(body, result, policy={"requirePaymentMethod": False})
    result = await b.reconcile_budget(body, store=store, read_secret=secrets)
    assert result.status["state"] == "Active"  # the policy no longer asks for one


# --------------------------------------------------------------------------- thresholds


def prepaid(**policy: Any) -> CustomerBudget:
    return parse_budget(budget_body(policy=policy))


def capped() -> CustomerBudget:
    body = budget_body(mode="capped", limit="200.00", period="month")
    del body["spec"]["balance"]
    return parse_budget(body)


def test_prepaid_thresholds_count_from_the_last_top_up() -> None:
    budget = prepaid()
    status: dict[str, Any] = {}

    def observe(acct: Account) -> Thresholds:
        t = evaluate_thresholds(budget, acct, status, NOW_MS)
        status["alertedThreshold"] = t.alerted
        status["alertBaseline"] = t.baseline
        return t

    assert observe(account()).crossed is None
    assert status["alertBaseline"] == {"balance": "100.00", "charged": "0.00"}
    assert observe(account(balance=60_000_000, charged=40_000_000)).crossed is None
    t = observe(account(balance=45_000_000, charged=55_000_000))
    assert (t.crossed, t.alerted) == (50, 50)
    assert observe(account(balance=44_000_000, charged=56_000_000)).crossed is None  # once
    t = observe(account(balance=0, charged=100_000_000))
    assert (t.crossed, t.alerted) == (100, 100)  # 80 is skipped: one alert, the highest
    # A top-up of 100: a new baseline of what is left after it; alerts start over.
    t = observe(account(balance=100_000_000, charged=100_000_000, funded=100_000_000))
    assert (t.crossed, t.alerted) == (None, 0)
    assert status["alertBaseline"] == {"balance": "100.00", "charged": "100.00"}
    t = observe(account(balance=15_000_000, charged=185_000_000, funded=100_000_000))
    assert (t.crossed, t.used, t.base) == (80, 85_000_000, 100_000_000)


def test_an_unfunded_prepaid_budget_does_not_alert() -> None:
    t = evaluate_thresholds(prepaid(), account(balance=0), {}, NOW_MS)
    assert (t.crossed, t.alerted) == (None, 0)


def test_capped_thresholds_and_the_new_period() -> None:
    budget = capped()
    march = {
        "mode": "capped",
        "limit": 200_000_000,
        "period": "month",
        "period_start_ms": MARCH_MS,
        "balance": 0,
    }
    t = evaluate_thresholds(budget, account(**march, spent=170_000_000), {}, NOW_MS)
    assert (t.crossed, t.alerted, t.baseline) == (80, 80, None)
    status = {"alertedThreshold": 80}
    t = evaluate_thresholds(budget, account(**march, spent=180_000_000), status, NOW_MS)
    assert t.crossed is None and t.alerted == 80
    # The period rolled over: spent is 0 for the new month, the alert level resets.
    feb = dict(march, period_start_ms=FEB_MS)
    t = evaluate_thresholds(budget, account(**feb, spent=180_000_000), status, NOW_MS)
    assert (t.crossed, t.alerted) == (None, 0)


def test_custom_thresholds() -> None:
    budget = prepaid(alertThresholds=[10, 95])
    t = evaluate_thresholds(budget, account(), {}, NOW_MS)
    status = {"alertedThreshold": t.alerted, "alertBaseline": t.baseline}
    t = evaluate_thresholds(budget, account(balance=85_000_000, charged=15_000_000), status, NOW_MS)
    assert t.crossed == 10


async def test_threshold_events_and_alerts_through_reconcile(store: ConfigStore) -> None:
    secrets = Secrets(secret())
    body = budget_body()
    body = next_body(body, await b.reconcile_budget(body, store=store, read_secret=secrets))
    await store.ledger.settle("acme", "r1", parse_amount("85.00"), key_id="main")
    result = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "ThresholdCrossed")]
    assert "crossed 80% of its balance" in result.events[0].message
    assert [a.kind for a in result.alerts] == ["ThresholdCrossed"]
    payload = result.alerts[0].payload()
    assert payload["text"].startswith(":warning:")
    assert payload["spendgate"]["threshold"] == 80
    assert payload["spendgate"]["customerId"] == "acme"
    assert result.status["alertedThreshold"] == 80
    body = next_body(body, result)
    again = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert again.events == [] and again.alerts == []  # a restart or refresh never re-alerts

    await store.ledger.settle("acme", "r2", parse_amount("15.00"), key_id="main")
    result = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert result.status["state"] == "Exhausted"
    kinds = sorted((e.reason, e.type) for e in result.events)
    assert kinds == [("StateChanged", "Warning"), ("ThresholdCrossed", "Warning")]
    assert "Active → Exhausted" in next(
        e.message for e in result.events if e.reason == "StateChanged"
    )
    assert sorted(a.kind for a in result.alerts) == ["StateChanged", "ThresholdCrossed"]
    assert cond.find(result.status["conditions"], "Funded")["reason"] == "BalanceExhausted"  # type: ignore[index]
    body = next_body(body, result)

    await store.ledger.fund("acme", "topup-1", parse_amount("50.00"))
    result = await b.refresh_budget(body, store=store, read_secret=secrets)
    assert result.status["state"] == "Active"
    assert result.status["alertedThreshold"] == 0
    assert result.status["alertBaseline"] == {"balance": "50.00", "charged": "100.00"}
    assert [a.severity for a in result.alerts] == ["info"]


def test_status_patch_writes_only_changes() -> None:
    old = {"balance": "1.00", "state": "Active", "conditions": [{"type": "Ready"}]}
    assert status_patch(old, dict(old)) == {}
    assert status_patch(old, {"balance": "2.00", "state": "Active"}) == {"balance": "2.00"}
    assert status_patch(old, {"held": None}) == {}
    assert status_patch(old, {"balance": None}) == {"balance": None}


def test_refs_for_the_index() -> None:
    body = budget_body(
        apiKeys=[
            {"name": "a", "secretRef": {"name": "s1"}},
            {"name": "b", "secretRef": {"name": "s2", "key": "x"}},
            {"name": "c"},
            "garbage",
        ],
        priceBooks=["gpu", 3],
    )
    assert secret_names(body) == {"s1", "s2"}
    assert pricebook_names(body) == {"gpu"}


async def test_a_budget_whose_parent_is_not_applied_yet_is_invalid_tree(
    store: ConfigStore,
) -> None:
    secrets = Secrets(secret(), secret("team-keys", **{"api-key": OTHER_KEY}))
    team = budget_body(
        "team",
        customerId="team",
        parent="acme",
        balance=None,
        mode="capped",
        limit="10.00",
        period="month",
        apiKeys=[{"name": "main", "secretRef": {"name": "team-keys"}}],
    )
    team["spec"].pop("balance")
    early = await b.reconcile_budget(team, store=store, read_secret=secrets)
    condition = ready(early.status)
    assert (condition["status"], condition["reason"]) == ("False", "InvalidTree")
    assert "spec.parent: CustomerBudget" in condition["message"]
    assert f"{NS}/acme is neither in the input nor applied" in condition["message"]
    assert await store.owner_of("team") is None
    await b.reconcile_budget(budget_body(), store=store, read_secret=secrets)
    late = await b.reconcile_budget(next_body(team, early), store=store, read_secret=secrets)
    assert ready(late.status)["status"] == "True"
    assert await store.ledger.tree.ancestors("team") == ("acme",)
