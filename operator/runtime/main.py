"""Running the operator: kopf, a health server, and extra services side by side.

``run(settings)`` is what ``spendgate operator`` calls. It connects to Redis, builds the
handler registry and runs, in one event loop:

- ``kopf.operator(...)`` -- cluster-wide, or the namespaces in ``settings.namespaces``; with
  kopf peering (``ClusterKopfPeering`` named ``settings.peering``) so that of several replicas
  exactly one runs the handlers, unless ``peering_standalone``;
- ``services`` on **every replica**: more long-running coroutines, each started with the
  settings -- by default (:func:`default_services`) the admission webhook, when its certificate
  and key files are configured;
- with ``settings.stripe``, the Stripe webhook receiver on every replica
  (:mod:`..stripe.wiring`);
- **leader election** on a Lease (:mod:`.leader`): the holder runs the singleton work --
  Stripe's processor, reconciliation, usage export, grace timer and budget import
  (:mod:`..stripe.budget_import`), and the Service bypass check (:mod:`..admission.services`);
- a health server on ``health_port``:

  ``/healthz``      liveness: the process and kopf are alive;
  ``/readyz``       readiness, the probe behind the webhook's Service: kopf has started and the
                    admission webhook listens. **Redis is not part of it**: admission needs no
                    Redis, and a Redis outage must not take the webhook (failurePolicy Fail)
                    and with it every opted-in pod creation down;
  ``/readyz/full``  for people and monitors: the above, plus Redis answering PING (503 if
                    not) and the Stripe integration's state;
  ``/metrics``      Prometheus (:mod:`.metrics`).

When any of them ends, the others are stopped; SIGTERM/SIGINT stop kopf gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import Any

import kopf
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from spendgate import redis_connect
from spendgate.config_store import ConfigStore
from spendgate.listening import describe
from spendgate.logs import redact

from ..admission.services import AdmissionService, BypassCheck
from ..alerts.sender import AlertSender
from ..budgets.audit import AuditLoop
from ..budgets.spend_watch import SpendWatch
from ..kube.client import KubeClient
from ..stripe.budget_import import TemplateFile, load_import_template
from ..stripe.wiring import StripeService
from . import metrics
from .handlers import LoginFn, Runtime, build_registry
from .health import Health, readiness_checks, serve_health
from .leader import LeaderElector, LeaderTask, LeaseConfig
from .listeners import Service, bind_ports
from .settings import OperatorSettings

log = logging.getLogger("spendgate.operator")


def default_services(settings: OperatorSettings) -> list[Service]:
    """Services every replica runs next to kopf: the admission webhook, when its certificate
    and key files are configured (the chart always mounts them)."""
    services: list[Service] = []
    if settings.webhook_cert_file and settings.webhook_key_file:
        services.append(AdmissionService())
    else:
        log.warning(
            "the admission webhook is disabled: no webhook certificate and key files"
            " (--webhook-cert-file, --webhook-key-file); no sidecar will be injected"
        )
    return services


def make_redis(settings: OperatorSettings) -> Any:
    """A client that fails fast: an unreachable Redis shows as RedisUnavailable within seconds.
    Any URL ``spendgate.redis_connect`` takes: single, Sentinel (``redis+sentinel://``) or
    Cluster (``redis_cluster``)."""
    return redis_connect.connect(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=5,
        connect_timeout_s=3,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        health_check_interval=15,
    )


def make_runtime(settings: OperatorSettings, redis_client: Any) -> Runtime:
    alerts = None
    if settings.alert_webhook_url:
        alerts = AlertSender(
            settings.alert_webhook_url,
            attempts=settings.alert_attempts,
            timeout_s=settings.alert_timeout_s,
        )
    return Runtime(
        settings=settings,
        store=ConfigStore(redis_client),
        kube=KubeClient(timeout_s=settings.kube_timeout_s),
        alerts=alerts,
    )


def leader_tasks(
    settings: OperatorSettings, runtime: Runtime, stripe: StripeService | None
) -> list[LeaderTask]:
    """The singleton work: Stripe's (when enabled), the Service bypass check, the audit and
    the spend watch (absorbed cost, abnormal spend)."""
    tasks: list[LeaderTask] = []
    if stripe is not None:
        tasks.append(stripe.run_leader)
    if settings.bypass_check_interval_s > 0:
        tasks.append(BypassCheck(settings, runtime.kube).run)
    if settings.audit_interval_s > 0:
        tasks.append(AuditLoop(runtime.store.redis, interval_s=settings.audit_interval_s).run)
    if settings.spend_watch_interval_s > 0:
        watch = SpendWatch(
            runtime.store.redis,
            runtime.kube,
            runtime.alerts,
            namespaces=settings.namespaces,
            interval_s=settings.spend_watch_interval_s,
            instance=identity_of(settings),
        )
        tasks.append(watch.run)
    return tasks


async def campaign(
    settings: OperatorSettings, kube: KubeClient, tasks: Sequence[LeaderTask], stop: asyncio.Event
) -> None:
    """Leader election (once kopf has logged in), running ``tasks`` while leading."""
    config = LeaseConfig(
        name=settings.lease_name,
        namespace=settings.lease_ns,
        identity=identity_of(settings),
        duration_s=settings.lease_duration_s,
        renew_deadline_s=settings.lease_renew_deadline_s,
        retry_s=settings.lease_retry_s,
    )
    elector = LeaderElector(kube, config, on_change=metrics.leader_changed)
    await kube.wait_configured()
    log.info(
        "campaigning for the leader lease", extra={"lease": f"{config.namespace}/{config.name}"}
    )
    await elector.run(tasks, stop)


def identity_of(settings: OperatorSettings) -> str:
    return settings.pod_name or socket.gethostname()


async def run_operator(
    settings: OperatorSettings,
    *,
    redis_client: Any = None,
    login: LoginFn | None = None,
    services: Sequence[Service] | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    health: bool = True,
) -> None:
    """Run until stopped (``stop_flag``, a signal, or a service or kopf ending)."""
    template: TemplateFile | None = None
    if settings.stripe is not None and settings.stripe.enabled and settings.stripe.import_enabled:
        # Before anything starts: an invalid import template stops the operator here.
        template = load_import_template(settings.stripe, settings.namespaces)
    services = default_services(settings) if services is None else list(services)
    listeners = bind_ports(settings, services, health=health)
    log.info(
        "operator starting",
        extra={
            "redis": redact(settings.redis_url),
            "redis_cluster": settings.redis_cluster,
            "namespaces": list(settings.namespaces) or "all",
            "health": describe(settings.health_host, settings.health_port) if health else None,
        },
    )
    own_redis = redis_client is None
    redis_client = redis_client if redis_client is not None else make_redis(settings)
    runtime = make_runtime(settings, redis_client)
    stripe: StripeService | None = None
    if settings.stripe is not None and settings.stripe.enabled:
        stripe = StripeService(
            settings.stripe,
            store=runtime.store,
            kube=runtime.kube,
            namespace=settings.namespace,
            identity=identity_of(settings),
            watched=settings.namespaces,
            template=template,
            webhook_sock=listeners.stripe,
        )
        runtime.stripe = stripe.links
    else:
        log.info("Stripe is disabled")
    registry = build_registry(runtime, login=login)
    ready = ready_flag or asyncio.Event()
    namespaces = list(settings.namespaces)
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=settings.peering_standalone,
            identity=settings.pod_name or None,  # type: ignore[arg-type]
            stop_flag=stop_flag,
            ready_flag=ready,
        ),
        name="kopf operator",
    )
    extra = [
        asyncio.create_task(service(settings), name=f"service {getattr(service, '__name__', '?')}")
        for service in services
    ]
    if stripe is not None:
        extra.append(asyncio.create_task(stripe.run(), name="service stripe"))
    tasks = leader_tasks(settings, runtime, stripe)
    companions = Companions(extra, settings.lease_duration_s, settings.shutdown_drain_s)
    if settings.leader_election and tasks:
        companions.elector = asyncio.create_task(
            campaign(settings, runtime.kube, tasks, companions.leader_stop), name="leader election"
        )
    # kopf's cleanup stops them (the Lease released), before kopf reaps leftover tasks.
    runtime.cleanups.append(companions.stop)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if health:
                checker = Health(
                    redis_client,
                    ready,
                    lambda: not operator.done(),
                    checks=[*readiness_checks(services), companions.readiness],
                    info=readiness_checks([stripe]),
                )
                assert listeners.health is not None
                await stack.enter_async_context(serve_health(checker, listeners.health))
                log.info("health endpoints listening", extra={"port": settings.health_port})
            done, _ = await asyncio.wait(
                [operator, *companions.tasks()], return_when=asyncio.FIRST_COMPLETED
            )
            if companions.stopping:
                await asyncio.wait([operator])  # kopf is shutting down: let it finish
            for task in done:
                if companions.stopping or task is operator or task.cancelled():
                    continue
                if task.exception() is None:
                    log.warning(
                        "a service ended; stopping the operator", extra={"service": task.get_name()}
                    )
    finally:
        runtime.stopping = True
        await companions.stop()
        operator.cancel()
        await asyncio.gather(operator, return_exceptions=True)
        if runtime.alerts is not None:
            await runtime.alerts.aclose()
        await runtime.kube.aclose()
        if own_redis:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await redis_client.aclose()
    for task in [operator, *companions.tasks()]:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class Companions:
    """The tasks beside kopf: services and the leader election. :meth:`stop` (idempotent)
    first ends the leader's work and releases the Lease, then -- after ``drain_s``, for the
    requests the API server or Stripe still route to a terminating pod -- stops the services."""

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


def run(settings: OperatorSettings, *, services: Sequence[Service] | None = None) -> None:
    """Blocking entry point for ``spendgate operator``."""
    asyncio.run(run_operator(settings, services=services))


__all__ = [
    "AdmissionService",
    "Service",
    "default_services",
    "leader_tasks",
    "make_redis",
    "make_runtime",
    "run",
    "run_operator",
]
