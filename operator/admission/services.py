"""What runs beside kopf: the admission webhook (every replica) and the meter bypass check
(leader only). ``main.run_operator`` starts them; both are plain classes, tested alone.

- :class:`AdmissionService`: :func:`.server.start_admission` (HTTPS, with
  certificate reload) with the two reads it needs, made by the operator's one API client
  (:class:`~spendgate.operator.kube.client.KubeClient`: a namespace's labels, the server's
  version); ``readiness()`` says whether it listens, so a replica joins the webhook's Service
  only once it can answer.
- :class:`BypassCheck`: every ``bypass_check_interval_s`` it lists the Services (of the watched
  namespaces, or of the cluster) and, in each namespace where a Service selects pods, the
  pods; every Service port that targets the model's port of a spendgate-injected pod
  (:func:`~spendgate.operator.admission.service_check.bypassing_services`) gets a Warning Event
  ``SpendgateMeterBypassed`` on the Service, again after ``bypass_rewarn_s`` if it persists.
  A finding seen for the first time since the operator started is first looked up in the
  Service's Events: one posted less than ``bypass_rewarn_s`` ago (by an earlier replica or
  before a restart) counts as the warning, so a restart does not post it again.
  It needs ``list`` on services, pods and events (no watch: a periodic check is enough
  for a warning, and watching every pod of a cluster would cost far more).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Gauge

from spendgate.listening import bind_listener
from spendgate.loops import run_every

from ..kube.client import KubeClient
from .injection import SKIPPED_NAMESPACES
from .server import AdmissionSettings, start_admission
from .service_check import bypassing_services

log = logging.getLogger("spendgate.operator")

METER_BYPASSES = Gauge(
    "spendgate_meter_bypasses",
    "Service ports reaching the model port of injected pods directly (last check)",
)


class BypassCheckSettings(Protocol):
    """What the bypass check reads of the operator's settings."""

    @property
    def namespace(self) -> str: ...  # the operator's own: not checked
    @property
    def namespaces(self) -> tuple[str, ...]: ...  # watched; empty = cluster-wide
    @property
    def pod_name(self) -> str: ...  # Event reportingInstance
    @property
    def bypass_check_interval_s(self) -> float: ...
    @property
    def bypass_rewarn_s(self) -> float: ...


class ClusterReads(Protocol):
    """What the webhook reads of the cluster (:class:`KubeClient` has both)."""

    def namespace_labels(self, name: str) -> Awaitable[Mapping[str, str]]: ...
    def server_version(self) -> Awaitable[tuple[int, int]]: ...


class AdmissionService:
    """The mutating webhook server, as a service of ``run_operator``; ``api`` is the
    operator's :class:`KubeClient` (set by ``run_operator`` when not given)."""

    __name__ = "admission"

    def __init__(self, api: ClusterReads | None = None) -> None:
        self.api = api
        self.port: int | None = None
        self.sock: socket.socket | None = None

    def bind(self, settings: AdmissionSettings) -> None:
        """Take the webhook's port now, before the operator starts (ListenError if in use)."""
        self.sock = bind_listener(
            settings.webhook_host, settings.webhook_port, what="the admission webhook"
        )

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def __call__(self, settings: AdmissionSettings) -> None:
        api = self.api
        if api is None:
            raise RuntimeError("the admission webhook was started without an API client")
        sock, self.sock = self.sock, None
        try:
            async with start_admission(
                settings, api.namespace_labels, api.server_version, sock=sock
            ) as srv:
                self.port = srv.port
                await asyncio.Event().wait()
        finally:
            self.port = None
            if sock is not None:
                sock.close()

    def readiness(self) -> str | None:
        return None if self.port is not None else "the admission webhook is not listening yet"


class BypassCheck:
    """Warn about Services that reach injected pods' model port directly (leader task)."""

    def __init__(
        self,
        settings: BypassCheckSettings,
        kube: KubeClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.clock = clock
        self.wall = wall
        self.warned: dict[tuple[str, str, int], float] = {}  # (service uid, port, target)

    def _watched(self, namespace: str | None) -> bool:
        return bool(namespace) and namespace not in SKIPPED_NAMESPACES | {self.settings.namespace}

    async def check(self) -> int:
        """One pass; returns the number of Events posted."""
        if self.settings.namespaces:
            services = []
            for namespace in filter(self._watched, self.settings.namespaces):
                services += await self.kube.list_services(namespace)
        else:
            services = await self.kube.list_services(None)
        by_namespace: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for service in services:
            namespace = (service.get("metadata") or {}).get("namespace")
            spec = service.get("spec") or {}
            if (
                self._watched(namespace)
                and spec.get("selector")
                and spec.get("type") != ("ExternalName")
            ):
                by_namespace[namespace].append(service)
        posted, found, seen = 0, 0, set()
        now = self.clock()
        for namespace, selecting in sorted(by_namespace.items()):
            pods = await self.kube.list_pods(namespace)
            uids = {
                (s.get("metadata") or {}).get("name"): (s.get("metadata") or {}).get("uid", "")
                for s in selecting
            }
            for warning in bypassing_services(selecting, pods):
                found += 1
                key = (str(uids.get(warning.service, "")), warning.port, warning.target)
                seen.add(key)
                last = self.warned.get(key)
                if last is None:
                    last = await self._posted_before(namespace, key[0], warning)
                    if last is not None:
                        self.warned[key] = last
                if last is not None and now - last < self.settings.bypass_rewarn_s:
                    continue
                involved = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "namespace": namespace,
                    "name": warning.service,
                    "uid": key[0],
                }
                await self.kube.create_event(
                    involved,
                    type="Warning",
                    reason=warning.reason,
                    message=warning.message,
                    action="CheckServices",
                    instance=self.settings.pod_name,
                )
                self.warned[key] = now
                posted += 1
                log.warning(
                    "a Service bypasses the meter",
                    extra={"service": f"{namespace}/{warning.service}", "port": warning.port},
                )
        self.warned = {k: v for k, v in self.warned.items() if k in seen}  # fixed ones forgotten
        METER_BYPASSES.set(found)
        return posted

    async def _posted_before(self, namespace: str, uid: str, warning: Any) -> float | None:
        """When (on ``clock``) the newest same warning on the Service was posted, if any."""
        if not uid:
            return None
        newest: float | None = None
        for event in await self.kube.list_events(namespace, uid):
            if (event.get("reason"), event.get("message")) != (warning.reason, warning.message):
                continue
            stamp = event.get("lastTimestamp") or event.get("eventTime")
            try:
                posted = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            newest = posted if newest is None else max(newest, posted)
        if newest is None:
            return None
        return self.clock() - max(0.0, self.wall() - newest)

    async def run(self, stop: asyncio.Event) -> None:
        await run_every(
            stop,
            self.settings.bypass_check_interval_s,
            self.check,
            log=log,
            failed="the Service bypass check failed",
            traceback=False,
        )


__all__ = ["AdmissionService", "BypassCheck", "ClusterReads"]
