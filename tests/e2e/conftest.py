"""Fixtures of the real-API-server tier (marker ``e2e``).

One control plane (etcd + kube-apiserver 1.20 + kube-controller-manager) per test session, the
chart's CRDs, RBAC, webhook Secret and MutatingWebhookConfiguration applied to it as a user's
``helm install`` would, and a kubeconfig holding a token of the chart's ServiceAccount. Every
test here is skipped, with one line saying why, on a machine where the binaries are not built
(``make e2e`` builds them).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import e2e_chart
from tests.support.e2e_chart import ChartInstall
from tests.support.e2e_operator import OperatorProcess, running_operator
from tests.support.helm_chart import NAMESPACE
from tests.support.kube_control_plane import (
    KUBE_VERSION,
    ControlPlane,
    free_port,
    kubectl_binary,
    missing_binaries,
    start_control_plane,
)
from tests.support.redis_servers import RedisServer

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def chart_objects() -> list[dict[str, Any]]:
    """The chart rendered by the real Helm for the tier's server version."""
    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    try:
        kubectl_binary()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return e2e_chart.render(KUBE_VERSION)


@pytest.fixture(scope="session")
def kube_plane(chart_objects: list[dict[str, Any]]) -> Iterator[ControlPlane]:
    directory = Path(tempfile.mkdtemp(prefix="spendgate-kube-"))
    plane = start_control_plane(directory, webhook_hosts=e2e_chart.webhook_hostnames(chart_objects))
    try:
        yield plane
    finally:
        plane.stop()


def apply(plane: ControlPlane, objects: list[dict[str, Any]], *args: str) -> str:
    document = {"apiVersion": "v1", "kind": "List", "items": objects}
    return plane.kubectl("apply", "-f", "-", *args, input=json.dumps(document)).stdout


@pytest.fixture(scope="session")
def chart_install(kube_plane: ControlPlane, chart_objects: list[dict[str, Any]]) -> ChartInstall:
    """The chart's cluster objects applied; the webhook points at a loopback port by url:."""
    port = free_port()
    objects = []
    for item in e2e_chart.install_objects(chart_objects):
        if item["kind"] == "MutatingWebhookConfiguration":
            item = e2e_chart.webhook_via_loopback(item, port)
        objects.append(item)
    kube_plane.kubectl("create", "namespace", NAMESPACE)
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    # As helm does for crds/: no client-side validation (kubectl's would refuse
    # x-kubernetes-validations, which 1.20's server accepts and drops).
    apply(kube_plane, crds, "--validate=false")
    for crd in crds:
        kube_plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd['metadata']['name']}"
        )
    apply(kube_plane, [o for o in objects if o["kind"] != "CustomResourceDefinition"])
    account = e2e_chart.find(chart_objects, "ServiceAccount")
    namespace = account["metadata"].get("namespace", NAMESPACE)
    token = kube_plane.service_account_token(namespace, account["metadata"]["name"])
    cert, key, ca = e2e_chart.webhook_tls(chart_objects, kube_plane.directory / "webhook-tls")
    return ChartInstall(
        objects=objects,
        webhook_port=port,
        cert_file=cert,
        key_file=key,
        ca_pem=ca,
        service_account=(namespace, account["metadata"]["name"]),
        kubeconfig=kube_plane.kubeconfig(token, name="operator"),
    )


@pytest.fixture(scope="session")
def operator_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    socket_path = tmp_path_factory.mktemp("redis-socket") / "redis.sock"
    server = RedisServer(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "777"])
    server.start()
    server.socket_path = socket_path  # type: ignore[attr-defined]
    yield server
    server.close()


@pytest.fixture(scope="session")
def operator(
    kube_plane: ControlPlane,
    chart_install: ChartInstall,
    chart_objects: list[dict[str, Any]],
    operator_redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    directory = tmp_path_factory.mktemp("operator")
    with running_operator(
        kube_plane, chart_install, chart_objects, operator_redis.url, directory
    ) as process:
        kube_plane.kubectl(
            "apply", "-f", str(EXAMPLES / "pricebook.yaml"), "-f", str(EXAMPLES / "budgets.yaml")
        )
        yield process
