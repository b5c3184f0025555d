"""Running the operator: one replica's servers, and -- on the leader -- kopf and the loops.

``run(settings)`` is what ``spendgate operator`` calls. It connects to Redis, builds the
handler registry and runs, in one event loop:

- on **every replica**, from start-up: ``services`` (by default, :func:`default_services`, the
  admission webhook when its certificate and key files are configured), the Stripe webhook
  receiver with ``settings.stripe`` (:mod:`..stripe.wiring`), and the health server
  (:mod:`.health`: ``/healthz``, ``/readyz`` -- never Redis -- ``/readyz/full``, ``/metrics``);
- **one election**, on a Lease (:mod:`.leading`, :mod:`.leader`): the holder runs kopf's
  handlers (``kopf.operator``, standalone: no kopf peering) and the singleton work -- Stripe's
  processor, reconciliation, usage export, grace timer and budget import
  (:mod:`..stripe.budget_import`), the Service bypass check (:mod:`..admission.services`),
  the audit and the spend watch (:mod:`..budgets`). A replica that loses the Lease stops them
  and ``run`` exits 1 (Kubernetes restarts it as a standby).

When any of them ends, the others are stopped; SIGTERM/SIGINT stop the replica in order: the
leader's work (kopf's cleanup releases the Lease), then after ``shutdown_drain_s`` the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import Any

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
from ..kube.api_checks import ApiChecks
from ..kube.client import KubeClient
from ..kube.credentials import CredentialsError, load_connection
from ..kube.status_writer import StatusWriter
from ..stripe.budget_import import TemplateFile, load_import_template
from ..stripe.wiring import StripeService
from .handlers import LoginFn, Runtime, build_registry
from .health import Health, readiness_checks, serve_health
from .leader import LeadershipLost, LeaderTask
from .leading import Companions, KopfRunner, Signals, campaign, make_elector, without_election
from .listeners import Service, bind_ports
from .settings import OperatorSettings

log = logging.getLogger("spendgate.operator")


def default_services(settings: OperatorSettings, kube: KubeClient | None = None) -> list[Service]:
    """Services every replica runs next to kopf: the admission webhook, when its certificate
    and key files are configured (the chart always mounts them)."""
    services: list[Service] = []
    if settings.webhook_cert_file and settings.webhook_key_file:
        services.append(AdmissionService(kube))
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


def make_kube(settings: OperatorSettings, *, login: LoginFn | None = None) -> KubeClient:
    """The operator's one API client. Without a ``login`` override (tests) it loads its
    credentials itself (:func:`load_credentials`), and kopf logs in with the same ones."""
    return KubeClient(
        timeout_s=settings.kube_timeout_s, loader=None if login is not None else load_connection
    )


def load_credentials(kube: KubeClient) -> None:
    """Load the credentials now -- in-cluster, else the kubeconfig (CredentialsError if none)."""
    if kube.loader is not None:
        info = kube.login()
        log.info("Kubernetes API", extra={"server": str(info.server), "credentials": kube.source})


def make_runtime(
    settings: OperatorSettings, redis_client: Any, kube: KubeClient | None = None
) -> Runtime:
    alerts = None
    if settings.alert_webhook_url:
        alerts = AlertSender(
            settings.alert_webhook_url,
            attempts=settings.alert_attempts,
            timeout_s=settings.alert_timeout_s,
        )
    kube = kube if kube is not None else KubeClient(timeout_s=settings.kube_timeout_s)
    return Runtime(
        settings=settings,
        store=ConfigStore(redis_client),
        kube=kube,
        status=StatusWriter(kube, instance=identity_of(settings)),
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
    """Run until stopped (``stop_flag``, SIGINT/SIGTERM, or a service or kopf ending); raises
    :class:`~.leader.LeadershipLost` when this replica led and lost the Lease. ``ready_flag``
    is set when kopf's handlers have started here (on the leader)."""
    template: TemplateFile | None = None
    if settings.stripe is not None and settings.stripe.enabled and settings.stripe.import_enabled:
        # Before anything starts: an invalid import template stops the operator here.
        template = load_import_template(settings.stripe, settings.namespaces)
    kube = make_kube(settings, login=login)
    services = default_services(settings, kube) if services is None else list(services)
    for service in services:
        if isinstance(service, AdmissionService) and service.api is None:
            service.api = kube
    listeners = bind_ports(settings, services, health=health)
    try:
        load_credentials(kube)
    except CredentialsError:
        listeners.close()
        for service in services:
            release = getattr(service, "release", None)
            if callable(release):
                release()
        raise
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
    runtime = make_runtime(settings, redis_client, kube)
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
    stop = stop_flag if stop_flag is not None else asyncio.Event()
    signals = Signals(stop)
    signals.install()
    kopf_runner = KopfRunner(settings, registry, ready_flag or asyncio.Event(), signals)
    started = asyncio.Event()  # every replica is ready once its servers listen, leader or not
    extra = [
        asyncio.create_task(service(settings), name=f"service {getattr(service, '__name__', '?')}")
        for service in services
    ]
    if stripe is not None:
        extra.append(asyncio.create_task(stripe.run(), name="service stripe"))
    api_checks = ApiChecks(runtime.kube, settings.namespaces)
    extra.append(asyncio.create_task(api_checks.run(asyncio.Event()), name="service api checks"))
    drain = settings.shutdown_drain_s
    companions = Companions(extra, settings.lease_duration_s + 5, drain)
    if settings.leader_election:
        elector = make_elector(runtime, identity_of(settings))
        work = [kopf_runner.run, *leader_tasks(settings, runtime, stripe)]
        leading = campaign(runtime, login, elector, work, companions.leader_stop)

        async def hand_over() -> None:
            await elector.hand_over(exclude=[kopf_runner.task])

        # kopf's cleanup (its handlers have stopped) stops the rest and releases the Lease.
        runtime.cleanups.append(hand_over)
    else:
        leading = without_election(runtime, login, kopf_runner, companions.leader_stop)
    companions.elector = asyncio.create_task(leading, name="leader election")
    stopped = asyncio.create_task(stop.wait(), name="stop flag")
    try:
        async with contextlib.AsyncExitStack() as stack:
            if health:
                checker = Health(
                    redis_client,
                    started,
                    companions.alive,
                    checks=[
                        *readiness_checks(services),
                        api_checks.readiness,
                        companions.readiness,
                    ],
                    info=readiness_checks([stripe]),
                )
                assert listeners.health is not None
                await stack.enter_async_context(serve_health(checker, listeners.health))
                log.info("health endpoints listening", extra={"port": settings.health_port})
            started.set()
            done, _ = await asyncio.wait(
                [stopped, *companions.tasks()], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is stopped or task.cancelled():
                    continue
                if task.exception() is None:
                    log.warning(
                        "a service ended; stopping the operator", extra={"service": task.get_name()}
                    )
    finally:
        runtime.stopping = True
        stopped.cancel()
        await companions.stop()
        signals.remove()
        if runtime.alerts is not None:
            await runtime.alerts.aclose()
        await runtime.kube.aclose()
        if own_redis:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await redis_client.aclose()
    for task in companions.tasks():
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def run(settings: OperatorSettings, *, services: Sequence[Service] | None = None) -> None:
    """Blocking entry point for ``spendgate operator``; exit status 1 when this replica lost
    the leadership (Kubernetes restarts it as a standby); no credentials is one clear line."""
    try:
        asyncio.run(run_operator(settings, services=services))
    except LeadershipLost as error:
        log.error("%s; exiting so that this replica restarts as a standby", error)
        raise SystemExit(1) from None
    except CredentialsError as error:
        raise SystemExit(f"spendgate operator: {error}") from None


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
