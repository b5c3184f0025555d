"""spendgate.operator.budgets.soft_limits: status.softLimitsReached, the SoftLimitReached /
SoftLimitCleared Events and the notify alert, through reconcile and refresh against a real Redis
(no Kubernetes), with the ledger's clock and the operator's ``now`` stepped together."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio

from spendgate.config_store import ConfigStore
from spendgate.ledger import Account, Ledger
from spendgate.money import parse_amount
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.budgets.checks import parse_budget
from spendgate.operator.budgets.soft_limits import evaluate_soft_limits
from spendgate.operator.budgets.status import clear_account_status
from spendgate.operator.kube.objects import EventSpec

NS = "team-a"
KEY = "sk-test-acme-0123456789"
MARCH = datetime(2025, 3, 15, 12, tzinfo=UTC)
APRIL = datetime(2025, 4, 2, 12, tzinfo=UTC)
THROTTLE = {"action": "throttle", "at": 90, "rateLimits": [{"requests": 10, "per": "minute"}]}


class Clock:
    """The one clock of the ledger (milliseconds) and of the operator's refreshes."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def ms(self) -> int:
        return int(self.now.timestamp() * 1000)


class World:
    def __init__(self, redis_client: redis.asyncio.Redis, clock: Clock) -> None:
        self.clock = clock
        self.store = ConfigStore(redis_client, Ledger(redis_client, clock=clock.ms))
        self.body: dict[str, Any] = {}
        self.requests = 0

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name, "namespace": namespace}, "stringData": {"api-key": KEY}}

    async def apply(self, body: dict[str, Any]) -> b.Reconciled:
        self.body = body
        result = await b.reconcile_budget(
            body, store=self.store, read_secret=self.read_secret, now=self.clock.now
        )
        assert result.error is None
        self._keep(result)
        return result

    async def refresh(self) -> b.Reconciled:
        result = await b.refresh_budget(
            self.body, store=self.store, read_secret=self.read_secret, now=self.clock.now
        )
        assert result.error is None
        self._keep(result)
        return result

    async def spend(self, amount: str) -> None:
        self.requests += 1
        await self.store.ledger.settle(
            "acme", f"r{self.requests}", parse_amount(amount), key_id="main"
        )

    def _keep(self, result: b.Reconciled) -> None:
        """The body as the API server holds it after the status patch."""
        body = copy.deepcopy(self.body)
        status = dict(body.get("status") or {})
        for key, value in result.patch(status).items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        body["status"] = status
        self.body = body


@pytest.fixture
def world(redis_client: redis.asyncio.Redis) -> World:
    return World(redis_client, Clock(MARCH))


def budget_body(*soft_limits: dict[str, Any], **spec: Any) -> dict[str, Any]:
    full_spec: dict[str, Any] = {
        "customerId": "acme",
        "currency": "USD",
        "apiKeys": [{"name": "main", "secretRef": {"name": "acme-keys"}}],
        "policy": {"alertThresholds": [100], "softLimits": list(soft_limits)},
    }
    full_spec.update(spec)
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": "acme", "namespace": NS, "generation": 1, "uid": "uid-acme"},
        "spec": full_spec,
    }


def capped(*soft_limits: dict[str, Any]) -> dict[str, Any]:
    return budget_body(*soft_limits, mode="capped", limit="100.00", period="month")


def prepaid(*soft_limits: dict[str, Any], balance: str = "10.00") -> dict[str, Any]:
    return budget_body(*soft_limits, balance=balance)


def soft_events(result: b.Reconciled) -> list[EventSpec]:
    return [e for e in result.events if e.reason.startswith("SoftLimit")]


def kinds(result: b.Reconciled) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in soft_events(result)]


def soft_alerts(result: b.Reconciled) -> list[Any]:
    return [a for a in result.alerts if a.kind == "SoftLimitReached"]


# --------------------------------------------------------------------------- notify


