"""``/healthz``, ``/readyz`` and ``/metrics``: on a port of their own, never the customer's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .front.context import SERVER_BANNER

if TYPE_CHECKING:
    from .server import Sidecar

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def probe_handlers(sidecar: Sidecar) -> dict[str, Handler]:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ok, checks = await sidecar.ready()
        return web.json_response({"ready": ok, **checks}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        in_flight = len(sidecar.proxy.background) if sidecar.proxy else 0
        sidecar.metrics.holds_in_flight.set(in_flight)
        body = generate_latest(sidecar.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


def create_probe_app(sidecar: Sidecar) -> web.Application:
    async def no_banner(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_BANNER

    app = web.Application(client_max_size=64 * 1024)
    for path, handler in probe_handlers(sidecar).items():
        app.router.add_get(path, handler)
    app.on_response_prepare.append(no_banner)
    return app
