"""What the admission webhook reads from the cluster: namespace labels and the API server's
version (native sidecars need Kubernetes >= 1.29), with the operator's one API client over
HTTPS -- in a cluster with the service account, which the kubelet rotates."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import kopf
import pytest
from aiohttp import web

from spendgate.operator.admission.server import NativeSidecars
from spendgate.operator.kube.client import KubeClient
from spendgate.operator.kube.credentials import in_cluster_connection, load_connection
from spendgate.operator.kube.retry import KubernetesUnavailable
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

    def authorized(request: web.Request) -> None:
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] not in ("Bearer first-token", "Bearer rotated-token"):
            raise web.HTTPUnauthorized()

    async def version(request: web.Request) -> web.Response:
        authorized(request)
        return web.json_response({"major": "1", "minor": "29+", "gitVersion": "v1.29.4-eks"})

    async def namespace(request: web.Request) -> web.Response:
        authorized(request)
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


def service_account(directory: Path, ca: WebhookCA, token: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "token").write_text(token + "\n")
    (directory / "ca.crt").write_bytes(ca.ca_file.read_bytes())
    (directory / "namespace").write_text("spendgate-system")
    return directory


async def test_in_cluster_reads_with_a_rotated_token(ca: WebhookCA, tmp_path: Path) -> None:
    sa = service_account(tmp_path / "sa", ca, "first-token")
    seen: list[str] = []
    async with fake_api_server(ca, seen) as url:
        host, port = url.removeprefix("https://").split(":")
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        api = KubeClient(timeout_s=5, loader=lambda: load_connection(env, str(sa)))
        api.login()
        assert api.source == "in-cluster service account"
        try:
            assert await api.server_version() == (1, 29)
            labels = await api.namespace_labels("team-a")
            assert labels["spendgate.dev/inject"] == "true"
            assert await api.namespace_labels("team-a") == labels  # cached
            # The kubelet rotated the token and the old one expired: a 401 loads it again.
            (sa / "token").write_text("rotated-token\n")
            seen.append("expired")
            api.configure(kopf.ConnectionInfo(server=url, ca_path=str(sa / "ca.crt"), token="old"))
            with pytest.raises(KubernetesUnavailable, match="does not exist"):
                await api.namespace_labels("missing")
        finally:
            await api.aclose()
    assert seen == [
        "Bearer first-token",
        "Bearer first-token",
        "expired",
        "Bearer old",
        "Bearer rotated-token",
    ]


def test_in_cluster_credentials_from_the_environment(ca: WebhookCA, tmp_path: Path) -> None:
    sa = service_account(tmp_path / "sa", ca, "t")
    environment = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    connection = in_cluster_connection(environment, str(sa))
    assert connection is not None
    assert connection.info.server == "https://[fd00::1]:443"
    assert connection.info.token == "t" and connection.info.ca_path == str(sa / "ca.crt")
    assert connection.info.default_namespace == "spendgate-system"
    assert in_cluster_connection({}, str(sa)) is None  # not in a cluster: a kubeconfig then


async def test_reads_through_a_kubeconfig(ca: WebhookCA, tmp_path: Path) -> None:
    """Out of a cluster the same client reads with the kubeconfig's credentials."""
    seen: list[str] = []
    async with fake_api_server(ca, seen) as url:
        config = tmp_path / "config"
        config.write_text(
            json.dumps(
                {
                    "current-context": "dev",
                    "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
                    "clusters": [
                        {"name": "c", "cluster": {"server": url, "certificate-authority": "ca.pem"}}
                    ],
                    "users": [{"name": "u", "user": {"tokenFile": "token"}}],
                }
            )
        )
        (tmp_path / "ca.pem").write_bytes(ca.ca_file.read_bytes())  # relative to the file
        (tmp_path / "token").write_text("first-token")
        api = KubeClient(timeout_s=5, loader=lambda: load_connection({"KUBECONFIG": str(config)}))
        api.login()
        try:
            assert api.source == f"kubeconfig {config} (context dev)"
            assert await api.server_version() == (1, 29)
        finally:
            await api.aclose()
    assert seen == ["Bearer first-token"]
