"""A minimal async Kubernetes API client for what kopf does not do for us.

kopf watches and patches the objects it handles; the operator additionally *reads Secrets*
(API keys, on demand: they are not cached in memory) and *annotates CustomerBudgets* to have
kopf reconcile them again when a Secret or PriceBook they use changes. This client uses the
same credentials kopf logged in with (:meth:`KubeClient.configure` is called from the login
handler), so there is one source of cluster credentials.

Every request is bounded by ``timeout_s``. 404 is "absent"; other failures raise
:class:`~spendgate.operator.budgets.KubernetesUnavailable`, which the handlers retry. Secret
contents are never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from .budgets import KubernetesUnavailable

log = logging.getLogger("spendgate.operator.kube")

GROUP = "spendgate.dev"
VERSION = "v1alpha1"


class KubeClient:
    def __init__(self, *, timeout_s: float = 10.0, user_agent: str = "spendgate-operator") -> None:
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self._server: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._closed = False

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

    async def aclose(self) -> None:
        self._closed = True
        for session in [*self._retired, self._session]:
            if session is not None and not session.closed:
                await session.close()
        self._retired.clear()
        self._session = None

    async def _request(
        self, method: str, path: str, *, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any] | None:
        if self._closed:
            raise KubernetesUnavailable("the operator is stopping")
        if self._session is None or self._server is None:
            raise KubernetesUnavailable("not logged in to the Kubernetes API yet")
        headers = {"Content-Type": content_type} if content_type else {}
        data = json.dumps(body) if body is not None else None
        try:
            async with self._session.request(
                method, self._server + path, data=data, headers=headers
            ) as response:
                if response.status == 404:
                    return None
                if response.status >= 400:
                    detail = await _status_message(response)
                    raise KubernetesUnavailable(
                        f"{method} {path}: HTTP {response.status} {detail}".rstrip()
                    )
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
    ) -> bool:
        """Merge-patch annotations of a spendgate object; False if it does not exist."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/{plural}/{_q(name)}"
        result = await self._request(
            "PATCH",
            path,
            body={"metadata": {"annotations": dict(annotations)}},
            content_type="application/merge-patch+json",
        )
        return result is not None


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


__all__ = ["KubeClient"]
