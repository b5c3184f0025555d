"""Leader election on a coordination.k8s.io/v1 Lease (operator/runtime/leader.py), against the API
emulator of tests/support/kube_emulator.py: several electors share one Lease like replicas would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest

from spendgate.operator.kube.client import Conflict, KubeClient
from spendgate.operator.runtime.leader import LeaderElector, LeaseConfig
from tests.support.kube_emulator import Kubectl, KubeEmulator, started_emulator

NS = "spendgate-system"
LEASES = "coordination.k8s.io/v1/leases"

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def api() -> AsyncIterator[tuple[KubeEmulator, Kubectl, Any]]:
    async with started_emulator() as (emulator, url):
        clients: list[KubeClient] = []

        def client() -> KubeClient:
            kube = KubeClient(timeout_s=3)
            kube.configure(kopf.ConnectionInfo(server=url))
            clients.append(kube)
            return kube

        try:
            yield emulator, Kubectl(emulator), client
        finally:
            for kube in clients:
                await kube.aclose()


def config(identity: str, **overrides: Any) -> LeaseConfig:
    values = {"duration_s": 15.0, "renew_deadline_s": 10.0, "retry_s": 2.0, **overrides}
    return LeaseConfig(name="spendgate-leader", namespace=NS, identity=identity, **values)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaseConfig("l", NS, "")
    with pytest.raises(ValueError, match="retry_s < renew_deadline_s < duration_s"):
        LeaseConfig("l", NS, "a", duration_s=5, renew_deadline_s=10)


async def test_acquire_renew_expire_and_release() -> None:
    async with api() as (_emulator, kubectl, client):
        clock_a, clock_b = Clock(), Clock()
        a = LeaderElector(client(), config("pod-a"), clock=clock_a)
        b = LeaderElector(client(), config("pod-b"), clock=clock_b)

        assert await a.try_acquire_or_renew()  # created
        lease = kubectl.get(LEASES, NS, "spendgate-leader")
        assert lease is not None
        spec = lease["spec"]
        assert spec["holderIdentity"] == "pod-a" and spec["leaseDurationSeconds"] == 15
        assert spec["leaseTransitions"] == 0 and spec["acquireTime"].endswith("Z")

        assert not await b.try_acquire_or_renew()  # held and fresh
        clock_b.now += 14
        assert not await b.try_acquire_or_renew()  # b first saw it 14 s ago: not expired yet
        assert await a.try_acquire_or_renew()  # a renews: a new record for b
        assert not await b.try_acquire_or_renew()  # b sees the renewal now
        clock_b.now += 14
        assert not await b.try_acquire_or_renew()  # renewed 14 s ago as far as b can tell
        clock_b.now += 2
        assert await b.try_acquire_or_renew()  # 16 s without a renewal: b takes over
        spec = kubectl.get(LEASES, NS, "spendgate-leader")["spec"]  # type: ignore[index]
        assert spec["holderIdentity"] == "pod-b" and spec["leaseTransitions"] == 1

        assert not await a.try_acquire_or_renew()  # a sees b fresh: a is not the leader
        await b.release()
        spec = kubectl.get(LEASES, NS, "spendgate-leader")["spec"]  # type: ignore[index]
        assert "holderIdentity" not in spec and spec["leaseDurationSeconds"] == 1
        assert await a.try_acquire_or_renew()  # free: taken at once, no expiry wait


async def test_concurrent_writers_conflict() -> None:
    """Two replicas that read the same version: the API server applies only one write."""
    async with api() as (_emulator, kubectl, client):
        kube = client()
        a = LeaderElector(kube, config("pod-a"))
        assert await a.try_acquire_or_renew()
        lease = kubectl.get(LEASES, NS, "spendgate-leader")
        version = lease["metadata"]["resourceVersion"]  # type: ignore[index]
        await kube.patch_lease(
            NS, "spendgate-leader", {"metadata": {"resourceVersion": version}, "spec": {}}
        )
        await kube.patch_lease(  # no-op patches do not bump the version
            NS,
            "spendgate-leader",
            {"metadata": {"resourceVersion": version}, "spec": {"holderIdentity": "pod-x"}},
        )
        with pytest.raises(Conflict):
            await kube.patch_lease(
                NS,
                "spendgate-leader",
                {"metadata": {"resourceVersion": version}, "spec": {"holderIdentity": "pod-y"}},
            )
        body = {"metadata": {"name": "spendgate-leader", "namespace": NS}, "spec": {}}
        with pytest.raises(Conflict):
            await kube.create_lease(NS, body)
        assert kubectl.get(LEASES, NS, "spendgate-leader")["spec"]["holderIdentity"] == "pod-x"  # type: ignore[index]


async def test_only_one_leader_runs_the_work_and_a_successor_takes_over() -> None:
    async with api() as (_emulator, kubectl, client):
        fast = {"duration_s": 1.5, "renew_deadline_s": 1.0, "retry_s": 0.1}
        running: dict[str, int] = {}
        history: list[str] = []

        def work(name: str) -> Any:
            async def task(stop: asyncio.Event) -> None:
                running[name] = running.get(name, 0) + 1
                history.append(name)
                try:
                    assert sum(running.values()) == 1, running  # never two at once
                    await stop.wait()
                finally:
                    running[name] -= 1

            return task

        stops = {name: asyncio.Event() for name in ("pod-a", "pod-b", "pod-c")}
        changes: list[tuple[str, bool]] = []
        electors = {
            name: LeaderElector(
                client(),
                config(name, **fast),
                on_change=lambda leading, n=name: changes.append((n, leading)),
            )
            for name in stops
        }
        tasks = {
            name: asyncio.create_task(electors[name].run([work(name)], stops[name]))
            for name in stops
        }
        try:
            await Kubectl.wait_for(kubectl, lambda: history, what="a leader")
            await asyncio.sleep(0.5)
            assert len(history) == 1 and sum(e.is_leader for e in electors.values()) == 1
            first = history[0]
            stops[first].set()  # a clean shutdown releases the Lease
            await asyncio.wait_for(tasks[first], 5)
            assert not electors[first].is_leader and running[first] == 0
            await Kubectl.wait_for(kubectl, lambda: len(history) == 2, what="a successor")
            second = history[1]
            assert second != first
            spec = kubectl.get(LEASES, NS, "spendgate-leader")["spec"]  # type: ignore[index]
            assert spec["holderIdentity"] == second
        finally:
            for stop in stops.values():
                stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks.values()), 10)
        assert (first, True) in changes and (first, False) in changes
        assert sum(running.values()) == 0


async def test_leader_steps_down_when_it_cannot_renew() -> None:
    """The API goes away: the work stops within the renew deadline, before the lease could
    expire for anyone else."""
    async with api() as (_emulator, _kubectl, client):
        kube = client()
        elector = LeaderElector(
            kube, config("pod-a", duration_s=1.5, renew_deadline_s=0.6, retry_s=0.1)
        )
        stopped = asyncio.Event()
        started = asyncio.Event()

        async def task(stop: asyncio.Event) -> None:
            started.set()
            await stop.wait()
            stopped.set()

        stop = asyncio.Event()
        runner = asyncio.create_task(elector.run([task], stop))
        await asyncio.wait_for(started.wait(), 5)
        loop = asyncio.get_running_loop()
        broken = loop.time()
        kube._server = "http://127.0.0.1:9"  # nothing listens there
        await asyncio.wait_for(stopped.wait(), 5)
        assert loop.time() - broken < 1.5  # stepped down before the lease duration
        assert not elector.is_leader
        stop.set()
        await asyncio.wait_for(runner, 5)


async def test_failing_work_makes_the_leader_step_down() -> None:
    async with api() as (_emulator, kubectl, client):
        elector = LeaderElector(
            client(), config("pod-a", duration_s=1.5, renew_deadline_s=1.0, retry_s=0.1)
        )

        async def broken(stop: asyncio.Event) -> None:
            raise RuntimeError("boom")

        stop = asyncio.Event()
        runner = asyncio.create_task(elector.run([broken], stop))
        await Kubectl.wait_for(
            kubectl,
            lambda: (
                "holderIdentity"
                not in (kubectl.get(LEASES, NS, "spendgate-leader") or {"spec": {"x": 1}})["spec"]
            ),
            what="the lease released",
        )
        assert not elector.is_leader
        stop.set()
        await asyncio.wait_for(runner, 5)
