"""What the admission webhook reads from the cluster: namespace labels and the API server's
version (native sidecars need Kubernetes >= 1.29), through the service account, over HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from spendgate.operator.admission.server import NativeSidecars
from spendgate.operator.kube.service_account import InClusterApi
from tests.support.webhook_certs import WebhookCA


@pytest.fixture
def ca(tmp_path: Path) -> WebhookCA:
    ca = WebhookCA.create(tmp_path)
    ca.issue()
    return ca


async def test_version_lookup_failures_fall_back_to_a_regular_container() -> None:
    calls = 0

    async def flaky_version() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise aiohttp.ClientConnectionError("API server unreachable")
        return (1, 29)

    native = NativeSidecars(flaky_version, forced=None)
    assert await native() is False  # works on every version; logged
    assert await native() is True  # asked again, and now known
    assert await native() is True
    assert calls == 2


@asynccontextmanager
async def fake_api_server(ca: WebhookCA, seen: list[str]) -> AsyncIterator[str]:
    """An API server over HTTPS that knows one namespace and records the bearer tokens."""

    async def version(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"major": "1", "minor": "29+", "gitVersion": "v1.29.4-eks"})

    async def namespace(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        if request.match_info["name"] != "team-a":
            raise web.HTTPNotFound()
        labels = {"spendgate.dev/inject": "true", "kubernetes.io/metadata.name": "team-a"}
        return web.json_response({"kind": "Namespace", "metadata": {"labels": labels}})

    app = web.Application()
    app.router.add_get("/version", version)
    app.router.add_get("/api/v1/namespaces/{name}", namespace)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca.cert_file, ca.key_file)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_in_cluster_api(ca: WebhookCA, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    seen: list[str] = []
    async with fake_api_server(ca, seen) as url:
        api = InClusterApi(url, str(token), str(ca.ca_file), cache_s=60)
        try:
            assert await api.server_version() == (1, 29)
            labels = await api.namespace_labels("team-a")
            assert labels["spendgate.dev/inject"] == "true"
            assert await api.namespace_labels("team-a") == labels  # cached
            token.write_text("rotated-token\n")  # the kubelet refreshes bound tokens
            with pytest.raises(aiohttp.ClientResponseError) as error:
                await api.namespace_labels("missing")
            assert error.value.status == 404
        finally:
            await api.close()
    assert seen == ["Bearer first-token", "Bearer first-token", "Bearer rotated-token"]


def test_in_cluster_api_from_the_environment(ca: WebhookCA, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_bytes(ca.ca_file.read_bytes())
    environment = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    api = InClusterApi.from_environment(environment, str(tmp_path))
    assert api.base_url == "https://[fd00::1]:443"
    assert api.token_file == f"{tmp_path}/token"
    with pytest.raises(RuntimeError, match="not in a cluster"):
        InClusterApi.from_environment({}, str(tmp_path))
