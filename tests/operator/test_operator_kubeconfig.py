"""The operator started outside a cluster with a kubeconfig (as docs/install.md documents):
it starts, kopf and its own client (admission, Secrets, Events) use the kubeconfig's
credentials, and the webhook answers with the namespace it read through them."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from spendgate.operator.kube.credentials import CredentialsError
from spendgate.operator.runtime.main import run, run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from tests.support.kube_emulator import API_CALLS, Kubectl, started_emulator
from tests.support.redis_servers import _free_ports
from tests.support.webhook_certs import WebhookCA

pytestmark = pytest.mark.timeout(40)
TOKEN = "kubeconfig-token-0123"


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "local", "user": "me"}}],
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": TOKEN}}],
    }
    path.write_text(json.dumps(config))
    return path


async def test_operator_starts_out_of_cluster_with_a_kubeconfig(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = WebhookCA.create(tmp_path)
    ca.issue()
    webhook_port, health_port = _free_ports(2)
    settings = OperatorSettings(
        redis_url=redis_url,
        leader_election=False,
        webhook_host="127.0.0.1",
        webhook_port=webhook_port,
        webhook_cert_file=str(ca.cert_file),
        webhook_key_file=str(ca.key_file),
        health_host="127.0.0.1",
        health_port=health_port,
        status_interval_s=0.5,
        kube_timeout_s=3.0,
        shutdown_drain_s=0.1,
    )
    client = redis.asyncio.Redis.from_url(redis_url)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with started_emulator() as (emulator, url):
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "config", url)))
        kubectl = Kubectl(emulator)
        labels = {"spendgate.dev/inject": "true"}
        await kubectl.create("v1/namespaces", {"metadata": {"name": "default"}})
        await kubectl.create("v1/namespaces", {"metadata": {"name": "models", "labels": labels}})
        first_call = len(API_CALLS)
        tokens: set[str] = set()
        handle = emulator._handle

        async def recording(request: Any) -> Any:
            if not str(request.headers.get("User-Agent", "")).startswith("kmock/"):
                tokens.add(str(request.headers.get("Authorization")))
            return await handle(request)

        emulator._handle = recording  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(run_operator(settings, redis_client=client, stop_flag=stop))
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(300):
                    assert not task.done(), task.exception()
                    try:
                        async with session.get(f"http://127.0.0.1:{health_port}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the operator did not become ready")
                review = admission_review("models")
                context = ssl.create_default_context(cafile=str(ca.ca_file))
                async with session.post(
                    f"https://localhost:{webhook_port}/mutate-pods", json=review, ssl=context
                ) as response:
                    answer = (await response.json())["response"]
            assert answer["allowed"] is True and answer.get("patchType") == "JSONPatch", answer
            await kubectl.create(
                "spendgate.dev/v1alpha1/customerbudgets",
                {
                    "apiVersion": "spendgate.dev/v1alpha1",
                    "kind": "CustomerBudget",
                    "metadata": {"name": "acme", "namespace": "default"},
                    "spec": {"customerId": "acme", "currency": "USD", "balance": "5"},
                },
            )

            def ready() -> Any:
                body = kubectl.get("spendgate.dev/v1alpha1/customerbudgets", "default", "acme")
                return body and (body.get("status") or {}).get("state") == "Active"

            await kubectl.wait_for(ready, within=15, what="the budget reconciled, Active")
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await client.aclose()
    ours = API_CALLS[first_call:]
    assert any(c.path == "/api/v1/namespaces/models" for c in ours), "admission read no label"
    assert {c.user_agent.split("/")[0] for c in ours} >= {"kopf", "spendgate-operator"}
    # every call -- kopf's and the operator's own client's -- carried the kubeconfig's token
    assert tokens == {f"Bearer {TOKEN}"}


def admission_review(namespace: str) -> dict[str, Any]:
    pod = {
        "metadata": {
            "generateName": "model-",
            "namespace": namespace,
            "annotations": {"spendgate.dev/upstream-port": "8000"},
        },
        "spec": {
            "containers": [{"name": "model", "image": "m", "ports": [{"containerPort": 8000}]}]
        },
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": pod,
        },
    }


def test_no_credentials_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run(OperatorSettings(health_port=0, webhook_port=0))
    message = str(exit_.value)
    assert message.startswith("spendgate operator: no Kubernetes credentials: not in a cluster")
    assert "no kubeconfig" in message
    assert isinstance(CredentialsError("x"), RuntimeError)
