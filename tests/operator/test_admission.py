"""The admission webhook over real HTTPS: AdmissionReview v1 in and out, the JSON patch applied
to model pods, re-invocation, refusals, malformed reviews and certificate rotation."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from cryptography import x509

from spendgate.operator.admission.injection import InjectionDefaults
from spendgate.operator.admission.server import start_admission
from spendgate.operator.admission.tls import ReloadingTLS
from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.model_pods import NAMESPACE, OPERATOR_NAMESPACE, sidecars, triton_pod, vllm_pod
from tests.support.webhook_certs import WebhookCA

NAMESPACES = {NAMESPACE: {}, "team-a": {"spendgate.dev/inject": "true"}}


@pytest.fixture
def ca(tmp_path: Path) -> WebhookCA:
    ca = WebhookCA.create(tmp_path)
    ca.issue()
    return ca


@dataclass
class Cluster:
    """What the webhook asks the API server, answered from memory, with a log of the asks."""

    version: tuple[int, int] = (1, 30)
    namespace_calls: list[str] = field(default_factory=list)
    version_calls: int = 0

    async def namespace_labels(self, name: str) -> Mapping[str, str]:
        self.namespace_calls.append(name)
        if name not in NAMESPACES:
            raise RuntimeError(f"namespaces {name!r} is forbidden")
        return NAMESPACES[name]

    async def server_version(self) -> tuple[int, int]:
        self.version_calls += 1
        return self.version


@dataclass
class Webhook:
    port: int
    client: aiohttp.ClientSession
    cluster: Cluster
    ca: WebhookCA

    async def post(self, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        url = f"https://127.0.0.1:{self.port}/mutate-pods"
        headers = {"Content-Type": "application/json"}
        async with self.client.post(url, data=data, headers=headers) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return response.status, json.loads(text) if is_json else text

    async def admit(self, pod: dict[str, Any], **request: Any) -> dict[str, Any]:
        """The AdmissionResponse for ``pod``, with its patch decoded as ``ops``."""
        status, body = await self.post(review(pod, **request))
        assert status == 200, body
        assert (body["apiVersion"], body["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
        response = body["response"]
        assert response["uid"] == request.get("uid", "uid-1")
        if "patch" in response:
            assert response["patchType"] == "JSONPatch"
            response["ops"] = json.loads(base64.b64decode(response["patch"]))
        return response


def review(pod: dict[str, Any], *, uid: str = "uid-1", namespace: str = NAMESPACE, **extra: Any):
    request = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace,
        "operation": "CREATE",
        "object": pod,
        "dryRun": False,
        **extra,
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def client_tls(ca: WebhookCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_file))


@asynccontextmanager
async def running(ca: WebhookCA, cluster: Cluster, **injection: Any) -> AsyncIterator[Webhook]:
    settings = OperatorSettings(
        namespace=OPERATOR_NAMESPACE,
        webhook_host="127.0.0.1",
        webhook_port=0,
        webhook_cert_file=str(ca.cert_file),
        webhook_key_file=str(ca.key_file),
        injection=InjectionDefaults(**injection),
    )
    async with (
        start_admission(settings, cluster.namespace_labels, cluster.server_version) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls(ca))) as client,
    ):
        yield Webhook(server.port, client, cluster, ca)


@pytest.fixture
async def webhook(ca: WebhookCA) -> AsyncIterator[Webhook]:
    async with running(ca, Cluster()) as webhook:
        yield webhook


async def test_vllm_pod_gets_the_sidecar_and_reinvocation_changes_nothing(webhook: Webhook):
    pod = vllm_pod()
    response = await webhook.admit(pod)
    assert response["allowed"] is True
    after = jsonpatch.apply_patch(pod, response["ops"])
    (sidecar,) = sidecars(after)
    assert after["spec"]["initContainers"] == [sidecar]
    assert sidecar["restartPolicy"] == "Always"
    assert after["spec"]["containers"] == pod["spec"]["containers"]
    assert after["metadata"]["annotations"]["spendgate.dev/injected"] == "0.1.0"
    # The pod's own label decided: no namespace lookup was needed.
    assert webhook.cluster.namespace_calls == []
    # reinvocationPolicy: IfNeeded sends the mutated pod again.
    again = await webhook.admit(after, uid="uid-2")
    assert again == {"uid": "uid-2", "allowed": True}


async def test_already_injected_pods_are_left_alone(webhook: Webhook) -> None:
    pod = triton_pod()
    pod["spec"]["containers"].append({"name": "spendgate-sidecar", "image": "older:0.0.9"})
    response = await webhook.admit(pod, namespace="team-a")
    assert response == {"uid": "uid-1", "allowed": True}


async def test_namespace_labels_opt_in_and_lookup_failures(webhook: Webhook) -> None:
    pod = triton_pod()
    response = await webhook.admit(pod, namespace="team-a")
    after = jsonpatch.apply_patch(pod, response["ops"])
    assert [c["name"] for c in after["spec"]["initContainers"]] == [
        "fetch-models",
        "spendgate-sidecar",
    ]
    assert "ops" not in await webhook.admit(pod)  # models: not opted in
    refused = await webhook.admit(pod, namespace="locked")
    assert refused["allowed"] is False
    assert refused["status"]["code"] == 500
    assert "cannot read namespace locked" in refused["status"]["message"]
    assert webhook.cluster.namespace_calls == ["team-a", NAMESPACE, "locked"]
    skipped = await webhook.admit(vllm_pod(), namespace="kube-system")
    assert skipped == {"uid": "uid-1", "allowed": True}


async def test_bad_annotations_are_refused_with_the_message(webhook: Webhook) -> None:
    response = await webhook.admit(vllm_pod(fail_mode="sometimes", upstream_port="80000"))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    message = response["status"]["message"]
    assert 'spendgate.dev/fail-mode: "sometimes"; allowed: closed, open' in message
    assert 'spendgate.dev/upstream-port: "80000"; allowed: an integer 1-65535' in message
    assert "patch" not in response


async def test_only_pod_creation_is_mutated(webhook: Webhook) -> None:
    for extra in (
        {"operation": "UPDATE"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"subResource": "status"},
    ):
        assert await webhook.admit(vllm_pod(), **extra) == {"uid": "uid-1", "allowed": True}


MALFORMED = [
    b"{not json",
    b"[]",
    {"kind": "AdmissionReview", "request": {"uid": "x"}},
    {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}},
    review("not a pod"),  # type: ignore[arg-type]
    review(vllm_pod(), namespace=""),
]


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_reviews_get_http_400(webhook: Webhook, body: Any) -> None:
    status, text = await webhook.post(body)
    assert status == 400
    assert "malformed AdmissionReview" in text


async def test_native_sidecar_support_follows_the_cluster_version(ca: WebhookCA) -> None:
    async with running(ca, Cluster(version=(1, 28))) as old:
        for uid in ("a", "b", "c"):
            pod = vllm_pod()
            after = jsonpatch.apply_patch(pod, (await old.admit(pod, uid=uid))["ops"])
            assert [c["name"] for c in after["spec"]["containers"]] == ["vllm", "spendgate-sidecar"]
            assert "initContainers" not in after["spec"]
        assert old.cluster.version_calls == 1  # cached
    forced = Cluster(version=(1, 28))
    async with running(ca, forced, native_sidecars=True) as webhook:
        response = await webhook.admit(vllm_pod())
        assert response["ops"][1]["path"] == "/spec/initContainers"
        assert forced.version_calls == 0


async def test_healthz(webhook: Webhook) -> None:
    async with webhook.client.get(f"https://127.0.0.1:{webhook.port}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def presented_serial(webhook: Webhook, server_hostname: str | None) -> int:
    """A new TLS handshake (with or without SNI); the serial of the server's certificate."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", webhook.port, ssl=client_tls(webhook.ca), server_hostname=server_hostname
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


