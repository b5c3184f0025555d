"""The leader's spend watch (operator/budgets/spend_watch.py) against a real Redis and the kmock
API emulator, the clock driven by the test: absorbed cost reported once per entry (across a
failover), abnormal spend alerting or suspending once per episode, and a person lifting it."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import kopf
import pytest_asyncio
import redis.asyncio
from prometheus_client import REGISTRY

from spendgate.accounting import abnormal as core_abnormal
from spendgate.accounting.audit import trim_ledger
from spendgate.accounting.entries import last_id
from spendgate.config_store import ConfigStore
from spendgate.keys import for_customer
from spendgate.ledger import Ledger, Outcome, Usage
from spendgate.models import BudgetState
from spendgate.operator.alerts.sender import Alert
from spendgate.operator.budgets import reconcile as b
from spendgate.operator.budgets.abnormal import RESUME_ANNOTATION, resume_budget
from spendgate.operator.budgets.spend_watch import SpendWatch
from spendgate.operator.kube import conditions as cond
from spendgate.operator.kube.client import REFRESH_ANNOTATION, KubeClient
from tests.operator.test_operator_budgets import NS, Secrets, budget_body, next_body, secret
from tests.support.kube_emulator import Kubectl, started_emulator

UNIT = 1_000_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
DAY_MS = 24 * HOUR_MS
START = (int(1.7e12) // DAY_MS) * DAY_MS  # a midnight UTC in 2023: in the past
BUDGETS = "spendgate.dev/v1alpha1/customerbudgets"
SUSPEND = {"action": "suspend", "minimum": "5.00"}


class Clock:
    def __init__(self, now: int = START) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, delta_ms: int) -> int:
        self.now += delta_ms
        return self.now


class Inbox:
    """The alert webhook, as the spend watch sees it (AlertSender.dispatch)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def dispatch(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def kinds(self) -> list[str]:
        return [a.kind for a in self.alerts]


@dataclass
class World:
    redis: Any
    store: ConfigStore
    kubectl: Kubectl
    kube: KubeClient
    clock: Clock
    ledger: Ledger
    inbox: Inbox
    body: dict[str, Any]
    n: int = 0

    def watch(self) -> SpendWatch:
        """A spend watch as a (new) leader runs it."""
        return SpendWatch(self.redis, self.kube, self.inbox, instance="op-0", clock=self.clock)

    async def spend(self, cost: int, *, hold: int | None = None, key: str = "main") -> str:
        self.n += 1
        rid = f"r{self.n}"
        if hold is not None:
            reservation = await self.ledger.reserve(
                "acme", rid, hold, key_id=key, currency="USD", ttl_ms=60_000
            )
            assert reservation.outcome is Outcome.reserved
        usage = Usage(model="llama-3", input_tokens=10, output_tokens=20, outcome="ok")
        await self.ledger.settle("acme", rid, cost, key_id=key, usage=usage)
        return rid

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.kubectl.events(NS, "acme") if e["reason"] == reason]

    async def set_policy(self, policy: dict[str, Any] | None) -> None:
        spec_policy = {"abnormalSpend": policy} if policy is not None else {}
        await self.kubectl.patch(BUDGETS, NS, "acme", {"spec": {"policy": spec_policy or None}})


@pytest_asyncio.fixture
async def world(redis_client: redis.asyncio.Redis) -> AsyncIterator[World]:
    clock = Clock()
    store = ConfigStore(redis_client, Ledger(redis_client, clock=clock))
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        body = budget_body(balance="100000.00")
        created = await kubectl.create(BUDGETS, body)
        result = await b.reconcile_budget(created, store=store, read_secret=Secrets(secret()))
        assert result.error is None and result.applied is not None
        kube = KubeClient(timeout_s=3)
        kube.configure(kopf.ConnectionInfo(server=url))
        try:
            yield World(
                redis_client,
                store,
                kubectl,
                kube,
                clock,
                store.ledger,
                Inbox(),
                next_body(created, result),
            )
        finally:
            await kube.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- absorbed


