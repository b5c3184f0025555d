"""The operator against the real API server, as the chart runs it but out of the cluster (a
kubeconfig with the chart ServiceAccount's token): it reconciles the examples, the API server
calls its webhook over TLS for the example Deployment's pods, and the injected sidecar, started
from the stored Pod's container spec, meters and refuses against real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e_operator import OperatorProcess, budget, condition, eventually
from tests.support.kube_control_plane import ControlPlane, free_port
from tests.support.redis_servers import RedisServer
from tests.support.sidecar_processes import wait_ready

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
SIDECAR = "spendgate-sidecar"
ACME_KEY = "sk-demo-acme-prod-7Qm2vX9c"  # examples/budgets.yaml
TINYCO_KEY = "sk-demo-tinyco-Hb3kW8sQ"


def test_operator_reconciles_out_of_cluster_with_the_chart_account(
    kube_plane: ControlPlane, operator: OperatorProcess
) -> None:
    started = operator.wait_for_log(lambda r: r.get("msg") == "Kubernetes API")
    assert str(started["credentials"]).startswith("kubeconfig ")  # not in a cluster
    assert eventually(lambda: is_ready(kube_plane, "acme"), what="acme Ready=True")
    assert budget(kube_plane, "acme")["status"]["state"] == "Active"
    events = kube_plane.get_json(
        "events", "-n", "default", "--field-selector=involvedObject.name=acme"
    )
    ours = [e for e in events["items"] if e.get("reportingComponent") == "spendgate-operator"]
    assert ours and {e["action"] for e in ours} <= {"Reconcile", "Refresh"}, ours
    text = operator.text()
    assert "forbidden" not in text.lower() and "Traceback" not in text


def is_ready(plane: ControlPlane, name: str) -> bool:
    return (condition(budget(plane, name), "Ready") or {}).get("status") == "True"


def stored_pods(plane: ControlPlane) -> list[dict[str, Any]]:
    pods = plane.get_json("pods", "-n", "default", "-l", "app=llama-3-8b")["items"]
    return list(pods)


@pytest.fixture(scope="module")
def injected_pod(kube_plane: ControlPlane, operator: OperatorProcess) -> dict[str, Any]:
    """The example Deployment applied: kube-controller-manager creates its Pods, the API server
    calls the webhook for each; the stored Pod as the server kept it."""
    if not kube_plane.private_hosts:
        pytest.skip("the webhook's DNS name needs a private /etc/hosts (root and unshare)")
    kube_plane.kubectl("apply", "-f", str(EXAMPLES / "model-deployment.yaml"))
    pods = eventually(lambda: len(stored_pods(kube_plane)) == 2 and stored_pods(kube_plane), 60)
    return dict(pods[0])


def test_the_api_server_calls_the_webhook_and_stores_a_valid_pod(
    kube_plane: ControlPlane, injected_pod: dict[str, Any]
) -> None:
    for pod in stored_pods(kube_plane):
        names = [c["name"] for c in pod["spec"]["containers"]]
        assert names == ["vllm", SIDECAR], names  # the regular-container form on 1.20
        assert pod["metadata"]["annotations"]["spendgate.dev/injected"]
        assert not pod["spec"].get("initContainers")
    # Re-invocation (reinvocationPolicy IfNeeded), and a pod created already injected: the
    # webhook adds nothing the second time, and the server accepts the pod as it is.
    copy = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-copy",
            "namespace": "default",
            "labels": {"spendgate.dev/inject": "true"},
            "annotations": injected_pod["metadata"]["annotations"],
        },
        "spec": injected_pod["spec"],  # as stored: the sidecar, the token volume, ...
    }
    created = json.loads(
        kube_plane.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(copy)).stdout
    )
    try:
        assert [c["name"] for c in created["spec"]["containers"]] == ["vllm", SIDECAR]
    finally:
        kube_plane.kubectl("delete", "pod", "llama-copy", "-n", "default", "--wait=false")


def resolved_env(container: dict[str, Any], pod: dict[str, Any], redis_url: str) -> dict[str, str]:
    """The container's env as the kubelet would resolve it; the Redis Secret is the test's."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[item["name"]] = pod["metadata"][path.split(".")[1]]
        elif "secretKeyRef" in source and item["name"] == "SPENDGATE_REDIS_URL":
            env[item["name"]] = redis_url
        else:
            raise AssertionError(f"no stand-in for {item}")
    return env


