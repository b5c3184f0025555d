"""Running the operator: kopf, a health server, and extra services side by side.

``run(settings)`` is what ``spendgate operator`` calls. It connects to Redis, builds the
handler registry and runs, in one event loop:

- ``kopf.operator(...)`` -- cluster-wide, or the namespaces in ``settings.namespaces``; with
  kopf peering (``ClusterKopfPeering`` named ``settings.peering``) so that of several replicas
  exactly one reconciles, unless ``peering_standalone``;
- a health server on ``health_port``: ``/healthz`` (the process and kopf are alive) and
  ``/readyz`` (kopf has started and Redis answers PING) -- ready on every replica, the
  paused ones included, since all of them serve admission;
- ``services``: more long-running coroutines, each started with the settings. **This is the
  hook for the admission webhook server** (served by every replica, not only the active one):
  see :func:`default_services`.

When any of them ends, the others are stopped; SIGTERM/SIGINT stop kopf gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import kopf
import redis.asyncio
import redis.asyncio.cluster
from aiohttp import web
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from spendgate.config_store import ConfigStore
from spendgate.logs import redact

from .alerts import AlertSender
from .handlers import LoginFn, Runtime, build_registry
from .kube import KubeClient
from .settings import OperatorSettings

log = logging.getLogger("spendgate.operator")

Service = Callable[[OperatorSettings], Coroutine[Any, Any, None]]


def default_services(settings: OperatorSettings) -> list[Service]:
    """Services every replica runs next to kopf.

    ADMISSION HOOK: the mutating webhook (issue 3, operator/admission.py) plugs in here, e.g.
    ``if settings.webhook_cert_file: services.append(serve_admission)`` with a coroutine
    ``serve_admission(settings) -> None`` that serves until cancelled.
    """
    services: list[Service] = []
    return services


def make_redis(settings: OperatorSettings) -> Any:
    """A client that fails fast: an unreachable Redis shows as RedisUnavailable within seconds."""
    options: dict[str, Any] = {
        "socket_connect_timeout": 3,
        "socket_timeout": 5,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "health_check_interval": 15,
    }
    if settings.redis_cluster:
        options.pop("health_check_interval")
        return redis.asyncio.cluster.RedisCluster.from_url(settings.redis_url, **options)
    return redis.asyncio.Redis.from_url(settings.redis_url, **options)


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


class Health:
    """``/healthz`` and ``/readyz``; ``ready`` is kopf's ready flag."""

    def __init__(self, redis_client: Any, ready: asyncio.Event, alive: Callable[[], bool]) -> None:
        self.redis = redis_client
        self.ready = ready
        self.alive = alive

    async def healthz(self, _request: web.Request) -> web.Response:
        if not self.alive():
            return web.json_response({"status": "stopped"}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        problems = []
        if not self.ready.is_set():
            problems.append("kopf has not started")
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as error:
            problems.append(f"Redis: {type(error).__name__}: {redact(str(error))}")
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app


@contextlib.asynccontextmanager
async def serve_health(health: Health, host: str, port: int) -> Any:
    runner = web.AppRunner(health.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()


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
    own_redis = redis_client is None
    redis_client = redis_client if redis_client is not None else make_redis(settings)
    runtime = make_runtime(settings, redis_client)
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
        for service in (default_services(settings) if services is None else services)
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            if health:
                checker = Health(redis_client, ready, lambda: not operator.done())
                await stack.enter_async_context(
                    serve_health(checker, settings.health_host, settings.health_port)
                )
                log.info("health endpoints listening", extra={"port": settings.health_port})
            done, _ = await asyncio.wait([operator, *extra], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not operator and task.exception() is None:
                    log.warning(
                        "a service ended; stopping the operator", extra={"service": task.get_name()}
                    )
    finally:
        runtime.stopping = True
        for task in [*extra, operator]:
            task.cancel()
        await asyncio.gather(*extra, operator, return_exceptions=True)
        if runtime.alerts is not None:
            await runtime.alerts.aclose()
        await runtime.kube.aclose()
        if own_redis:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await redis_client.aclose()
    for task in [operator, *extra]:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def run(settings: OperatorSettings, *, services: Sequence[Service] | None = None) -> None:
    """Blocking entry point for ``spendgate operator``."""
    asyncio.run(run_operator(settings, services=services))


__all__ = [
    "Health",
    "Service",
    "default_services",
    "make_redis",
    "make_runtime",
    "run",
    "run_operator",
]