async def test_rotated_certificate_is_served_without_restart(ca: WebhookCA) -> None:
    first = ca.issue()
    async with running(ca, Cluster()) as webhook:
        assert await presented_serial(webhook, "localhost") == first
        second = ca.issue()
        for sni in ("localhost", None):  # by name, and by IP (no SNI at all)
            assert await presented_serial(webhook, sni) == second
        # A half-done rotation (new certificate, old key) keeps serving the last good pair...
        ca.issue(write_key=False)
        assert await presented_serial(webhook, "localhost") == second
        assert (await webhook.admit(vllm_pod()))["allowed"] is True
        # ...until the pair is complete again.
        third = ca.issue()
        assert await presented_serial(webhook, "localhost") == third
        # A new connection of the API server's completes a review over the new certificate.
        connector = aiohttp.TCPConnector(ssl=client_tls(ca))
        async with aiohttp.ClientSession(connector=connector) as webhook.client:
            assert "ops" in await webhook.admit(vllm_pod())


async def test_webhook_needs_certificate_files() -> None:
    with pytest.raises(ValueError, match="webhook_cert_file and webhook_key_file"):
        async with start_admission(
            OperatorSettings(), Cluster().namespace_labels, Cluster().server_version
        ):
            pass


def test_secret_volume_updates_are_noticed(tmp_path: Path) -> None:
    """The kubelet updates a Secret volume by pointing the ``..data`` symlink at a new folder."""
    for name in ("..2024_01_01", "..2024_02_01"):
        (tmp_path / name).mkdir()
        WebhookCA.create(tmp_path / name).issue()
    (tmp_path / "..data").symlink_to("..2024_01_01")
    for file in ("tls.crt", "tls.key"):
        (tmp_path / file).symlink_to(f"..data/{file}")
    tls = ReloadingTLS(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    assert tls.refresh() is False
    (tmp_path / "..data_tmp").symlink_to("..2024_02_01")
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")
    assert tls.refresh() is True
    assert tls.refresh() is False
    assert tls.reloads == 1


async def test_injection_log_lines_name_the_pod_in_text_format(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    """Text logs (SPENDGATE_LOG_FORMAT=text) show which pod was injected or refused."""
    from spendgate.logs import RedactingFilter, TextFormatter

    caplog.set_level(logging.INFO, "spendgate.operator.admission")
    named = vllm_pod()
    named["metadata"]["name"] = "llama-0"
    await webhook.admit(named)
    unnamed = vllm_pod()  # a ReplicaSet's pod: named by the API server after admission
    await webhook.admit(unnamed, uid="uid-2")
    formatter = TextFormatter()
    lines = []
    for record in caplog.records:
        RedactingFilter().filter(record)
        lines.append(formatter.format(record))
    injected = [line for line in lines if "injected" in line]
    assert len(injected) == 2, lines
    assert f"pod={NAMESPACE}/llama-0 uid=uid-1" in injected[0]
    assert f"pod={NAMESPACE}/llama-3-8b-6b7c9d5f4- uid=uid-2" in injected[1]