async def test_notify_at_alerts_once_per_period(world: World) -> None:
    result = await world.apply(capped({"action": "notify", "at": 80}))
    assert result.status["softLimitsReached"] == []
    assert soft_events(result) == [] and soft_alerts(result) == []

    await world.spend("79.00")
    result = await world.refresh()
    assert result.status["softLimitsReached"] == [] and soft_alerts(result) == []

    await world.spend("2.00")  # 81 of 100
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify at 80%"]
    assert kinds(result) == [("Warning", "SoftLimitReached")]
    message = soft_events(result)[0].message
    assert "team-a/acme" in message and "customer acme" in message
    assert "notify at 80%" in message and "81.00 of 100.00 USD" in message
    [alert] = soft_alerts(result)
    assert alert.severity == "warning" and alert.message == message
    payload = alert.payload()["spendgate"]
    assert payload["kind"] == "SoftLimitReached" and payload["customerId"] == "acme"
    assert payload["softLimit"] == "notify at 80%" and payload["action"] == "notify"
    assert (payload["used"], payload["limit"]) == ("81.00", "100.00")
    assert (payload["spentThisPeriod"], payload["available"]) == ("81.00", "19.00")
    assert (payload["currency"], payload["state"]) == ("USD", "Active")

    # Still reached: a refresh (or a restart: the status remembers) never alerts again.
    await world.spend("5.00")
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify at 80%"]
    assert soft_events(result) == [] and soft_alerts(result) == []
    assert "softLimitsReached" not in result.patch(world.body["status"])

    # A new month: nothing spent yet, the soft limit leaves the list, quietly for the webhook.
    world.clock.now = APRIL
    result = await world.refresh()
    assert result.status["softLimitsReached"] == []
    assert kinds(result) == [("Normal", "SoftLimitCleared")]
    assert soft_alerts(result) == []
    await world.spend("80.00")  # 80% exactly reaches it
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify at 80%"]
    assert kinds(result) == [("Warning", "SoftLimitReached")]
    assert [a.fields["used"] for a in soft_alerts(result)] == ["80.00"]


async def test_notify_below_rearms_after_a_top_up(world: World) -> None:
    await world.apply(prepaid({"action": "notify", "below": "5.00"}))
    await world.spend("6.00")  # 4.00 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify below 5.00"]
    [alert] = soft_alerts(result)
    assert "4.00 USD available" in alert.message
    assert alert.fields["softLimit"] == "notify below 5.00" and alert.fields["limit"] is None
    assert soft_alerts(await world.refresh()) == []

    await world.store.ledger.fund("acme", "topup-1", parse_amount("5.00"))  # 9.00 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == []
    assert kinds(result) == [("Normal", "SoftLimitCleared")] and soft_alerts(result) == []

    await world.spend("4.50")  # 4.50 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify below 5.00"]
    assert kinds(result) == [("Warning", "SoftLimitReached")]
    assert [a.fields["available"] for a in soft_alerts(result)] == ["4.50"]


async def test_holds_count_as_used(world: World) -> None:
    await world.apply(capped({"action": "notify", "at": 50}))
    await world.spend("30.00")
    await world.store.ledger.reserve(
        "acme", "held-1", parse_amount("25.00"), key_id="main", currency="USD", ttl_ms=60_000
    )
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["notify at 50%"]
    assert [a.fields["used"] for a in soft_alerts(result)] == ["55.00"]


# --------------------------------------------------------------------------- throttle, downgrade


