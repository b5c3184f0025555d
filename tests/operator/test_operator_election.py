"""HA: two operator replicas, one election (a Lease). The holder runs kopf's handlers and the
singleton loops; the other waits; a graceful stop hands the Lease over at once; a leader that
loses the Lease stops kopf and its loops and ends with LeadershipLost (``run`` exits 1).

The replicas run in separate threads with their own event loops, as separate pods would: kopf
assumes one operator per event loop (at exit it cancels every task created after it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import kopf
import pytest

from spendgate.operator.runtime.leader import LeadershipLost
from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from tests.operator.test_operator_e2e import BUDGETS, NS, SECRETS, budget, secret
from tests.support.kube_emulator import API_CALLS, Kubectl, rbac_rules, started_emulator

pytestmark = pytest.mark.timeout(60)

LEASES = "coordination.k8s.io/v1/leases"
OPERATOR_NS = "spendgate-system"
LEASE = "spendgate-leader"


@dataclass
class Replica:
    name: str
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    kopf_started: threading.Event  # kopf's handlers run here (this replica leads)
    loop_runs: threading.Event  # a singleton loop (a leader task) ran here
    loop_stopped: threading.Event  # ... and was told to stop
    error: list[BaseException]

    def shutdown(self, timeout: float = 20) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.join(timeout)
        assert not self.error, self.error

    def join(self, timeout: float = 20) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"replica {self.name} did not stop"


SETTINGS = OperatorSettings(
    status_interval_s=0.5,
    retry_delay_s=0.3,
    lease_duration_s=3.0,
    lease_renew_deadline_s=2.0,
    lease_retry_s=0.3,
    shutdown_drain_s=0.1,
    bypass_check_interval_s=0,
    audit_interval_s=0,
    spend_watch_interval_s=0,
)


@contextlib.asynccontextmanager
async def replica(name: str, api_url: str, redis_url: str) -> AsyncIterator[Replica]:
    """A replica in its own thread; the API emulator keeps serving in the test's loop. Its
    singleton work is a probe loop (the real ones are tested elsewhere)."""
    from spendgate.operator.runtime import main

    settings = replace(SETTINGS, redis_url=redis_url, pod_name=name)
    loop = asyncio.new_event_loop()
    kopf_started, loop_runs, loop_stopped = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    holder: dict[str, Any] = {}
    up = threading.Event()

    async def probe_loop(stop: asyncio.Event) -> None:
        loop_runs.set()
        await stop.wait()
        loop_stopped.set()

    async def target_main() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        holder["stop"] = stop

        async def signal_ready() -> None:
            await ready.wait()
            kopf_started.set()

        waiter = asyncio.create_task(signal_ready())
        up.set()
        try:
            await run_operator(
                settings,
                login=lambda **_: kopf.ConnectionInfo(server=api_url),
                services=[],
                stop_flag=stop,
                ready_flag=ready,
                health=False,
            )
        finally:
            waiter.cancel()

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(target_main())
        except BaseException as error:  # reported by the test
            errors.append(error)
        finally:
            loop.close()

    original = main.leader_tasks
    main_tasks = {"probe": probe_loop}

    def with_probe(*args: Any, **kwargs: Any) -> list[Any]:
        return [*original(*args, **kwargs), main_tasks["probe"]]

    thread = threading.Thread(target=target, name=f"operator-{name}", daemon=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "leader_tasks", with_probe)
        thread.start()
        assert await asyncio.to_thread(up.wait, 10), f"replica {name} did not start"
        await asyncio.sleep(0.2)  # its leader_tasks() was called with the probe
    rep = Replica(name, thread, loop, holder["stop"], kopf_started, loop_runs, loop_stopped, errors)
    try:
        yield rep
    finally:
        if thread.is_alive():
            await asyncio.to_thread(rep.shutdown)


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[tuple[Kubectl, str]]:
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        await kubectl.create("v1/namespaces", {"metadata": {"name": NS}})
        yield kubectl, url


def holder(kubectl: Kubectl) -> str | None:
    lease = kubectl.get(LEASES, OPERATOR_NS, LEASE) or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def reporters(kubectl: Kubectl, name: str) -> set[str]:
    return {
        e.get("reportingInstance", "")
        for e in kubectl.events(NS, name)
        if e["reason"] == "Configured"
    }


def ready(kubectl: Kubectl, name: str) -> bool:
    obj = kubectl.get(BUDGETS, NS, name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def test_only_the_leader_runs_kopf_and_a_graceful_stop_hands_over(redis_url: str) -> None:
    before = len(API_CALLS)
    async with cluster() as (kubectl, url):
        await kubectl.create(SECRETS, secret("one-keys", "sk-peer-one-0123456789abcdef"))
        await kubectl.create(SECRETS, secret("two-keys", "sk-peer-two-0123456789abcdef"))
        async with replica("replica-a", url, redis_url) as a:
            await kubectl.wait_for(lambda: holder(kubectl) == "replica-a", what="a leads")
            assert await asyncio.to_thread(a.kopf_started.wait, 10), "kopf started on a"
            assert await asyncio.to_thread(a.loop_runs.wait, 5), "a's singleton loop runs"
            async with replica("replica-b", url, redis_url) as b:
                await kubectl.create(BUDGETS, budget("one", customer="one"))
                await kubectl.wait_for(lambda: ready(kubectl, "one"), what="budget one Ready")
                await kubectl.wait_for(lambda: reporters(kubectl, "one"), what="an Event")
                assert reporters(kubectl, "one") == {"replica-a"}
                # b is a standby: no kopf, no singleton loop, the Lease still a's.
                assert not b.kopf_started.is_set() and not b.loop_runs.is_set()
                assert holder(kubectl) == "replica-a"

                stopped_at = time.monotonic()
                await asyncio.to_thread(a.shutdown)  # the leader goes away, cleanly
                assert a.loop_stopped.is_set()
                await kubectl.wait_for(lambda: holder(kubectl) == "replica-b", what="b leads")
                # Released, not expired: b took over well before the lease duration ran out.
                assert time.monotonic() - stopped_at < SETTINGS.lease_duration_s + 2
                assert await asyncio.to_thread(b.kopf_started.wait, 10), "kopf started on b"
                assert await asyncio.to_thread(b.loop_runs.wait, 5), "b's singleton loop runs"
                await kubectl.create(BUDGETS, budget("two", customer="two"))
                await kubectl.wait_for(
                    lambda: ready(kubectl, "two"), within=15, what="budget two Ready (by b)"
                )
                await kubectl.wait_for(lambda: reporters(kubectl, "two"), what="an Event")
                assert reporters(kubectl, "two") == {"replica-b"}
                assert reporters(kubectl, "one") == {"replica-a"}  # never handled twice
                await asyncio.to_thread(b.shutdown)
            assert holder(kubectl) is None  # the last leader released it too
    rules = set(rbac_rules(API_CALLS[before:]))
    for verb in ("get", "create", "patch"):
        assert ("coordination.k8s.io", "leases", verb) in rules
    assert not [r for r in rules if r[0] == "kopf.dev"]  # no kopf peering at all


async def test_a_leader_that_loses_the_lease_stops_kopf_and_its_loops(redis_url: str) -> None:
    async with cluster() as (kubectl, url), replica("replica-a", url, redis_url) as a:
        await kubectl.wait_for(lambda: holder(kubectl) == "replica-a", what="a leads")
        assert await asyncio.to_thread(a.kopf_started.wait, 10), "kopf started on a"
        assert await asyncio.to_thread(a.loop_runs.wait, 5)
        # Another holder writes the Lease (as a replica that judged it expired would).
        lease = kubectl.get(LEASES, OPERATOR_NS, LEASE)
        assert lease is not None
        await kubectl.patch(LEASES, OPERATOR_NS, LEASE, {"spec": {"holderIdentity": "intruder"}})
        await asyncio.to_thread(a.join, 20)  # a ends by itself: no stop flag was set
        assert not a.stop.is_set()
        assert [type(e) for e in a.error] == [LeadershipLost], a.error
        assert a.loop_stopped.is_set()  # its singleton loop was told to stop
        assert holder(kubectl) == "intruder"  # and it did not release what is not its own
        # kopf stopped with it: a budget created now is not handled by anybody.
        await kubectl.create(SECRETS, secret("one-keys", "sk-peer-one-0123456789abcdef"))
        await kubectl.create(BUDGETS, budget("one", customer="one"))
        await asyncio.sleep(1.5)
        assert not ready(kubectl, "one") and not reporters(kubectl, "one")
