"""The sidecar application: app factory, health endpoints, lifecycle and ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from spendgate import redis_connect
from spendgate.backpressure import CallLimiter
from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.listening import bind_listener
from spendgate.logs import redact
from spendgate.script_channel import ClusterScriptChannel, ScriptChannel

from . import errors
from .config_cache import ConfigCache
from .front import context
from .front.access_log import ACCESS_LOGGER, SidecarAccessLogger
from .front.cors import ALLOWED_METHODS, Cors
from .front.protocol import GuardedAppRunner
from .front.targets import refuse_target
from .hold_sweep import HoldSweep
from .journal import Journal
from .metrics import SidecarMetrics
from .probes import create_probe_app
from .proxy import Proxy
from .reconcile import PendingCharges
from .settings import SidecarSettings

log = logging.getLogger("spendgate.sidecar")
POOL_HEADROOM = 16


def connect_redis(settings: SidecarSettings) -> Any:
    # One quick retry at most: on the hot path a slow failure is worse than a fast one, and
    # every ledger script is idempotent, so a retried call cannot double-charge.
    return redis_connect.connect(
        settings.redis_url,
        cluster=settings.cluster,
        timeout_s=settings.redis_timeout_s,
        connect_timeout_s=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=10,
        # The limiter below keeps ledger calls under the pool size; the headroom is for the
        # pub/sub connection and configuration reads.
        max_connections=settings.redis_pool_size + POOL_HEADROOM,
    )


def pipelined(settings: SidecarSettings) -> bool:
    """The hot-path scripts go over pipelined channels to a plain single Redis or to each
    Cluster primary; with Sentinel (the primary moves) they stay on redis-py."""
    return settings.pipelined_scripts and redis_connect.is_plain_url(settings.redis_url)


def script_channel(settings: SidecarSettings) -> ScriptChannel | ClusterScriptChannel | None:
    if not pipelined(settings):
        return None
    kind = ClusterScriptChannel if settings.cluster else ScriptChannel
    return kind(settings.redis_url, timeout_s=settings.redis_timeout_s)


class Sidecar:
    """Everything one running sidecar owns."""

    def __init__(self, settings: SidecarSettings, redis: Any | None = None) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else connect_redis(settings)
        self.metrics = SidecarMetrics()
        self.channel = script_channel(settings)
        self.limiter = CallLimiter(settings.redis_pool_size, wait_s=settings.redis_timeout_s)
        self.ledger = Ledger(self.redis, channel=self.channel, limiter=self.limiter)
        self.sweep = HoldSweep(self.redis, self.ledger, interval_ms=settings.hold_sweep_interval_ms)
        self.config = ConfigCache(
            ConfigStore(self.redis, self.ledger),
            settings.pricebook,
            refresh_s=settings.key_refresh_s,
        )
        # Replayed before anything is served; JournalError (not writable, in use) ends the start.
        self.journal = Journal(settings.journal_dir or None)
        self.replayed = self.journal.open()
        self.pending = PendingCharges(
            self.ledger, self.metrics, self.journal, pod=settings.pod or socket.gethostname()
        )
        self.session: aiohttp.ClientSession | None = None
        self.proxy: Proxy | None = None
        self.scripts_loaded = False

    async def start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        self.proxy = Proxy(
            self.settings, self.ledger, self.config, self.metrics, self.pending, self.session
        )
        try:
            await self.ledger.load_scripts()
            self.scripts_loaded = True
            await self.config.load()
        except Exception as error:  # Redis may come later; readiness says so meanwhile
            log.warning(
                "Redis not ready at start",
                extra={"redis": redact(self.settings.redis_url), "error": repr(error)},
            )  # fmt: skip
        self.config.start()
        self.pending.start()
        self.sweep.start()
        await self.config.wait_subscribed(within_s=2.0)
        log.info(
            "sidecar started",
            extra={
                "upstream": self.settings.upstream,
                "redis": redact(self.settings.redis_url),
                "redis_cluster": self.settings.cluster,
                "pricebook": self.settings.pricebook,
                "fail_mode": self.settings.fail_mode.value,
                "journal": self.settings.journal_dir or None,
                "journal_replayed": len(self.pending),
                "keys": len(self.config.keys),
            },
        )

    async def stop(self, app: web.Application) -> None:
        """Runs after aiohttp has drained in-flight handlers: settle, then close."""
        if self.proxy is not None and self.proxy.background:
            await asyncio.wait(self.proxy.background, timeout=self.settings.drain_timeout_s)
        await self.sweep.stop()
        await self.pending.stop(timeout_s=self.settings.drain_timeout_s)
        if self.proxy is not None:
            await self.proxy.customer_view.refusals.stop()
        await self.config.stop()
        if self.session is not None:
            await self.session.close()
        if self.channel is not None:
            await self.channel.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        log.info("sidecar stopped")

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            await self.redis.ping()
            checks["redis"] = "ok"
            if not self.scripts_loaded:
                await self.ledger.load_scripts()
                self.scripts_loaded = True
            if not self.config.loaded:
                await self.config.load()
        except Exception as error:
            checks["redis"] = f"unreachable: {type(error).__name__}"
        checks["scripts"] = "loaded" if self.scripts_loaded else "missing"
        checks["pricebook"] = "loaded" if self.config.pricebook else "missing"
        checks["pending_settlements"] = len(self.pending)
        checks["journal_pending"] = len(self.journal.pending)
        ok = checks["redis"] == "ok" and self.scripts_loaded and self.config.pricebook is not None
        return ok, checks


SIDECAR_KEY = web.AppKey("sidecar", Sidecar)
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})  # a tunnel and a mirror: never proxied


async def _proxy(request: web.Request) -> web.StreamResponse:
    proxy = request.app[SIDECAR_KEY].proxy
    assert proxy is not None, "sidecar not started"
    return await proxy.handle(request)


def create_app(settings: SidecarSettings, redis: Any | None = None) -> web.Application:
    """The customer-facing application (probes and metrics: :func:`create_probe_app`)."""
    cors = Cors(settings.cors_origins)

    @web.middleware
    async def front_door(request: web.Request, handler: Any) -> web.StreamResponse:
        record = context.begin(request)
        refused = refuse_target(request)
        if refused is not None:
            record.outcome = "bad_target"
            return refused
        if request.method == "OPTIONS":
            record.outcome = "preflight"
            return cors.preflight(request)
        if request.method in REFUSED_METHODS:
            record.outcome = "bad_method"
            return errors.error_response(
                405, "invalid_request_error", "method_not_allowed",
                f"{request.method} is not served here.", headers={"Allow": ALLOWED_METHODS},
            )  # fmt: skip
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own answers, in our shape
            if error.status < 400:
                raise
            record.outcome = record.outcome or "refused"
            return errors.error_response(
                error.status, errors.error_type_for(error.status), "http_error",
                error.reason + ".", headers={k: v for k, v in error.headers.items()
                                             if k.lower() in ("allow", "retry-after")},
            )  # fmt: skip

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = context.SERVER_BANNER
        record = context.of(request)
        if record is not None:
            response.headers.setdefault(context.REQUEST_ID_HEADER, record.request_id)
        cors.decorate(request, response)

    # The body limit is enforced by the proxy with a clear 413; aiohttp's own is a backstop.
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[front_door])
    sidecar = Sidecar(settings, redis)
    app[SIDECAR_KEY] = sidecar
    app.on_startup.append(sidecar.start)
    app.on_cleanup.append(sidecar.stop)
    app.on_response_prepare.append(stamp)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    context.install_request_id_filter("spendgate.sidecar", "spendgate.sidecar.reconcile")
    return app


def runner_options(settings: SidecarSettings) -> dict[str, Any]:
    """Server options of the customer-facing port (also used by tests)."""
    return {
        "shutdown_timeout": settings.drain_timeout_s,
        "access_log_class": SidecarAccessLogger,
        "access_log": logging.getLogger(ACCESS_LOGGER),
        "auto_decompress": False,  # the proxy decodes bodies itself, within its limits
        "handle_signals": False,
    }


async def run(settings: SidecarSettings, *, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # Bound before anything starts: a port in use is a ListenError, never "started" first.
    sock = bind_listener(settings.listen_host, settings.listen_port, what="the sidecar")
    try:
        probe_sock = bind_listener(settings.probe_host, settings.probe_port, what="the probes")
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(settings)  # replays the journal: JournalError if it is unusable
    except BaseException:
        sock.close()
        probe_sock.close()
        raise
    context.install_request_id_filter(handlers=True)
    runner = GuardedAppRunner(app, **runner_options(settings))
    await runner.setup()
    probes = GuardedAppRunner(
        create_probe_app(app[SIDECAR_KEY]), access_log=None, handle_signals=False
    )
    await probes.setup()
    try:
        await web.SockSite(runner, sock).start()
        await web.SockSite(probes, probe_sock).start()
        log.info(
            "listening",
            extra={"host": settings.listen_host, "port": settings.listen_port,
                   "probe_host": settings.probe_host, "probe_port": settings.probe_port},
        )  # fmt: skip
        await stop.wait()
        log.info("shutting down: draining in-flight requests")
    finally:
        await runner.cleanup()
        await probes.cleanup()


def serve(settings: SidecarSettings) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))