async def test_absorbed_cost_is_reported_once_per_entry_across_a_failover(world: World) -> None:
    before = sample("spendgate_operator_absorbed_micros_total", currency="USD")
    await world.spend(UNIT, hold=2 * UNIT)  # within its hold: nothing absorbed
    assert (await world.watch().pass_once()).absorbed["acme"] == []
    assert world.events("CostAbsorbed") == []

    rid = await world.spend(1_300_000, hold=UNIT)  # the model reported 0.30 more than held
    leader = world.watch()
    [finding] = (await leader.pass_once()).absorbed["acme"]
    assert finding.amount == 300_000
    [event] = world.events("CostAbsorbed")
    assert event["type"] == "Warning"
    assert event["involvedObject"]["uid"] == world.body["metadata"]["uid"]
    assert f"request {rid} (model llama-3, key main)" in event["message"]
    assert "cost 1.30 USD, 0.30 USD more than its bound (held 1.00 USD" in event["message"]
    [alert] = world.inbox.alerts
    assert alert.kind == "CostAbsorbed" and alert.customer_id == "acme"
    assert alert.fields["absorbed"] == "0.30" and alert.fields["requestId"] == rid
    assert sample("spendgate_operator_absorbed_micros_total", currency="USD") - before == 300_000

    await leader.pass_once()  # the same leader again
    await world.watch().pass_once()  # a new leader after a failover: the cursor is in Redis
    assert len(world.events("CostAbsorbed")) == 1 and len(world.inbox.alerts) == 1

    await world.spend(500_000)  # settled without a hold: charged (all is available)
    await world.spend(2_250_000, hold=2 * UNIT)
    await world.watch().pass_once()
    assert len(world.events("CostAbsorbed")) == 2
    assert "0.25 USD more than its bound" in world.events("CostAbsorbed")[-1]["message"]
    assert sample("spendgate_operator_absorbed_micros_total", currency="USD") - before == 550_000


async def test_absorbed_cost_trimmed_before_it_was_read_is_reported_as_a_sum(
    world: World,
) -> None:
    await world.watch().pass_once()  # the record starts here
    await world.spend(1_500_000, hold=UNIT)
    await world.spend(1_100_000, hold=UNIT)
    ms, seq = (await last_id(world.redis, "acme")).split("-")
    await trim_ledger(world.redis, "acme", f"{ms}-{int(seq) + 1}")  # the exporter trimmed
    [finding] = (await world.watch().pass_once()).absorbed["acme"]
    assert finding.entry is None and finding.amount == 600_000
    [event] = world.events("CostAbsorbed")
    assert "0.60 USD of cost above the requests' bounds" in event["message"]
    assert "trimmed before the operator read them" in event["message"]


# --------------------------------------------------------------------------- abnormal spend


async def normal_week(world: World, days: int = 8) -> None:
    """1.00 an hour, every hour, for ``days`` days."""
    for _ in range(days * 24):
        world.clock.advance(HOUR_MS)
        await world.spend(UNIT)


async def burst(world: World, watch: SpendWatch, minutes: int, per_minute: int) -> list[Any]:
    outcomes = []
    for _ in range(minutes):
        world.clock.advance(MINUTE_MS)
        await world.spend(per_minute, key="leaked")
        outcomes.append((await watch.pass_once()).abnormal["acme"])
    return outcomes


async def test_abnormal_spend_suspends_once_and_a_person_lifts_it(world: World) -> None:
    await world.set_policy(SUSPEND)
    await normal_week(world)
    watch = world.watch()
    steady = (await watch.pass_once()).abnormal["acme"]
    assert not steady.verdict.tripped and steady.verdict.baseline == UNIT

    trips = sample("spendgate_operator_abnormal_spend_trips_total", action="suspended")
    outcomes = await burst(world, watch, 3, 3 * UNIT)  # a leaked key: 3.00 a minute
    assert [o.acted for o in outcomes] == [None, "suspended", None]
    assert sample("spendgate_operator_abnormal_spend_trips_total", action="suspended") == trips + 1
    assert await core_abnormal.is_suspended(world.redis, "acme")
    refused = await world.ledger.reserve(
        "acme", "after", UNIT // 10, key_id="main", currency="USD", ttl_ms=60_000
    )
    assert refused.outcome is Outcome.suspended  # the sidecar answers 403 from now on
    [event] = world.events("AbnormalSpend")
    assert event["type"] == "Warning"
    assert "suspended for abnormal spend: spent 7.00 USD in the last window" in event["message"]
    assert "baseline of 1.00 USD per hour" in event["message"]
    assert world.inbox.kinds() == ["AbnormalSpend"]
    assert world.inbox.alerts[0].fields["action"] == "suspend"
    stored = world.kubectl.get(BUDGETS, NS, "acme")
    assert (
        stored is not None
        and "AbnormalSpend" in stored["metadata"]["annotations"][REFRESH_ANNOTATION]
    )  # kopf recomputes the status at once

    # The status kopf then writes: Suspended, reason AbnormalSpend.
    result = await b.refresh_budget(world.body, store=world.store, read_secret=Secrets(secret()))
    assert result.status["state"] == BudgetState.suspended.value
    suspended = cond.find(result.status["conditions"], "Suspended")
    assert suspended is not None and suspended["reason"] == "AbnormalSpend"
    body = next_body(world.body, result)

    await watch.pass_once()
    await world.watch().pass_once()  # a failover: still one episode
    assert len(world.events("AbnormalSpend")) == 1 and len(world.inbox.alerts) == 1

    # A person lifts it with the annotation; the same value again does nothing.
    annotated = copy.deepcopy(body)
    annotated["metadata"]["annotations"] = {RESUME_ANNOTATION: "alice: key rotated, INC-42"}
    world.clock.advance(MINUTE_MS)
    [lifted] = await resume_budget(annotated, world.store, world.clock.now)
    assert lifted.type == "Normal" and lifted.reason == "AbnormalSpendResumed"
    assert "lifted" in lifted.message and "INC-42" in lifted.message
    assert await core_abnormal.is_suspended(world.redis, "acme") is None
    assert await resume_budget(annotated, world.store, world.clock.now) == []
    result = await b.refresh_budget(body, store=world.store, read_secret=Secrets(secret()))
    assert result.status["state"] == BudgetState.active.value

    # Only spend after the resume counts: normal traffic does not trip it again ...
    world.clock.advance(MINUTE_MS)
    await world.spend(UNIT)
    assert (await watch.pass_once()).abnormal["acme"].acted is None
    # ... a new burst does, and is a new episode.
    outcomes = await burst(world, watch, 4, 3 * UNIT)
    assert [o.acted for o in outcomes].count("suspended") == 1
    assert len(world.events("AbnormalSpend")) == 2