@pytest.fixture
def sidecar(
    injected_pod: dict[str, Any], operator_redis: RedisServer, tmp_path: Path
) -> Iterator[str]:
    """The injected container run as a process: its command, args and env; only the ports are
    free ones here (the pod's 8080/8081/8000 may be taken on this machine)."""
    container = next(c for c in injected_pod["spec"]["containers"] if c["name"] == SIDECAR)
    env = resolved_env(container, injected_pod, operator_redis.url)
    assert env["SPENDGATE_UPSTREAM"] == "http://127.0.0.1:8000"  # the upstream-port annotation
    assert env["SPENDGATE_PRICEBOOK"] == "default/default"
    port, probe, model = free_port(), free_port(), free_port()
    env |= {
        "SPENDGATE_LISTEN": f"127.0.0.1:{port}",
        "SPENDGATE_PROBE_LISTEN": f"127.0.0.1:{probe}",
        "SPENDGATE_UPSTREAM": f"http://127.0.0.1:{model}",
    }
    standin = subprocess.Popen(
        [str(BIN / "spendgate"), "standin-model", "--host", "127.0.0.1", "--port", str(model)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    command = [str(BIN / container["command"][0]), *container["command"][1:]]
    process = subprocess.Popen(
        [*command, *container.get("args", [])],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(probe, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        for proc in (process, standin):
            proc.terminate()
            proc.wait(10)


def chat(url: str, key: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_the_injected_sidecar_meters_and_refuses(kube_plane: ControlPlane, sidecar: str) -> None:
    before = budget(kube_plane, "acme")["status"]["balance"]
    status, _ = chat(sidecar, ACME_KEY)
    assert status == 200
    eventually(
        lambda: budget(kube_plane, "acme")["status"]["balance"] != before,
        what="acme's balance in its status after a metered request",
    )
    statuses = [chat(sidecar, TINYCO_KEY)[0] for _ in range(20)]
    assert statuses[0] == 200 and statuses[-1] == 402, statuses
    assert set(statuses) <= {200, 402}
    assert chat(sidecar, "sk-not-a-key-0000000000")[0] == 401


ORGANISATION = ["initech", "initech-support", "initech-research", "initech-chatbot"]
CHATBOT_KEY = "sk-demo-initech-chatbot-Jd67vL3s"  # examples/organisation.yaml
ADMIN_KEY = "sk-demo-initech-admin-Hq83nB2x"


def test_an_organisation_tree_on_the_real_api_server(
    kube_plane: ControlPlane, sidecar: str
) -> None:
    """examples/organisation.yaml through the real API server: every level Ready, the Parent
    column, a request from a leaf's key served, and a suspended middle level refusing its
    subtree by name while the root's own key is still served."""
    kube_plane.kubectl("apply", "-f", str(EXAMPLES / "organisation.yaml"))
    try:
        for name in ORGANISATION:
            eventually(lambda n=name: is_ready(kube_plane, n), what=f"{name} Ready=True")
        table = kube_plane.kubectl("get", "cb", "-n", "default").stdout.splitlines()
        assert "PARENT" in table[0].split()
        chatbot = next(line.split() for line in table if line.startswith("initech-chatbot "))
        assert "initech-research" in chatbot
        assert chat(sidecar, CHATBOT_KEY)[0] == 200

        patch = json.dumps({"spec": {"policy": {"suspended": True}}})
        kube_plane.kubectl(
            "patch", "cb", "initech-research", "-n", "default", "--type=merge", "-p", patch
        )

        def refused_by_research() -> bool:
            status, body = chat(sidecar, CHATBOT_KEY)
            message = str((body.get("error") or {}).get("message"))
            return status == 403 and "'initech-research'" in message

        eventually(refused_by_research, what="the chatbot key refused by its suspended parent")
        assert chat(sidecar, ADMIN_KEY)[0] == 200
    finally:
        kube_plane.kubectl(
            "delete", "-f", str(EXAMPLES / "organisation.yaml"), "--wait=false", check=False
        )
