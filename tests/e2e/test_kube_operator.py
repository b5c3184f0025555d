"""``spendgate operator`` against the real kube-apiserver, as the chart's ServiceAccount.

A missing RBAC permission, a status patch the server's schema rejects, a Pod patch its
validation refuses, or a webhook TLS mistake fails these tests: the server decides, not a mock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spendgate.config_store import ConfigStore
from tests.support.e2e_chart import ChartInstall
from tests.support.e2e_operator import OperatorProcess, running_operator
from tests.support.kube_control_plane import ControlPlane
from tests.support.redis_servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CB = "customerbudgets.spendgate.dev"


def eventually(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except AssertionError as error:
            last = error
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what} (last: {last})")


@pytest.fixture(scope="module")
def operator_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    socket_path = tmp_path_factory.mktemp("redis-socket") / "redis.sock"
    server = RedisServer(extra_args=["--unixsocket", str(socket_path), "--unixsocketperm", "777"])
    server.start()
    server.socket_path = socket_path  # type: ignore[attr-defined]
    yield server
    server.close()


@pytest.fixture(scope="module")
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


def store_lookup(redis_url: str, api_key: str) -> Any:
    async def lookup() -> Any:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await ConfigStore(client).lookup_key(
                hashlib.sha256(api_key.encode()).hexdigest()
            )
        finally:
            await client.aclose()

    return asyncio.run(lookup())


def budget(plane: ControlPlane, name: str) -> dict[str, Any]:
    result: dict[str, Any] = plane.get_json(f"{CB}/{name}", "-n", "default")
    return result


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for item in (body.get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return dict(item)
    return None


def test_operator_runs_out_of_cluster_with_the_chart_service_account(
    operator: OperatorProcess,
) -> None:
    status, body = operator.get("/readyz")
    assert status == 200, body
    text = operator.text()
    assert "Forbidden" not in text and "forbidden" not in text, operator.tail()
    assert "not in a cluster" not in text


def test_budget_status_conditions_and_events_as_kubectl_shows_them(
    kube_plane: ControlPlane, operator: OperatorProcess
) -> None:
    ready = eventually(
        lambda: (c := condition(budget(kube_plane, "acme"), "Ready")) and c["status"] == "True",
        what="acme Ready=True",
    )
    assert ready
    acme = budget(kube_plane, "acme")
    assert acme["status"]["observedGeneration"] == acme["metadata"]["generation"]
    table = kube_plane.kubectl("get", "cb", "-n", "default").stdout.splitlines()
    header = table[0].split()
    row = next(line.split() for line in table[1:] if line.startswith("acme "))
    assert len(row) == len(header), (table[0], row)
    assert "5.00" in " ".join(row), table
    events = eventually(
        lambda: kube_plane.get_json(
            "events", "-n", "default", "--field-selector", "involvedObject.name=acme"
        )["items"],
        what="Events on acme",
    )
    for event in events:
        assert event.get("action") != "Action?", event
        assert event["reason"], event


def test_secret_rotation_reaches_redis(
    kube_plane: ControlPlane, operator: OperatorProcess, operator_redis: RedisServer
) -> None:
    old, new = "sk-demo-acme-prod-7Qm2vX9c", "sk-e2e-rotated-acme-prod-1f2e3d"
    eventually(lambda: store_lookup(operator_redis.url, old), what="the example key in Redis")
    started = time.monotonic()
    kube_plane.kubectl(
        "patch", "secret", "acme-keys", "-n", "default", "--type=merge",
        "-p", json.dumps({"stringData": {"production": new}}),
    )  # fmt: skip
    eventually(lambda: store_lookup(operator_redis.url, new), what="the rotated key in Redis")
    elapsed = time.monotonic() - started
    assert store_lookup(operator_redis.url, old) is None
    assert elapsed < 15, elapsed


def test_deleting_a_budget_runs_the_finalizer(
    kube_plane: ControlPlane, operator: OperatorProcess, operator_redis: RedisServer
) -> None:
    key = "sk-demo-tinyco-Hb3kW8sQ"
    eventually(lambda: store_lookup(operator_redis.url, key), what="tinyco's key in Redis")
    finalizers = budget(kube_plane, "tinyco")["metadata"].get("finalizers") or []
    assert finalizers, "the operator puts a finalizer on budgets"
    kube_plane.kubectl("delete", f"{CB}/tinyco", "-n", "default", "--timeout=30s")
    gone = kube_plane.kubectl("get", f"{CB}/tinyco", "-n", "default", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    assert store_lookup(operator_redis.url, key) is None


SIDECAR = "spendgate-sidecar"


def model_pods(plane: ControlPlane) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = plane.get_json("pods", "-n", "default", "-l", "app=llama-3-8b")[
        "items"
    ]
    return pods


@pytest.fixture(scope="module")
def injected_pods(kube_plane: ControlPlane, operator: OperatorProcess) -> list[dict[str, Any]]:
    """examples/model-deployment.yaml applied: kube-controller-manager creates the Pods, the API
    server calls the webhook for each, and stores what it admitted."""
    kube_plane.kubectl("apply", "-f", str(EXAMPLES / "model-deployment.yaml"))
    pods = eventually(
        lambda: len(found := model_pods(kube_plane)) == 2 and found,
        timeout_s=60,
        what="two llama-3-8b pods created by the Deployment",
    )
    return list(pods)


def test_the_api_server_calls_the_webhook_and_stores_the_injected_pod(
    injected_pods: list[dict[str, Any]],
) -> None:
    for pod in injected_pods:
        names = [c["name"] for c in pod["spec"]["containers"]]
        init = [c["name"] for c in pod["spec"].get("initContainers") or []]
        # 1.20 has no native sidecars: the regular-container form, after the model
        assert names == ["vllm", SIDECAR], names
        assert SIDECAR not in init
        sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR)
        assert sidecar["command"] == ["spendgate", "sidecar"]
        assert {p["name"] for p in sidecar["ports"]} >= {"spendgate"}
        assert pod["metadata"]["annotations"].get("spendgate.dev/injected")


def test_injection_is_idempotent_when_the_server_invokes_the_webhook_again(
    kube_plane: ControlPlane, injected_pods: list[dict[str, Any]]
) -> None:
    stored = injected_pods[0]
    again = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": stored["metadata"]["name"] + "-again",
            "namespace": "default",
            "labels": stored["metadata"]["labels"],
            "annotations": stored["metadata"]["annotations"],
        },
        "spec": stored["spec"],
    }
    status, result = kube_plane.request("POST", "/api/v1/namespaces/default/pods?dryRun=All", again)
    assert status == 201, result
    assert [c["name"] for c in result["spec"]["containers"]] == ["vllm", SIDECAR]
    assert result["spec"]["containers"] == stored["spec"]["containers"]


def resolve_env(
    plane: ControlPlane, pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, str]:
    """The container's environment as the kubelet would give it."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            env[item["name"]] = {
                "metadata.name": pod["metadata"]["name"],
                "metadata.namespace": pod["metadata"]["namespace"],
                "status.podIP": "127.0.0.1",
            }[path]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = plane.get_json(f"secret/{ref['name']}", "-n", pod["metadata"]["namespace"])
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "resourceFieldRef" in source:
            continue  # limits the sidecar does not read
        else:
            raise AssertionError(f"env {item['name']}: unsupported source {source}")
    return env