async def test_abnormal_spend_alert_once_per_episode(world: World) -> None:
    await world.set_policy({"action": "alert", "minimum": "5.00", "window": "10m"})
    await normal_week(world)
    watch = world.watch()
    outcomes = await burst(world, watch, 5, 3 * UNIT)
    assert [o.acted for o in outcomes] == [None, "alerted", None, None, None]
    assert await core_abnormal.is_suspended(world.redis, "acme") is None  # alert only
    [event] = world.events("AbnormalSpend")
    assert event["message"].startswith("abnormal spend for customer acme: spent 7.00 USD")
    assert world.inbox.kinds() == ["AbnormalSpend"]

    # Back to normal for a whole window ends the episode; the next burst alerts again.
    for _ in range(12):
        world.clock.advance(MINUTE_MS)
        assert (await watch.pass_once()).abnormal["acme"].acted is None
    outcomes = await burst(world, watch, 3, 3 * UNIT)
    assert [o.acted for o in outcomes].count("alerted") == 1
    assert world.inbox.kinds() == ["AbnormalSpend", "AbnormalSpend"]


async def test_a_budget_without_policy_is_not_rolled_up(world: World) -> None:
    await world.spend(UNIT)
    await world.watch().pass_once()
    state = core_abnormal.state_key(for_customer("acme"))
    assert not await world.redis.hexists(state, "cursor")
    await world.set_policy(SUSPEND)
    await world.watch().pass_once()
    assert await world.redis.hexists(state, "cursor")  # the trimmer keeps what it has not read
    await world.set_policy(None)
    await world.watch().pass_once()
    assert not await world.redis.hexists(state, "cursor")  # ... no more: policy removed
    assert not await world.redis.exists(core_abnormal.minute_buckets_key(for_customer("acme")))


async def test_resume_annotation_of_a_budget_that_does_not_own_the_customer(
    world: World,
) -> None:
    other = budget_body("impostor")
    other["metadata"]["annotations"] = {RESUME_ANNOTATION: "mallory"}
    await core_abnormal.suspend(world.redis, "acme", "abnormal", world.clock.now)
    [refused] = await resume_budget(other, world.store, world.clock.now)
    assert refused.type == "Warning" and "not configured by this budget" in refused.message
    assert await core_abnormal.is_suspended(world.redis, "acme")
    assert await world.redis.hget(for_customer("acme").suspensions, "abnormal-spend")


async def test_a_policy_the_crd_cannot_check_is_invalid_spec(world: World) -> None:
    body = budget_body(balance="100000.00", policy={"abnormalSpend": {**SUSPEND, "window": "90s"}})
    result = await b.reconcile_budget(body, store=world.store, read_secret=Secrets(secret()))
    ready = cond.find(result.status["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "InvalidSpec"
    assert "spec.policy.abnormalSpend" in ready["message"]
    assert "window must be whole minutes, from 1m to 24h" in ready["message"]


async def test_a_namespaced_watch_leaves_other_namespaces_alone(world: World) -> None:
    await world.set_policy(SUSPEND)
    await world.spend(1_300_000, hold=UNIT)
    elsewhere = SpendWatch(world.redis, world.kube, world.inbox, namespaces=["other"])
    result = await elsewhere.pass_once()
    assert result.absorbed == {} and result.abnormal == {}
    mine = SpendWatch(world.redis, world.kube, world.inbox, namespaces=[NS], clock=world.clock)
    result = await mine.pass_once()
    assert [f.amount for f in result.absorbed["acme"]] == [300_000] and "acme" in result.abnormal
