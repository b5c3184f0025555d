"""The mutating admission webhook: ``POST /mutate-pods`` injects the sidecar, over HTTPS.

Served by every operator replica (it has no state of its own). The decision is
:func:`.injection.plan_injection`; this module speaks AdmissionReview v1,
serves TLS from rotating files (:mod:`.tls`) and finds two facts in the cluster through
injected callables: a namespace's labels and the API server's version (native sidecars need
Kubernetes >= 1.29). In production both come from the operator's one API client
(:class:`~spendgate.operator.kube.client.KubeClient`); tests pass their own.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from spendgate.listening import bind_listener

from .injection import InjectionDefaults, Refusal, plan_injection, pod_decides
from .tls import ReloadingTLS

log = logging.getLogger("spendgate.operator.admission")

NamespaceLabels = Callable[[str], Awaitable[Mapping[str, str]]]
ServerVersion = Callable[[], Awaitable[tuple[int, int]]]
REVIEW_API = "admission.k8s.io/v1"
NATIVE_SIDECARS_SINCE = (1, 29)


class AdmissionSettings(Protocol):
    """What the webhook reads of the operator's settings (``AdmissionSettings`` has it all)."""

    @property
    def injection(self) -> InjectionDefaults: ...
    @property
    def namespace(self) -> str: ...  # the operator's own: never injected
    @property
    def webhook_host(self) -> str: ...
    @property
    def webhook_port(self) -> int: ...
    @property
    def webhook_cert_file(self) -> str | None: ...
    @property
    def webhook_key_file(self) -> str | None: ...


class MalformedReview(ValueError):
    pass


class NativeSidecars:
    """Whether the cluster runs native sidecars: forced by settings, else from /version.

    The answer is kept for ``ttl_s`` (a control-plane upgrade is noticed within it). When the
    version cannot be read and nothing is known yet, pods get a regular container, which works
    on every version, and a warning is logged.
    """

    def __init__(self, server_version: ServerVersion, forced: bool | None, ttl_s: float = 600):
        self._server_version, self._forced, self._ttl_s = server_version, forced, ttl_s
        self._known: bool | None = None
        self._checked = float("-inf")

    async def __call__(self) -> bool:
        if self._forced is not None:
            return self._forced
        if time.monotonic() - self._checked >= self._ttl_s:
            try:
                self._known = tuple(await self._server_version()) >= NATIVE_SIDECARS_SINCE
                self._checked = time.monotonic()
            except Exception as error:
                log.warning("cannot read the API server version", extra={"error": repr(error)})
        return bool(self._known)


def _parse_review(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
        raise MalformedReview("expected an AdmissionReview object")
    if body.get("apiVersion") != REVIEW_API:
        raise MalformedReview(f"expected apiVersion {REVIEW_API}, got {body.get('apiVersion')!r}")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise MalformedReview("expected request.uid")
    return request


def _response(uid: str, patch: list[dict[str, Any]] | None = None, **extra: Any) -> web.Response:
    response: dict[str, Any] = {"uid": uid, "allowed": True, **extra}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return web.json_response(
        {"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": response}
    )


def _refuse(uid: str, code: int, message: str) -> web.Response:
    return _response(uid, allowed=False, status={"code": code, "message": message})


class PodMutator:
    def __init__(
        self, settings: AdmissionSettings, namespace_labels: NamespaceLabels, native: NativeSidecars
    ) -> None:
        self.settings, self.namespace_labels, self.native = settings, namespace_labels, native

    async def handle(self, request: web.Request) -> web.Response:
        try:
            review = _parse_review(await request.json())
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            raise web.HTTPBadRequest(text=f"malformed AdmissionReview: {error}") from None
        uid = review["uid"]
        kind = review.get("kind") or {}
        if (kind.get("group"), kind.get("kind")) != ("", "Pod") or review.get("subResource"):
            return _response(uid)  # the webhook is meant for pods; anything else passes as is
        if review.get("operation") != "CREATE":
            return _response(uid)  # a running pod's containers cannot change
        pod, namespace = review.get("object"), review.get("namespace")
        if not isinstance(pod, dict) or not isinstance(namespace, str) or not namespace:
            raise web.HTTPBadRequest(text="malformed AdmissionReview: expected object, namespace")
        labels: Mapping[str, str] | None = None
        if not pod_decides(pod):
            try:
                labels = await self.namespace_labels(namespace)
            except Exception as error:
                log.warning(
                    "namespace lookup failed", extra={"ns": namespace, "error": repr(error)}
                )
                return _refuse(uid, 500, f"spendgate: cannot read namespace {namespace}: {error}")
        plan = plan_injection(
            pod,
            namespace,
            labels,
            self.settings.injection,
            native_sidecars=await self.native(),
            operator_namespace=self.settings.namespace,
        )
        meta = pod.get("metadata") or {}
        # namespace/name, or namespace/generateName for a pod a controller names on creation
        pod_name = meta.get("name") or meta.get("generateName") or "?"
        where = {"pod": f"{namespace}/{pod_name}", "uid": uid}
        if isinstance(plan, Refusal):
            log.info("pod refused", extra={**where, "reason": plan.message})
            return _refuse(uid, 400, plan.message)
        log.log(logging.INFO if plan.patch else logging.DEBUG, plan.reason, extra=where)
        return _response(uid, plan.patch)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    settings: AdmissionSettings, namespace_labels: NamespaceLabels, server_version: ServerVersion
) -> web.Application:
    native = NativeSidecars(server_version, settings.injection.native_sidecars)
    mutator = PodMutator(settings, namespace_labels, native)
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/mutate-pods", mutator.handle)
    app.router.add_get("/healthz", _healthz)
    return app


@dataclass
class AdmissionServer:
    runner: web.AppRunner
    tls: ReloadingTLS
    port: int  # the bound port (settings.webhook_port may be 0)


@asynccontextmanager
async def start_admission(
    settings: AdmissionSettings,
    namespace_labels: NamespaceLabels,
    server_version: ServerVersion,
    *,
    sock: socket.socket | None = None,
) -> AsyncIterator[AdmissionServer]:
    """Serve the webhook over HTTPS while the context is open: on ``sock`` if it was bound
    already (the operator binds every port first), else on the configured host and port."""
    if not settings.webhook_cert_file or not settings.webhook_key_file:
        raise ValueError("the admission webhook needs webhook_cert_file and webhook_key_file")
    tls = ReloadingTLS(settings.webhook_cert_file, settings.webhook_key_file)
    app = create_app(settings, namespace_labels, server_version)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    try:
        if sock is None:
            sock = bind_listener(
                settings.webhook_host, settings.webhook_port, what="the admission webhook"
            )
        await web.SockSite(runner, sock, ssl_context=tls.context).start()
        port = runner.addresses[0][1]
        log.info("admission webhook listening", extra={"port": port})
        yield AdmissionServer(runner, tls, port)
    finally:
        await runner.cleanup()