class PodNetwork:
    """A network namespace standing in for the pod's: its own loopback, so the injected
    container's ports (8080, the model's 8000) are used exactly as the pod spec says. Redis is
    reached through a Unix socket, which crosses network namespaces."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []
        self.holder: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 600"],
            stdin=subprocess.DEVNULL,
        )
        eventually(
            lambda: subprocess.run(
                ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "ip", "-o", "link"],  # type: ignore[union-attr]
                capture_output=True, text=True,
            ).stdout.count("UP") >= 1,
            timeout_s=10,
            what="the pod network namespace",
        )  # fmt: skip

    def enter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [*self.enter(), *argv], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def post(self, port: int, path: str, body: dict[str, Any], key: str) -> tuple[int, Any]:
        script = (
            "import json,sys,urllib.request,urllib.error\n"
            "r=urllib.request.Request(sys.argv[1],data=sys.argv[2].encode(),"
            "headers={'Authorization':'Bearer '+sys.argv[3],'Content-Type':'application/json'})\n"
            "try:\n"
            " with urllib.request.urlopen(r,timeout=10) as s:\n"
            "  print(s.status); print(s.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n"
        )
        result = subprocess.run(
            [*self.enter(), sys.executable, "-c", script,
             f"http://127.0.0.1:{port}{path}", json.dumps(body), key],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            raise ConnectionError(result.stderr.strip().splitlines()[-1:])
        status, _, payload = result.stdout.partition("\n")
        try:
            return int(status), json.loads(payload)
        except ValueError:
            return int(status), payload

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in [*self.processes, *([self.holder] if self.holder else [])]:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.fixture
def pod_network(tmp_path: Path) -> Iterator[PodNetwork]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("the pod's network namespace needs root, unshare and nsenter")
    network = PodNetwork(tmp_path)
    network.start()
    yield network
    network.stop()


def test_sidecar_started_from_the_injected_container_meters_and_refuses(
    kube_plane: ControlPlane,
    operator: OperatorProcess,
    operator_redis: RedisServer,
    injected_pods: list[dict[str, Any]],
    pod_network: PodNetwork,
) -> None:
    # The Redis URL Secret the chart copies into model namespaces, here pointing at the test
    # Redis's Unix socket (the pod network has no route to the host's loopback).
    socket_url = f"unix://{operator_redis.socket_path}"  # type: ignore[attr-defined]
    kube_plane.kubectl(
        "create", "secret", "generic", "spendgate-redis", "-n", "default",
        f"--from-literal=url={socket_url}",
    )  # fmt: skip
    zero_key = "sk-e2e-zeroco-5c4b3a29"
    kube_plane.kubectl(
        "apply", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": "zeroco-keys", "namespace": "default"},
             "stringData": {"api-key": zero_key}},
            {"apiVersion": "spendgate.dev/v1alpha1", "kind": "CustomerBudget",
             "metadata": {"name": "zeroco", "namespace": "default"},
             "spec": {"customerId": "zeroco", "mode": "prepaid", "currency": "USD",
                      "balance": "0", "apiKeys": [{"name": "main",
                                                    "secretRef": {"name": "zeroco-keys"}}]}},
        ]}),
    )  # fmt: skip
    eventually(lambda: store_lookup(operator_redis.url, zero_key), what="zeroco's key in Redis")

    pod = injected_pods[0]
    model = next(c for c in pod["spec"]["containers"] if c["name"] == "vllm")
    model_port = int(model["args"][model["args"].index("--port") + 1])
    container = next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR)
    env = resolve_env(kube_plane, pod, container)
    argv = [*container["command"], *(container.get("args") or [])]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(pod_network.directory)}
    pod_network.spawn(
        "model",
        [str(Path(sys.executable).parent / "spendgate"), "standin-model",
         "--host", "127.0.0.1", "--port", str(model_port)],
        base_env,
    )  # fmt: skip
    pod_network.spawn("sidecar", argv, {**base_env, **env})
    listen_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "spendgate")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
    acme_key = "sk-demo-acme-ci-L4t8pZ1r"

    def served() -> tuple[int, Any] | None:
        try:
            return pod_network.post(listen_port, "/v1/chat/completions", chat, acme_key)
        except ConnectionError:
            return None

    status, answer = eventually(served, timeout_s=30, what="the sidecar answering")
    assert status == 200, (answer, pod_network.log("sidecar")[-2000:])
    assert answer["usage"]["completion_tokens"] == 4

    def spent() -> str | None:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "spendgate"), "balance", "--json",
             "--redis", operator_redis.url, "acme"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        amount = json.loads(result.stdout)["spentThisPeriod"]
        return None if float(amount) == 0 else str(amount)

    assert eventually(spent, timeout_s=10, what="acme charged for the request")
    status, refusal = pod_network.post(listen_port, "/v1/chat/completions", chat, zero_key)
    assert status == 402, refusal
