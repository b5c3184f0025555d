"""The Helm chart as a user installs it, for the real API server of the e2e tier.

The chart declares ``kubeVersion: >=1.27``; the tier's server is 1.20. :func:`render` renders a
copy of the chart whose only difference is that constraint, with ``--kube-version`` of the
server it talks to, so the templates see the server's version. What the tier applies
(:func:`install_objects`) is what the operator needs from a real cluster -- CRDs, the
ServiceAccount and its RBAC, the webhook's TLS Secret, the MutatingWebhookConfiguration and
the ClusterKopfPeering -- not the Deployment, Services or Redis (no kubelet runs pods here).

The one change to a rendered object: the webhook's ``clientConfig.service`` becomes a ``url:``
with the Service's own DNS name on a loopback port (:func:`webhook_via_loopback`); the API
server resolves that name to 127.0.0.1 (tests/support/kube_control_plane.py) and verifies the
chart's certificate against the chart's caBundle as it would in a cluster.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.helm_chart import CHART, NAMESPACE, RELEASE, helm, parse

Obj = dict[str, Any]
INSTALLED_KINDS = (
    "CustomResourceDefinition",
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Secret",
    "MutatingWebhookConfiguration",
    "ClusterKopfPeering",
    "KopfPeering",
)


def render(
    kube_version: str,
    values: Mapping[str, Any] | None = None,
    chart: Path = CHART,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[Obj]:
    """``helm template --include-crds --kube-version`` of a copy of ``chart`` that accepts
    ``kube_version``, as the release ``release`` in ``namespace``."""
    with tempfile.TemporaryDirectory(prefix="spendgate-chart-") as tmp:
        copy_dir = Path(tmp) / "spendgate"
        shutil.copytree(chart, copy_dir, symlinks=False)
        meta = copy_dir / "Chart.yaml"
        text = re.sub(
            r"(?m)^kubeVersion:.*$", f'kubeVersion: ">={kube_version}.0-0"', meta.read_text()
        )
        meta.write_text(text)
        result = helm(
            "template",
            release,
            str(copy_dir),
            "--namespace",
            namespace,
            "--include-crds",
            "--kube-version",
            f"{kube_version}.0",
            values=dict(values or {}),
        )
    if result.returncode != 0:
        raise AssertionError(f"helm template failed: {result.stderr}")
    return parse(result.stdout)


def install_objects(objects: Sequence[Obj]) -> list[Obj]:
    """The rendered objects the tier applies, CRDs first."""
    chosen = [o for o in objects if o.get("kind") in INSTALLED_KINDS]
    return sorted(chosen, key=lambda o: o["kind"] != "CustomResourceDefinition")


def find(objects: Sequence[Obj], kind: str, name: str | None = None) -> Obj:
    for item in objects:
        if item.get("kind") == kind and (name is None or item["metadata"]["name"] == name):
            return item
    raise KeyError(f"the chart renders no {kind} {name or ''}".rstrip())


def webhook_service(objects: Sequence[Obj]) -> tuple[str, str]:
    """(service name, namespace) that the chart's webhooks call."""
    config = find(objects, "MutatingWebhookConfiguration")
    service = config["webhooks"][0]["clientConfig"]["service"]
    return service["name"], service["namespace"]


def webhook_hostnames(objects: Sequence[Obj]) -> list[str]:
    name, namespace = webhook_service(objects)
    return [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]


def webhook_via_loopback(config: Obj, port: int) -> Obj:
    """The chart's MutatingWebhookConfiguration with each ``clientConfig.service`` replaced by
    a ``url:`` with the same DNS name and path on ``port`` (caBundle untouched)."""
    result = copy.deepcopy(config)
    for hook in result["webhooks"]:
        service = hook["clientConfig"].pop("service")
        path = service.get("path", "/")
        hook["clientConfig"]["url"] = (
            f"https://{service['name']}.{service['namespace']}.svc:{port}{path}"
        )
    return result


def webhook_tls(objects: Sequence[Obj], directory: Path) -> tuple[Path, Path, bytes]:
    """The chart's webhook certificate and key written to ``directory``, and its CA (PEM)."""
    config = find(objects, "MutatingWebhookConfiguration")
    ca = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    name, _ = webhook_service(objects)
    secrets = [o for o in objects if o["kind"] == "Secret" and o.get("type") == "kubernetes.io/tls"]
    if not secrets:
        raise KeyError(f"the chart renders no TLS Secret for {name}")
    data = secrets[0]["data"]
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(base64.b64decode(data["tls.crt"]))
    key.write_bytes(base64.b64decode(data["tls.key"]))
    key.chmod(0o600)
    return cert, key, ca


def operator_environment(
    objects: Sequence[Obj], *, pod_name: str, redis_url: str, overrides: Mapping[str, str]
) -> dict[str, str]:
    """The operator container's environment as the chart's Deployment sets it: literal values,
    the pod's namespace and name (fieldRef), the Redis URL (its Secret), then ``overrides``."""
    deployment = find(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    namespace = deployment["metadata"].get("namespace", NAMESPACE)
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        field = (source.get("fieldRef") or {}).get("fieldPath")
        if field == "metadata.namespace":
            env[item["name"]] = namespace
        elif field == "metadata.name":
            env[item["name"]] = pod_name
        elif "secretKeyRef" in source and item["name"].endswith("REDIS_URL"):
            env[item["name"]] = redis_url
        else:
            raise AssertionError(f"operator env {item['name']}: no stand-in for {source}")
    env.update(overrides)
    return env


def operator_command(objects: Sequence[Obj]) -> list[str]:
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return [*container.get("command", []), *container.get("args", [])]


@dataclass
class ChartInstall:
    objects: list[dict[str, Any]]
    webhook_port: int
    cert_file: Path
    key_file: Path
    ca_pem: bytes
    service_account: tuple[str, str]  # (namespace, name)
    kubeconfig: Path  # the ServiceAccount's token

    @property
    def webhook_config(self) -> dict[str, Any]:
        return find(self.objects, "MutatingWebhookConfiguration")
