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

This client uses the same credentials kopf logged in with (:meth:`KubeClient.configure` is
called from the login handler), so there is one source of cluster credentials; code that runs
beside kopf waits for that with :meth:`KubeClient.wait_configured`.

Every request is bounded by ``timeout_s``. 404 is "absent"; 409 raises :class:`Conflict`;
other failures raise :class:`~spendgate.operator.kube.retry.KubernetesUnavailable`, which the
handlers retry. Secret contents are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

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


class KubeClient:
    def __init__(self, *, timeout_s: float = 10.0, user_agent: str = "spendgate-operator") -> None:
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self._server: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._closed = False
        self._logged_in = asyncio.Event()

    @property
    def configured(self) -> bool:
        return self._server is not None

    def configure(self, info: Any) -> None:
        """Use the credentials of a ``kopf.ConnectionInfo`` (called on every kopf login)."""
        if self._closed:
            return
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
        """Until kopf has logged in (and so this client has credentials)."""
        await self._logged_in.wait()

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
        if self._session is None or self._server is None:
            raise KubernetesUnavailable("not logged in to the Kubernetes API yet")
        headers = {"Content-Type": content_type} if content_type else {}
        data = json.dumps(body) if body is not None else None
        url = self._server + path + (f"?{urlencode(params)}" if params else "")
        try:
            async with self._session.request(method, url, data=data, headers=headers) as response:
                if response.status == 404:
                    return None
                if response.status >= 400:
                    detail = await _status_message(response)
                    error = Conflict if response.status == 409 else KubernetesUnavailable
                    raise error(f"{method} {path}: HTTP {response.status} {detail}".rstrip())
                result: dict[str, Any] = await response.json()
                return result
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
            raise KubernetesUnavailable(
                f"{method} {path}: {type(error).__name__}: {error}"
            ) from None

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

    async def list_objects(self, path: str) -> list[dict[str, Any]]:
        """Every item of a list (``/api/v1/services``, ...), in pages of ``PAGE``."""
        items: list[dict[str, Any]] = []
        params = {"limit": str(PAGE)}
        while True:
            page = await self._request("GET", path, params=params)
            if page is None:
                return items
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            params = {"limit": str(PAGE), "continue": token}

    async def list_services(self, namespace: str | None) -> list[dict[str, Any]]:
        """Services of a namespace, or of the cluster (None)."""
        where = f"/namespaces/{_q(namespace)}" if namespace else ""
        return await self.list_objects(f"/api/v1{where}/services")

    async def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        return await self.list_objects(f"/api/v1/namespaces/{_q(namespace)}/pods")

    async def create_event(
        self,
        involved: Mapping[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        component: str = "spendgate-operator",
        instance: str = "",
    ) -> None:
        """Post a core v1 Event on ``involved`` (an ObjectReference: apiVersion, kind, name,
        namespace, uid), shaped like the ones kopf posts from handlers."""
        namespace = str(involved.get("namespace") or "default")
        now = datetime.now(UTC).isoformat()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"namespace": namespace, "generateName": "spendgate-"},
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "action": "Observed",
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


__all__ = ["Conflict", "KubeClient"]
