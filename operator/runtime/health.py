"""The health server every replica runs on ``health_port``: ``/healthz``, ``/readyz``,
``/readyz/full`` and ``/metrics`` (what each answers: docs/operator.md, "Health endpoints")."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from spendgate.logs import redact

from . import metrics

Check = Callable[[], "str | None"]  # None: fine; else what is wrong


def readiness_checks(parts: Sequence[Any]) -> list[Check]:
    return [part.readiness for part in parts if callable(getattr(part, "readiness", None))]


class Health:
    """``/healthz``, ``/readyz``, ``/readyz/full`` and ``/metrics``; ``ready`` is set once the
    replica's servers listen (leader or standby), ``checks`` the services' own readiness (the
    admission webhook listens), ``info`` what ``/readyz/full`` reports besides (Stripe)."""

    def __init__(
        self,
        redis_client: Any,
        ready: asyncio.Event,
        alive: Callable[[], bool],
        *,
        checks: Sequence[Check] = (),
        info: Sequence[Check] = (),
    ) -> None:
        self.redis = redis_client
        self.ready = ready
        self.alive = alive
        self.checks = list(checks)
        self.info = list(info)

    async def healthz(self, _request: web.Request) -> web.Response:
        if not self.alive():
            return web.json_response({"status": "stopped"}, status=503)
        return web.json_response({"status": "ok"})

    def _problems(self) -> list[str]:
        problems = [] if self.ready.is_set() else ["the operator has not started"]
        return problems + [p for check in self.checks if (p := check()) is not None]

    async def readyz(self, _request: web.Request) -> web.Response:
        problems = self._problems()
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def readyz_full(self, _request: web.Request) -> web.Response:
        problems = self._problems()
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
            metrics.REDIS_UP.set(1)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as error:
            metrics.REDIS_UP.set(0)
            problems.append(f"Redis: {type(error).__name__}: {redact(str(error))}")
        notes = [n for check in self.info if (n := check()) is not None]
        body = {"status": "unready" if problems else "ready", "problems": problems, "notes": notes}
        return web.json_response(body, status=503 if problems else 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/readyz/full", self.readyz_full)
        app.router.add_get("/metrics", metrics.serve_metrics)
        return app


@contextlib.asynccontextmanager
async def serve_health(health: Health, sock: socket.socket) -> Any:
    """Serve the health endpoints on ``sock`` (bound by :func:`bind_ports`)."""
    runner = web.AppRunner(health.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield runner
    finally:
        await runner.cleanup()


__all__ = ["Check", "Health", "readiness_checks", "serve_health"]