async def test_throttle_and_downgrade_are_normal_events_without_alerts(world: World) -> None:
    throttle = {"action": "throttle", "below": "3.00", "rateLimits": THROTTLE["rateLimits"]}
    await world.apply(prepaid(throttle, {"action": "downgrade", "below": "2.00"}))
    await world.spend("7.50")  # 2.50 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["throttle below 3.00"]
    assert kinds(result) == [("Normal", "SoftLimitReached")] and soft_alerts(result) == []
    await world.spend("1.00")  # 1.50 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["throttle below 3.00", "downgrade below 2.00"]
    assert kinds(result) == [("Normal", "SoftLimitReached")]  # one Event per change
    assert "downgradeTo" in soft_events(result)[0].message
    assert "1.50 USD available" in soft_events(result)[0].message
    assert soft_alerts(result) == []
    assert soft_events(await world.refresh()) == []
    await world.store.ledger.fund("acme", "topup-1", parse_amount("10.00"))
    result = await world.refresh()
    assert result.status["softLimitsReached"] == []
    assert kinds(result) == [("Normal", "SoftLimitCleared")] * 2 and soft_alerts(result) == []
    assert "no longer throttled" in soft_events(result)[0].message
    assert "no longer downgraded" in soft_events(result)[1].message


async def test_throttle_at_is_a_normal_event(world: World) -> None:
    await world.apply(capped(THROTTLE))
    await world.spend("95.00")
    result = await world.refresh()
    assert result.status["softLimitsReached"] == ["throttle at 90%"]
    assert kinds(result) == [("Normal", "SoftLimitReached")]
    assert "requests are now throttled" in soft_events(result)[0].message
    assert "throttle at 90%" in soft_events(result)[0].message
    assert soft_alerts(result) == []
    world.clock.now = APRIL
    result = await world.refresh()
    assert kinds(result) == [("Normal", "SoftLimitCleared")]
    assert "no longer throttled" in soft_events(result)[0].message


# --------------------------------------------------------------------------- the list


async def test_reached_soft_limits_are_listed_in_spec_order(world: World) -> None:
    await world.apply(
        capped(
            THROTTLE,
            {"action": "notify", "below": "20.00"},
            {"action": "downgrade", "at": 99},
            {"action": "notify", "at": 50},
        )
    )
    await world.spend("95.00")  # 95%, 5.00 available
    result = await world.refresh()
    assert result.status["softLimitsReached"] == [
        "throttle at 90%",
        "notify below 20.00",
        "notify at 50%",
    ]
    assert kinds(result) == [
        ("Normal", "SoftLimitReached"),
        ("Warning", "SoftLimitReached"),
        ("Warning", "SoftLimitReached"),
    ]
    assert [a.fields["softLimit"] for a in soft_alerts(result)] == [
        "notify below 20.00",
        "notify at 50%",
    ]
    await world.spend("4.00")  # 99%
    result = await world.refresh()
    assert result.status["softLimitsReached"] == [
        "throttle at 90%",
        "notify below 20.00",
        "downgrade at 99%",
        "notify at 50%",
    ]
    assert kinds(result) == [("Normal", "SoftLimitReached")] and soft_alerts(result) == []


async def test_a_budget_without_soft_limits_lists_none(world: World) -> None:
    body = prepaid()
    del body["spec"]["policy"]["softLimits"]
    result = await world.apply(body)
    assert result.status["softLimitsReached"] == []
    await world.spend("10.00")
    result = await world.refresh()
    assert result.status["softLimitsReached"] == [] and soft_events(result) == []


def test_an_unreadable_old_list_counts_as_none() -> None:
    budget = parse_budget(prepaid({"action": "notify", "below": "5.00"}))
    account = Account(
        customer_id="acme",
        configured=True,
        currency="USD",
        mode="prepaid",
        limit=0,
        period=None,
        balance=1_000_000,
        held=0,
        spent=0,
        period_start_ms=0,
        funded=0,
        charged=0,
        expired_holds=0,
    )
    soft = evaluate_soft_limits(budget, account, {"softLimitsReached": 3}, 0)
    assert soft.reached == ["notify below 5.00"] and [s.label for s in soft.joined] == soft.reached


def test_a_budget_without_its_account_clears_the_list() -> None:
    status: dict[str, Any] = {"softLimitsReached": ["notify at 80%"]}
    clear_account_status(status)
    assert status["softLimitsReached"] is None
