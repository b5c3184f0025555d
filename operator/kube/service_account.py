"""The webhook's two reads of the API server, with the pod's own service account.

Every replica serves the admission webhook, leading or not, so these reads cannot wait for the
operator's logged-in :class:`~spendgate.operator.kube.client.KubeClient`: they use the mounted
service-account token and CA directly.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class InClusterApi:
    """The two reads the webhook needs, with the pod's service account (RBAC: ``get``
    namespaces; ``/version`` is open to every authenticated client). The token file is read
    again for each request: the kubelet rotates bound tokens."""

    def __init__(self, base_url: str, token_file: str, ca_file: str, cache_s: float = 5.0):
        self.base_url, self.token_file, self.cache_s = base_url.rstrip("/"), token_file, cache_s
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._labels: dict[str, tuple[float, dict[str, str]]] = {}

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, directory: str = SERVICE_ACCOUNT
    ) -> InClusterApi:
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise RuntimeError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", f"{directory}/token", f"{directory}/ca.crt")

    def _token(self) -> str:
        with open(self.token_file, encoding="utf-8") as handle:
            return handle.read().strip()

    async def _get(self, path: str) -> Any:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=5)
            self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=True)
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        async with self._session.get(self.base_url + path, headers=headers, ssl=self._ssl) as rsp:
            return await rsp.json()

    async def namespace_labels(self, name: str) -> dict[str, str]:
        cached = self._labels.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1]
        body = await self._get(f"/api/v1/namespaces/{quote(name, safe='')}")
        labels = dict((body.get("metadata") or {}).get("labels") or {})
        self._labels[name] = (time.monotonic(), labels)
        return labels

    async def server_version(self) -> tuple[int, int]:
        body = await self._get("/version")
        major, minor = ("".join(filter(str.isdigit, body[k])) for k in ("major", "minor"))
        return int(major), int(minor)  # GKE/EKS say "29+"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


__all__ = ["SERVICE_ACCOUNT", "InClusterApi"]
