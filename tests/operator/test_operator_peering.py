"""HA: two operator replicas with kopf peering; exactly one works, the other takes over.

The replicas run in separate threads with their own event loops, as separate pods would: kopf
assumes one operator per event loop (at exit it cancels every task created after it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import kopf
import pytest

from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from tests.operator.test_operator_e2e import BUDGETS, NS, SECRETS, budget, secret
from tests.support.kube_emulator import (
    API_CALLS,
    CORE_KINDS,
    PEERING_KINDS,
    SPENDGATE_KINDS,
    Kubectl,
    rbac_rules,
    started_emulator,
)

pytestmark = pytest.mark.timeout(40)


@dataclass
class Replica:
    name: str
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    ready: threading.Event
    error: list[BaseException]

    def shutdown(self, timeout: float = 15) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"replica {self.name} did not stop"
        assert not self.error, self.error


@contextlib.asynccontextmanager
async def replica(name: str, priority: int, api_url: str, redis_url: str) -> AsyncIterator[Replica]:
    """A replica running in its own thread; the API emulator keeps serving in this loop."""
    settings = OperatorSettings(
        redis_url=redis_url,
        status_interval_s=0.5,
        retry_delay_s=0.3,
        peering_priority=priority,
        peering_lifetime_s=10,
        pod_name=name,
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        holder["stop"] = stop

        async def signal_ready() -> None:
            await ready.wait()
            started.set()

        waiter = asyncio.create_task(signal_ready())
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
            loop.run_until_complete(main())
        except BaseException as error:  # reported by the test
            errors.append(error)
        finally:
            loop.close()

    thread = threading.Thread(target=target, name=f"operator-{name}", daemon=True)
    thread.start()
    assert await asyncio.to_thread(started.wait, 10), f"replica {name} did not start"
    rep = Replica(name, thread, loop, holder["stop"], started, errors)
    try:
        yield rep
    finally:
        if thread.is_alive():
            await asyncio.to_thread(rep.shutdown)


@contextlib.asynccontextmanager
async def peered_cluster() -> AsyncIterator[tuple[Kubectl, str]]:
    async with started_emulator(CORE_KINDS + SPENDGATE_KINDS + PEERING_KINDS) as (emulator, url):
        kubectl = Kubectl(emulator)
        await kubectl.create("v1/namespaces", {"metadata": {"name": NS}})
        await kubectl.create(
            "kopf.dev/v1/clusterkopfpeerings",
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "ClusterKopfPeering",
                "metadata": {"name": "spendgate"},
            },
        )
        yield kubectl, url


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


def peers(kubectl: Kubectl) -> set[str]:
    peering = kubectl.get("kopf.dev/v1/clusterkopfpeerings", None, "spendgate") or {}
    return set(peering.get("status") or {})


async def test_one_replica_works_the_other_takes_over(redis_url: str) -> None:
    before = len(API_CALLS)
    async with peered_cluster() as (kubectl, url):
        await kubectl.create(SECRETS, secret("one-keys", "sk-peer-one-0123456789abcdef"))
        await kubectl.create(SECRETS, secret("two-keys", "sk-peer-two-0123456789abcdef"))
        async with replica("replica-high", 100, url, redis_url) as high:
            # kopf's peering is not a lock: replicas starting at the same instant may both
            # work until they see each other (harmless: reconciling is idempotent). Here the
            # active replica is up first, as after a rollout.
            await kubectl.wait_for(lambda: "replica-high" in peers(kubectl), what="high peered")
            async with replica("replica-low", 10, url, redis_url) as low:
                await kubectl.wait_for(
                    lambda: {"replica-high", "replica-low"} <= peers(kubectl), what="both peered"
                )
                await kubectl.create(BUDGETS, budget("one", customer="one"))
                await kubectl.wait_for(lambda: ready(kubectl, "one"), what="budget one Ready")
                await kubectl.wait_for(lambda: reporters(kubectl, "one"), what="an Event")
                assert reporters(kubectl, "one") == {"replica-high"}

                await asyncio.to_thread(high.shutdown)  # the active replica goes away
                await kubectl.create(BUDGETS, budget("two", customer="two"))
                await kubectl.wait_for(
                    lambda: ready(kubectl, "two"), within=15, what="budget two Ready (by low)"
                )
                await kubectl.wait_for(lambda: reporters(kubectl, "two"), what="an Event")
                assert reporters(kubectl, "two") == {"replica-low"}
                assert reporters(kubectl, "one") == {"replica-high"}  # never handled twice
                await asyncio.to_thread(low.shutdown)
    rules = set(rbac_rules(API_CALLS[before:]))
    for verb in ("list", "watch", "patch"):
        assert ("kopf.dev", "clusterkopfpeerings", verb) in rules
