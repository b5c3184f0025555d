"""A minimal async Kubernetes API client for what kopf does not do for us.

kopf watches and patches the objects it handles; the operator additionally

- *reads Secrets* (API keys, on demand: they are not cached in memory; the Stripe keys in its
  own namespace),
- *annotates CustomerBudgets* to have kopf reconcile them again when a Secret or PriceBook
  they use changes (or Stripe changed the account),
- *holds a Lease* (coordination.k8s.io/v1) for leader election (operator/runtime/leader.py),
- *lists Services and Pods* for the meter bypass check and *posts Events* from outside kopf's
  handlers (Stripe events on budgets, bypass warnings on Services),
- *lists and creates CustomerBudgets* for the budgets synced from Stripe
  (operator/stripe/budget_import.py; create only, never update or delete).

and, on every replica, *reads a namespace's labels and the server's version* for the
admission webhook (:meth:`KubeClient.namespace_labels`, :meth:`KubeClient.server_version`).

It is the operator's one client to the API server, configured once: :meth:`KubeClient.login`
loads the credentials (:func:`~spendgate.operator.kube.credentials.load_connection`: in-cluster,
else a kubeconfig) and kopf's login handler returns the very same ``kopf.ConnectionInfo``, so
kopf and this client always use one set of credentials. A 401 loads them again (the kubelet
rotates service-account tokens; exec plugins' tokens expire) and the request is sent once more.
A request made before the first login waits for it, up to ``timeout_s``.

Every request is bounded by ``timeout_s``. 404 is "absent"; 409 raises :class:`Conflict`;
other failures raise :class:`~spendgate.operator.kube.retry.KubernetesUnavailable`, which the
handlers retry. Secret contents are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from .credentials import Connection
from .retry import KubernetesUnavailable

log = logging.getLogger("spendgate.operator.kube")

GROUP = "spendgate.dev"
VERSION = "v1alpha1"
BUDGETS = "customerbudgets"
PRICEBOOKS = "pricebooks"
# Outside kopf's prefix on purpose: kopf ignores its own annotations when diffing, and this
# one must count as a change so that kopf calls the update handler.
REFRESH_ANNOTATION = "refresh.spendgate.dev/trigger"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
PAGE = 500


class Conflict(KubernetesUnavailable):
    """HTTP 409: the object exists already, or changed since it was read."""


class Invalid(KubernetesUnavailable):
    """HTTP 422: the API server refused the object (its schema -- e.g. an older CRD -- or a
    validation rule); sending the same again fails the same way."""

    reason = "RejectedByApiServer"


Loader = Callable[[], Connection]


class KubeClient:
    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        user_agent: str = "spendgate-operator",
        loader: Loader | None = None,
        labels_cache_s: float = 5.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.loader = loader
        self.labels_cache_s = labels_cache_s
        self.source: str | None = None  # where the credentials came from (never the secret)
        self._info: Any = None
        self._labels: dict[str, tuple[float, dict[str, str]]] = {}
        self._proxy: str | None = None
        self._server: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._closed = False
        self._logged_in = asyncio.Event()

    @property
    def configured(self) -> bool:
        return self._server is not None

    def login(self) -> Any:
        """Load the credentials again (``loader``), use them, and return the
        ``kopf.ConnectionInfo`` -- what kopf's login handler returns, so both use the same."""
        if self.loader is None:
            raise KubernetesUnavailable("no credentials loader: the client is configured by hand")
        connection = self.loader()
        self.source = connection.source
        self.configure(connection.info)
        return connection.info

    def configure(self, info: Any) -> None:
        """Use the credentials of a ``kopf.ConnectionInfo``."""
        if self._closed:
            return
        self._info = info
        self._proxy = getattr(info, "proxy_url", None) or None
        headers = {"User-Agent": self.user_agent, **info.as_http_headers()}
        ssl: Any = info.as_ssl_context() if str(info.server).startswith("https") else None
        if self._session is not None:
            self._retired.append(self._session)  # in-flight requests may still use it
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            trust_env=bool(getattr(info, "trust_env", False)),
        )
        self._server = str(info.server).rstrip("/")
        self._logged_in.set()

    async def wait_configured(self) -> None:
        """Until the client has credentials (:meth:`login`, or kopf's login in tests)."""
        await self._logged_in.wait()

    async def _session_now(self) -> tuple[aiohttp.ClientSession, str]:
        if self._session is None or self._server is None:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._logged_in.wait()
            except TimeoutError:
                raise KubernetesUnavailable("not logged in to the Kubernetes API yet") from None
        assert self._session is not None and self._server is not None
        return self._session, self._server

    async def aclose(self) -> None:
        self._closed = True
        for session in [*self._retired, self._session]:
            if session is not None and not session.closed:
                await session.close()
        self._retired.clear()
        self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        if self._closed:
            raise KubernetesUnavailable("the operator is stopping")
        headers = {"Content-Type": content_type} if content_type else {}
        data = json.dumps(body) if body is not None else None
        url = path + (f"?{urlencode(params)}" if params else "")
        status, result = await self._send(method, path, url, data, headers)
        if status == 401 and self.loader is not None:
            log.info("the API server refused the credentials (401); loading them again")
            try:
                self.login()
            except Exception as error:
                raise KubernetesUnavailable(f"{method} {path}: HTTP 401; {error}") from None
            status, result = await self._send(method, path, url, data, headers)
        if status >= 400:
            error_type = {409: Conflict, 422: Invalid}.get(status, KubernetesUnavailable)
            raise error_type(f"{method} {path}: HTTP {status} {result}".rstrip())
        return result  # type: ignore[no-any-return]

    async def _send(
        self, method: str, path: str, url: str, data: str | None, headers: Mapping[str, str]
    ) -> tuple[int, Any]:
        """(status, decoded body), for a status >= 400 its Status message; 404 is (200, None)."""
        session, server = await self._session_now()
        try:
            async with session.request(
                method, server + url, data=data, headers=headers, proxy=self._proxy
            ) as response:
                if response.status == 404:
                    return 200, None
                if response.status >= 400:
                    return response.status, await _status_message(response)
                return response.status, await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            raise KubernetesUnavailable(
                f"{method} {path}: {type(error).__name__}: {error}"
            ) from None

    # ------------------------------------------------------------------ admission's reads

    async def namespace_labels(self, name: str) -> dict[str, str]:
        """A namespace's labels (RBAC: ``get`` namespaces), kept ``labels_cache_s``."""
        cached = self._labels.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.labels_cache_s:
            return cached[1]
        body = await self._request("GET", f"/api/v1/namespaces/{_q(name)}")
        if body is None:
            raise KubernetesUnavailable(f"namespace {name} does not exist")
        labels = {
            str(k): str(v) for k, v in ((body.get("metadata") or {}).get("labels") or {}).items()
        }
        self._labels[name] = (time.monotonic(), labels)
        return labels

    async def server_version(self) -> tuple[int, int]:
        """(major, minor) of ``/version`` (open to every authenticated client)."""
        body = await self._request("GET", "/version")
        if not body:
            raise KubernetesUnavailable("GET /version: no answer")
        major, minor = ("".join(filter(str.isdigit, str(body[k]))) for k in ("major", "minor"))
        return int(major), int(minor)  # GKE/EKS say "29+"

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """GET a Secret; None if it does not exist. (A ``SecretReader``.)"""
        return await self._request("GET", f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}")

    async def annotate(
        self, plural: str, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> dict[str, Any] | None:
        """Merge-patch annotations of a spendgate object: the object, None if it is absent."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/{plural}/{_q(name)}"
        return await self._request(
            "PATCH",
            path,
            body={"metadata": {"annotations": dict(annotations)}},
            content_type="application/merge-patch+json",
        )

    # ------------------------------------------------------------------ CustomerBudgets

    async def list_customer_budgets(self, namespace: str | None) -> list[dict[str, Any]]:
        """CustomerBudgets of a namespace, or of the cluster (None)."""
        where = f"/namespaces/{_q(namespace)}" if namespace else ""
        return await self.list_objects(f"/apis/{GROUP}/{VERSION}{where}/customerbudgets")

    async def create_customer_budget(
        self, namespace: str, manifest: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """POST a CustomerBudget: the created object, or None if one of that name exists
        already (HTTP 409 AlreadyExists: creating is idempotent). A missing namespace or a
        manifest the API server refuses raises KubernetesUnavailable with its message."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/customerbudgets"
        body = {
            **manifest,
            "metadata": {**(manifest.get("metadata") or {}), "namespace": namespace},
        }
        try:
            result = await self._request("POST", path, body=body, content_type=_JSON)
        except Conflict:
            return None
        if result is None:
            raise KubernetesUnavailable(f"POST {path}: HTTP 404 (namespace {namespace}?)")
        return result

    # ------------------------------------------------------------------ leases

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._request("GET", f"{LEASES.format(namespace=_q(namespace))}/{_q(name)}")

    async def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a Lease; :class:`Conflict` if another replica created it first."""
        path = LEASES.format(namespace=_q(namespace))
        result = await self._request("POST", path, body=dict(body), content_type=_JSON)
        if result is None:
            raise KubernetesUnavailable(f"POST {path}: HTTP 404 (namespace {namespace}?)")
        return result

    async def patch_lease(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a Lease. With ``metadata.resourceVersion`` in the patch the API server
        applies it only to that version, else :class:`Conflict` (optimistic concurrency)."""
        path = f"{LEASES.format(namespace=_q(namespace))}/{_q(name)}"
        return await self._request(
            "PATCH", path, body=dict(patch), content_type="application/merge-patch+json"
        )

    # ------------------------------------------------------------------ lists, Events

    async def list_objects(
        self, path: str, *, field_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Every item of a list (``/api/v1/services``, ...), in pages of ``PAGE``."""
        items: list[dict[str, Any]] = []
        selector = {"fieldSelector": field_selector} if field_selector else {}
        params = {"limit": str(PAGE), **selector}
        while True:
            page = await self._request("GET", path, params=params)
            if page is None:
                return items
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {"limit": str(PAGE), "continue": token, **selector}

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource of a spendgate object (None: it is gone).
        :class:`Invalid` when the API server refuses it (422)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/{plural}/{_q(name)}/status"
        return await self._request(
            "PATCH",
            path,
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )

    async def can_list(self, path: str) -> bool:
        """One page of one item: False if the resource is not served (404); a refusal (403)
        raises with the server's message."""
        return await self._request("GET", path, params={"limit": "1"}) is not None

    async def get_crd(self, name: str) -> dict[str, Any] | None:
        """A CustomResourceDefinition by name (RBAC: ``get`` on the two spendgate CRDs)."""
        return await self._request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{_q(name)}"
        )

    async def list_services(self, namespace: str | None) -> list[dict[str, Any]]:
        """Services of a namespace, or of the cluster (None)."""
        where = f"/namespaces/{_q(namespace)}" if namespace else ""
        return await self.list_objects(f"/api/v1{where}/services")

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        return await self.list_objects(f"/api/v1/namespaces/{_q(namespace)}/pods")

    async def list_events(self, namespace: str, involved_uid: str) -> list[dict[str, Any]]:
        """The Events on one object (by its uid) in a namespace (RBAC: ``list`` events)."""
        events = await self.list_objects(
            f"/api/v1/namespaces/{_q(namespace)}/events",
            field_selector=f"involvedObject.uid={involved_uid}",
        )
        return [e for e in events if (e.get("involvedObject") or {}).get("uid") == involved_uid]

    async def create_event(
        self,
        involved: Mapping[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        action: str,
        component: str = "spendgate-operator",
        instance: str = "",
    ) -> None:
        """Post a core v1 Event on ``involved`` (an ObjectReference: apiVersion, kind, name,
        namespace, uid), with ``action`` what the operator did (``Reconcile``, ``Refresh``,
        ``Finalize``, ``CheckServices``, ``StripeSync``, ...)."""
        namespace = str(involved.get("namespace") or "default")
        now = datetime.now(UTC).isoformat()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"namespace": namespace, "generateName": "spendgate-"},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "action": action,
            "reportingComponent": component,
            "reportingInstance": instance,
            "source": {"component": component},
            "involvedObject": dict(involved),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
        }
        await self._request(
            "POST", f"/api/v1/namespaces/{_q(namespace)}/events", body=body, content_type=_JSON
        )


_JSON = "application/json"


def _q(segment: str) -> str:
    return quote(segment, safe="")


async def _status_message(response: aiohttp.ClientResponse) -> str:
    """The ``message`` of a Kubernetes Status body (never the request, which may hold data)."""
    try:
        payload = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return ""
    if isinstance(payload, dict):
        return str(payload.get("message") or payload.get("reason") or "")[:300]
    return ""


__all__ = ["Conflict", "Invalid", "KubeClient"]
