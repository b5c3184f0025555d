"""Leader election on a ``coordination.k8s.io/v1`` Lease, the standard Kubernetes mechanism
(the one client-go's ``leaderelection`` package and kube-controller-manager use).

The holder runs kopf's handlers and the singleton work (operator/runtime/leading.py); every
replica serves admission, the Stripe receiver and health either way:

- **acquire**: the Lease is created if absent; taken over when free (no holder) or expired. A
  replica judges expiry by its *own* clock: the holder's record (holder, renewTime,
  resourceVersion) must stay unchanged for ``leaseDurationSeconds`` since this replica first saw
  it. Clocks of different nodes are never compared.
- **renew** every ``retry_s`` while leading. Every write is a merge patch carrying the
  ``resourceVersion`` that was read, so the API server applies it only if nobody wrote in
  between (HTTP 409 otherwise): two replicas can never both believe they acquired it.
- **step down** when a renewal finds another holder, or when none succeeded for
  ``renew_deadline_s`` (shorter than the lease duration, so the work has stopped before any
  other replica may take over), or when the work itself fails; and on shutdown.
- **release** on a clean step-down: the holder is cleared (and the duration set to 1 s), so
  another replica takes over at its next attempt instead of waiting for expiry.

The work is a list of coroutines ``task(stop: asyncio.Event)``: started together when this
replica becomes leader, told to stop (``stop`` set, then cancelled after a short grace) when it
is no longer. Holder identity is the pod name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from ..kube.client import Conflict

log = logging.getLogger("spendgate.operator.leader")

LeaderTask = Callable[[asyncio.Event], Awaitable[None]]


class LeadershipLost(RuntimeError):
    """This replica led and no longer does (its Lease was taken, not renewed in time, or its
    work ended); raised by an elector that does not ``rejoin``."""


class LeaseApi(Protocol):
    """What the elector needs of the API (:class:`~spendgate.operator.kube.client.KubeClient`)."""

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def patch_lease(
        self, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election needs an identity (the pod name)")
        if not 0 < self.retry_s < self.renew_deadline_s < self.duration_s:
            raise ValueError("leader election needs retry_s < renew_deadline_s < duration_s")


def micro_time(now: datetime | None = None) -> str:
    """Kubernetes ``MicroTime``: RFC 3339 with microseconds, UTC."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: LeaseApi,
        config: LeaseConfig,
        *,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rejoin: bool = True,
        stop_grace_s: float | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.on_change = on_change
        self.clock = clock
        # False: after leading once, raise LeadershipLost instead of campaigning again.
        self.rejoin = rejoin
        # How long the work may take to stop on shutdown (nobody takes over meanwhile: the
        # Lease is still ours); on a loss it is half the margin before the Lease expires.
        self.stop_grace_s = stop_grace_s
        self.is_leader = False
        self._work_stop: asyncio.Event | None = None  # the running work's stop event
        self._workers: list[asyncio.Task[None]] = []
        self._observed: tuple[Any, ...] | None = None  # the holder's record as last seen
        self._observed_at = 0.0  # when (our clock) that record was first seen
        self._version: str | None = None  # resourceVersion of the Lease we last wrote

    # ------------------------------------------------------------------ one attempt

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        record = (
            spec.get("holderIdentity") or "",
            spec.get("renewTime"),
            (lease.get("metadata") or {}).get("resourceVersion"),
        )
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()

    def _spec(self, old: dict[str, Any] | None) -> dict[str, Any]:
        now = micro_time()
        spec: dict[str, Any] = {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": max(1, round(self.config.duration_s)),
            "renewTime": now,
        }
        if old is None or (old.get("holderIdentity") or "") != self.config.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int((old or {}).get("leaseTransitions") or 0) + (
                1 if old is not None else 0
            )
        return spec

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True while this replica holds the Lease. API errors propagate."""
        cfg = self.config
        lease = await self.api.get_lease(cfg.namespace, cfg.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": self._spec(None),
            }
            try:
                created = await self.api.create_lease(cfg.namespace, body)
            except Conflict:
                return False  # another replica was faster
            self._observe(created)
            self._version = (created.get("metadata") or {}).get("resourceVersion")
            return True
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or cfg.duration_s)
        if holder and holder != cfg.identity and self.clock() < self._observed_at + duration:
            return False  # held, and renewed within its duration as far as we can tell
        version = (lease.get("metadata") or {}).get("resourceVersion")
        patch = {"metadata": {"resourceVersion": version}, "spec": self._spec(spec)}
        try:
            updated = await self.api.patch_lease(cfg.namespace, cfg.name, patch)
        except Conflict:
            return False  # somebody wrote in between: look again next time
        if updated is None:
            return False  # deleted meanwhile: created again at the next attempt
        self._observe(updated)
        self._version = (updated.get("metadata") or {}).get("resourceVersion")
        return True

    async def release(self) -> None:
        """Clear the holder if it is still this replica (best effort, bounded)."""
        cfg = self.config
        if self._version is None:
            return
        version, self._version = self._version, None
        patch = {
            "metadata": {"resourceVersion": version},
            "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": micro_time()},
        }
        try:
            async with asyncio.timeout(max(1.0, cfg.duration_s - cfg.renew_deadline_s)):
                await self.api.patch_lease(cfg.namespace, cfg.name, patch)
            log.info("leader lease released", extra={"lease": cfg.name})
        except Conflict:
            pass  # no longer ours
        except Exception as error:
            log.warning("could not release the leader lease", extra={"error": repr(error)})

    # ------------------------------------------------------------------ the loop

    def _set(self, leading: bool) -> None:
        if leading == self.is_leader:
            return
        self.is_leader = leading
        log.info(
            "became the leader" if leading else "no longer the leader",
            extra={"lease": f"{self.config.namespace}/{self.config.name}"},
        )
        if self.on_change is not None:
            self.on_change(leading)

    async def run(self, tasks: Sequence[LeaderTask], stop: asyncio.Event) -> None:
        """Campaign until ``stop``; run ``tasks`` whenever this replica is the leader."""
        cfg = self.config
        while not stop.is_set():
            try:
                leading = await self.try_acquire_or_renew()
            except Exception as error:
                log.warning("leader election: the API failed", extra={"error": repr(error)})
                leading = False
            pause = cfg.retry_s
            if leading:
                healthy = await self._lead(tasks, stop)
                if not self.rejoin and not stop.is_set():
                    why = "its work ended" if not healthy else "the Lease is no longer ours"
                    raise LeadershipLost(f"stopped leading: {why}")
                if not healthy:
                    pause = cfg.duration_s  # the work failed here: give another replica a chance
            await _wait(stop, pause * random.uniform(1.0, 1.2))

    async def hand_over(self, exclude: Sequence[asyncio.Task[Any] | None] = ()) -> None:
        """Stop the leader's work now but for ``exclude`` (the task calling this, which is
        ending anyway: kopf, from its cleanup) and release the Lease, so a standby takes over
        at once. Idempotent; the rest of the step-down follows when the work has ended."""
        if self._work_stop is None:
            return
        self._work_stop.set()
        others = [w for w in self._workers if w not in exclude]
        await _finish(others, grace_s=self._grace(stopping=True))
        await asyncio.shield(self.release())

    def _grace(self, *, stopping: bool) -> float:
        cfg = self.config
        on_loss = max(0.5, cfg.duration_s - cfg.renew_deadline_s) / 2
        return self.stop_grace_s if stopping and self.stop_grace_s is not None else on_loss

    async def _lead(self, tasks: Sequence[LeaderTask], stop: asyncio.Event) -> bool:
        """Lead until stopped or no longer the leader; False if the work failed."""
        cfg = self.config
        self._set(True)
        work_stop = self._work_stop = asyncio.Event()
        workers = self._workers = [
            asyncio.create_task(task(work_stop), name=f"leader {getattr(task, '__name__', task)}")
            for task in tasks
        ]
        renewed = self.clock()
        ours, healthy = True, True
        try:
            while not stop.is_set():
                await _wait(stop, cfg.retry_s, workers)
                if stop.is_set():
                    break
                if failed := [w for w in workers if w.done()]:
                    log.error(
                        "leader work ended; stepping down",
                        extra={"task": failed[0].get_name()},
                        exc_info=failed[0].exception() if not failed[0].cancelled() else None,
                    )
                    healthy = False
                    break
                try:
                    if await self.try_acquire_or_renew():
                        renewed = self.clock()
                        continue
                    ours = False
                    log.warning("leader lease taken by another replica; stepping down")
                    break
                except Exception as error:
                    if self.clock() - renewed >= cfg.renew_deadline_s:
                        log.error(
                            "could not renew the leader lease in time; stepping down",
                            extra={"error": repr(error)},
                        )
                        break
        finally:
            self._set(False)
            if not ours:
                self._version = None  # nothing to release
            work_stop.set()
            await _finish(workers, grace_s=self._grace(stopping=stop.is_set()))
            self._work_stop, self._workers = None, []
            await asyncio.shield(self.release())
        return healthy


async def _wait(
    stop: asyncio.Event, seconds: float, tasks: Sequence[asyncio.Task[Any]] = ()
) -> None:
    """Sleep ``seconds``, less if ``stop`` is set or one of ``tasks`` ends."""
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([waiter, *tasks], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter


async def _finish(tasks: Sequence[asyncio.Task[Any]], grace_s: float) -> None:
    """Let ``tasks`` end by themselves for ``grace_s`` (their stop event is set), then cancel."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["LeaderElector", "LeaderTask", "LeadershipLost", "LeaseApi", "LeaseConfig", "micro_time"]
