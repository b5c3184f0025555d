"""Who runs what: one election (a ``coordination.k8s.io/v1`` Lease, :mod:`.leader`) decides
which replica runs kopf's handlers *and* the singleton loops; every replica serves health, the
admission webhook and the Stripe receiver from start-up (docs/operator.md, "High availability").

- :class:`KopfRunner` is kopf as one more leader task: ``kopf.operator`` standalone (no kopf
  peering), stopped through its ``stop_flag``. kopf installs its own SIGINT/SIGTERM handlers
  when it starts; once it is ready :class:`Signals` puts the operator's back, so a signal
  always takes the one path of an orderly shutdown.
- :func:`campaign` logs in (the credentials kopf would use), then campaigns. A replica leads
  at most once: when it loses the Lease it stops kopf and its loops and the elector raises
  :class:`~.leader.LeadershipLost`; ``run`` exits 1 and Kubernetes restarts the pod, a clean
  standby. kopf cannot be started again in the event loop it ran in (at exit it cancels every
  task created after it started, and its signal handlers stay), and a fresh process is what
  controller-runtime and kube-controller-manager do as well.
- :class:`Companions` stops it all in order on shutdown: the leader's work first (kopf's
  cleanup hands the Lease over at once), the servers after ``drain_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import kopf

from . import metrics
from .handlers import LoginFn, Runtime, log_in
from .leader import LeaderElector, LeaderTask, LeaseConfig
from .settings import OperatorSettings

log = logging.getLogger("spendgate.operator")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """SIGINT/SIGTERM set ``stop`` (main thread only: elsewhere signals are not ours)."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)
        self.installed = True

    def _received(self, sig: signal.Signals) -> None:
        log.info("signal received; stopping", extra={"signal": sig.name})
        self.stop.set()

    def remove(self) -> None:
        if self.installed:
            loop = asyncio.get_running_loop()
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
            self.installed = False


class KopfRunner:
    """kopf's handlers as a leader task (``run(stop)``); ``ready`` is set once kopf has
    started (its startup handlers done)."""

    def __init__(
        self,
        settings: OperatorSettings,
        registry: kopf.OperatorRegistry,
        ready: asyncio.Event,
        signals: Signals,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.ready = ready
        self.signals = signals
        self.task: asyncio.Task[Any] | None = None  # the task running kopf, while it runs

    async def run(self, stop: asyncio.Event) -> None:
        self.task = asyncio.current_task()
        started = asyncio.Event()
        # Created before kopf starts, so kopf leaves it alone when it exits.
        watcher = asyncio.create_task(self._when_started(started), name="kopf started")
        namespaces = list(self.settings.namespaces)
        log.info("starting kopf's handlers", extra={"namespaces": namespaces or "all"})
        try:
            await kopf.operator(
                registry=self.registry,
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=True,
                stop_flag=stop,
                ready_flag=started,
            )
        finally:
            self.task = None
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        log.info("kopf's handlers stopped")

    async def _when_started(self, started: asyncio.Event) -> None:
        await started.wait()
        await asyncio.sleep(0)  # kopf's signal handlers are in place by now
        if self.signals.installed:
            self.signals.remove()
            self.signals.install()
        self.ready.set()


def make_elector(runtime: Runtime, identity: str) -> LeaderElector:
    settings = runtime.settings
    config = LeaseConfig(
        name=settings.lease_name,
        namespace=settings.lease_ns,
        identity=identity,
        duration_s=settings.lease_duration_s,
        renew_deadline_s=settings.lease_renew_deadline_s,
        retry_s=settings.lease_retry_s,
    )
    return LeaderElector(
        runtime.kube,
        config,
        on_change=metrics.leader_changed,
        rejoin=False,
        stop_grace_s=settings.lease_duration_s,
    )


async def campaign(
    runtime: Runtime,
    login: LoginFn | None,
    elector: LeaderElector,
    tasks: Sequence[LeaderTask],
    stop: asyncio.Event,
) -> None:
    """Log in, then campaign; ``tasks`` (kopf first) run while this replica leads."""
    await log_in(runtime, login)
    lease = f"{elector.config.namespace}/{elector.config.name}"
    log.info("campaigning for the leader lease", extra={"lease": lease})
    await elector.run(tasks, stop)


async def without_election(
    runtime: Runtime, login: LoginFn | None, kopf_runner: KopfRunner, stop: asyncio.Event
) -> None:
    """``--no-leader-election``: kopf's handlers at once, no singleton work (one replica)."""
    await log_in(runtime, login)
    log.warning("leader election is off: kopf runs here, no singleton work runs anywhere")
    await kopf_runner.run(stop)


class Companions:
    """The tasks of a replica: services, and the leader election with the leader's work.
    :meth:`stop` (idempotent) first ends the leader's work and releases the Lease, then --
    after ``drain_s``, for the requests the API server or Stripe still route to a
    terminating pod -- stops the services."""

    def __init__(
        self, services: list[asyncio.Task[None]], timeout_s: float, drain_s: float = 0.0
    ) -> None:
        self.services = services
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        self.elector: asyncio.Task[None] | None = None
        self.leader_stop = asyncio.Event()
        self.stopping = False
        self._stopped: asyncio.Future[None] | None = None

    def readiness(self) -> str | None:
        return "the operator is stopping" if self.stopping else None

    def alive(self) -> bool:
        """False once the leader's work ended on its own (the process is about to exit)."""
        return self.elector is None or not self.elector.done()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [*self.services, *([self.elector] if self.elector is not None else [])]

    async def stop(self) -> None:
        self.stopping = True
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            if self.elector is not None:
                self.leader_stop.set()
                await asyncio.wait([self.elector], timeout=self.timeout_s)
                self.elector.cancel()
            if self.services and self.drain_s > 0:
                await asyncio.wait(self.services, timeout=self.drain_s)
            for task in self.services:
                task.cancel()
            await asyncio.gather(*self.tasks(), return_exceptions=True)
        finally:
            self._stopped.set_result(None)


__all__ = [
    "Companions",
    "KopfRunner",
    "Signals",
    "campaign",
    "make_elector",
    "without_election",
]
