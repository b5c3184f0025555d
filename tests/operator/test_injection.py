"""Sidecar injection as pure functions: the JSON patch for real-looking model pods, opt-in and
opt-out, native vs regular sidecars, idempotency and every annotation a user can get wrong."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import jsonpatch
import pytest

from spendgate.operator.admission.injection import (
    Injection,
    InjectionDefaults,
    Refusal,
    escape,
    parse_quantity,
    plan_injection,
)
from tests.support.model_pods import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    env_of,
    sidecars,
    triton_pod,
    vllm_pod,
)

DEFAULTS = InjectionDefaults()
OPT_IN = {"spendgate.dev/inject": "true"}


def plan(pod: dict[str, Any], namespace: str = NAMESPACE, **kw: Any) -> Injection | Refusal:
    labels, native = kw.get("labels") or {}, kw.get("native", True)
    return plan_injection(
        pod,
        namespace,
        labels,
        kw.get("defaults", DEFAULTS),
        native_sidecars=native,
        operator_namespace=OPERATOR_NAMESPACE,
    )


def injected(pod: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result = plan(pod, **kwargs)
    assert isinstance(result, Injection), result
    assert result.patch, result.reason
    return jsonpatch.apply_patch(pod, result.patch)


def refusal(pod: dict[str, Any], **kwargs: Any) -> str:
    result = plan(pod, **kwargs)
    assert isinstance(result, Refusal), result
    return result.message


def test_vllm_template_gets_a_native_sidecar() -> None:
    pod = vllm_pod()
    after = injected(pod)
    (sidecar,) = after["spec"]["initContainers"]
    assert sidecar["name"] == "spendgate-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == DEFAULTS.image
    assert sidecar["command"] == ["spendgate", "sidecar"]
    assert env_of(sidecar) == {
        "SPENDGATE_UPSTREAM": "http://127.0.0.1:8000",
        "SPENDGATE_LISTEN": "0.0.0.0:8080",
        "SPENDGATE_PROBE_LISTEN": "0.0.0.0:8081",
        "SPENDGATE_PRICEBOOK": "models/llama-3-8b",
        "SPENDGATE_FAIL_MODE": "closed",
        "SPENDGATE_POD": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
        "SPENDGATE_NAMESPACE": {
            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}
        },
        "SPENDGATE_REDIS_URL": {"secretKeyRef": {"name": "spendgate-redis", "key": "url"}},
        "SPENDGATE_REDIS_CLUSTER": "false",
        "SPENDGATE_JOURNAL_DIR": "/var/lib/spendgate/journal",
    }
    # Fail-open charges are journaled on an emptyDir: they outlive a crashed container.
    assert sidecar["volumeMounts"] == [
        {"name": "spendgate-journal", "mountPath": "/var/lib/spendgate/journal"}
    ]
    assert after["spec"]["volumes"][-1] == {
        "name": "spendgate-journal",
        "emptyDir": {"sizeLimit": "64Mi"},
    }
    assert after["spec"]["volumes"][:-1] == pod["spec"].get("volumes", [])
    assert sidecar["ports"] == [
        {"name": "spendgate", "containerPort": 8080, "protocol": "TCP"},
        {"name": "spendgate-probe", "containerPort": 8081, "protocol": "TCP"},
    ]
    # Probes and metrics are on a port of their own, never the customer-facing one.
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "spendgate-probe"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "spendgate-probe"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "spendgate-probe"}
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    # The model container, its GPU and everything else are untouched.
    assert after["spec"]["containers"] == pod["spec"]["containers"]
    assert after["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = pod["metadata"]["annotations"]
    assert after["metadata"]["annotations"] == {**annotations, "spendgate.dev/injected": "0.1.0"}
    for key in ("spec", "metadata"):
        added = ("initContainers", "annotations", "volumes")
        rest = {k: v for k, v in after[key].items() if k not in added}
        assert rest == {k: v for k, v in pod[key].items() if k not in ("annotations", "volumes")}


def test_without_native_sidecars_a_regular_container_is_appended() -> None:
    after = injected(vllm_pod(), native=False)
    assert "initContainers" not in after["spec"]
    model, sidecar = after["spec"]["containers"]
    assert model["name"] == "vllm"
    assert sidecar["name"] == "spendgate-sidecar"
    assert "restartPolicy" not in sidecar
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_triton_keeps_its_init_containers_and_ports() -> None:
    pod = triton_pod()
    result = plan(pod, labels=OPT_IN)
    assert isinstance(result, Injection)
    assert [op["path"] for op in result.patch] == [
        "/metadata/annotations/spendgate.dev~1injected",
        "/spec/initContainers/-",
        "/spec/volumes" if "volumes" not in pod["spec"] else "/spec/volumes/-",
    ]
    after = jsonpatch.apply_patch(pod, result.patch)
    assert [c["name"] for c in after["spec"]["initContainers"]] == [
        "fetch-models",
        "spendgate-sidecar",
    ]
    assert env_of(sidecars(after)[0])["SPENDGATE_PRICEBOOK"] == "models/default"
    message = refusal(triton_pod(port="8002"), labels=OPT_IN)
    assert 'spendgate.dev/port: 8002 is already a port of container "triton"' in message
    regular = injected(triton_pod(port="9000"), labels=OPT_IN, native=False)
    assert [c["name"] for c in regular["spec"]["containers"]] == ["triton", "spendgate-sidecar"]
    assert env_of(sidecars(regular)[0])["SPENDGATE_LISTEN"] == "0.0.0.0:9000"
    message = refusal(triton_pod(probe_port="8001"), labels=OPT_IN)
    assert 'spendgate.dev/probe-port: 8001 is already a port of container "triton"' in message


def test_annotations_configure_the_sidecar() -> None:
    config = {"port": "9090", "probe_port": "9091", "pricebook": "tiny.v2", "fail_mode": "open"}
    pod = vllm_pod(
        **config, cpu_request="250m", memory_request="64Mi", cpu_limit="1.5", memory_limit="0.5Gi"
    )
    defaults = InjectionDefaults(
        redis_secret="redis-auth", redis_secret_key="uri", redis_cluster=True
    )
    (sidecar,) = sidecars(injected(pod, defaults=defaults))
    env = env_of(sidecar)
    assert env["SPENDGATE_LISTEN"] == "0.0.0.0:9090"
    assert env["SPENDGATE_PRICEBOOK"] == "models/tiny.v2"
    assert env["SPENDGATE_FAIL_MODE"] == "open"
    assert env["SPENDGATE_REDIS_URL"] == {"secretKeyRef": {"name": "redis-auth", "key": "uri"}}
    assert env["SPENDGATE_REDIS_CLUSTER"] == "true"
    assert sidecar["ports"][0]["containerPort"] == 9090
    assert env["SPENDGATE_PROBE_LISTEN"] == "0.0.0.0:9091"
    assert sidecar["ports"][1] == {
        "name": "spendgate-probe",
        "containerPort": 9091,
        "protocol": "TCP",
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "250m", "memory": "64Mi"},
        "limits": {"cpu": "1.5", "memory": "0.5Gi"},
    }
    # Failing open means serving without Redis: Redis must not take the pod out of Services.
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_namespace_opt_in_and_pod_opt_out() -> None:
    pod = vllm_pod()
    del pod["metadata"]["labels"]["spendgate.dev/inject"]
    assert plan(pod) == Injection([], "not opted in")
    assert plan(pod, labels={"spendgate.dev/inject": "false"}) == Injection([], "not opted in")
    assert sidecars(injected(pod, labels=OPT_IN))
    pod["metadata"]["labels"]["spendgate.dev/inject"] = "false"
    result = plan(pod, labels=OPT_IN)
    assert result == Injection([], "pod label spendgate.dev/inject=false")


@pytest.mark.parametrize("namespace", ["kube-system", OPERATOR_NAMESPACE])
def test_system_and_operator_namespaces_are_never_injected(namespace: str) -> None:
    result = plan(vllm_pod(), namespace, labels=OPT_IN)
    assert result == Injection([], f"namespace {namespace} is never injected")


@pytest.mark.parametrize("native", [True, False])
def test_injection_is_idempotent(native: bool) -> None:
    first = injected(vllm_pod(), native=native)
    # Re-invocation (reinvocationPolicy: IfNeeded), or a cluster that changed its mind.
    for again_native in (True, False):
        assert plan(first, native=again_native) == Injection([], "already injected")
    # The container, not the annotation, is what counts.
    other = copy.deepcopy(first)
    other["metadata"]["annotations"].pop("spendgate.dev/injected")
    assert plan(other, native=native) == Injection([], "already injected")
    assert len(sidecars(first)) == 1


def test_absent_and_null_lists_and_maps() -> None:
    pod = vllm_pod()
    pod["metadata"]["annotations"] = None  # and with them the required upstream port
    assert "spendgate.dev/upstream-port is required" in refusal(pod)
    pod = {"spec": {"containers": [{"name": "model", "image": "m"}]}}  # no metadata at all
    assert "spendgate.dev/upstream-port is required" in refusal(pod, labels=OPT_IN)
    for absent in (None, "missing"):
        pod = vllm_pod()
        pod["metadata"]["labels"] = None
        if absent is None:
            pod["spec"]["initContainers"] = None
        after = injected(pod, labels=OPT_IN)
        assert [c["name"] for c in after["spec"]["initContainers"]] == ["spendgate-sidecar"]


def test_annotation_keys_are_escaped_in_json_pointers() -> None:
    assert escape("spendgate.dev/injected") == "spendgate.dev~1injected"
    assert escape("odd~key/with/slashes") == "odd~0key~1with~1slashes"
    pod = vllm_pod()
    pod["metadata"]["annotations"]["example.com/a~b"] = "kept"
    result = plan(pod)
    assert isinstance(result, Injection)
    assert result.patch[0] == {
        "op": "add",
        "path": "/metadata/annotations/spendgate.dev~1injected",
        "value": "0.1.0",
    }
    after = jsonpatch.apply_patch(pod, result.patch)
    assert after["metadata"]["annotations"]["example.com/a~b"] == "kept"
    assert after["metadata"]["annotations"]["spendgate.dev/injected"] == "0.1.0"


BAD_ANNOTATIONS = [
    ({"upstream-port": None}, "annotation spendgate.dev/upstream-port is required"),
    ({"upstream-port": "0"}, 'spendgate.dev/upstream-port: "0"; allowed: an integer 1-65535'),
    ({"upstream-port": "65536"}, 'spendgate.dev/upstream-port: "65536"; allowed: an integer'),
    ({"upstream-port": "http"}, 'spendgate.dev/upstream-port: "http"; allowed: an integer'),
    ({"upstream-port": "-1"}, 'spendgate.dev/upstream-port: "-1"; allowed'),
    ({"upstream-port": "٨٠٠٠"}, "spendgate.dev/upstream-port"),  # Unicode digits
    ({"port": "eighty"}, 'spendgate.dev/port: "eighty"; allowed: an integer 1-65535'),
    ({"port": "8000"}, "spendgate.dev/port: 8000 is also spendgate.dev/upstream-port"),
    ({"upstream-port": "8080"}, "spendgate.dev/port: 8080 (the default) is also"),
    ({"probe-port": "http"}, 'spendgate.dev/probe-port: "http"; allowed: an integer 1-65535'),
    ({"probe-port": "8080"}, "spendgate.dev/probe-port: 8080 is also spendgate.dev/port"),
    ({"probe-port": "8000"}, "spendgate.dev/probe-port: 8000 is also spendgate.dev/upstream-port"),
    ({"upstream-port": "8081"}, "spendgate.dev/probe-port: 8081 (the default) is also"),
    ({"pricebook": "Llama_3"}, 'spendgate.dev/pricebook: "Llama_3"; allowed: the name of a'),
    ({"pricebook": "-x"}, 'spendgate.dev/pricebook: "-x"; allowed'),
    ({"pricebook": "a" * 254}, "spendgate.dev/pricebook"),
    ({"fail-mode": "Closed"}, 'spendgate.dev/fail-mode: "Closed"; allowed: closed, open'),
    ({"fail-mode": "maybe"}, 'spendgate.dev/fail-mode: "maybe"; allowed: closed, open'),
    ({"cpu-request": "1 core"}, 'spendgate.dev/cpu-request: "1 core" is not a Kubernetes'),
    ({"cpu-request": "-1"}, 'spendgate.dev/cpu-request: "-1" is not a Kubernetes quantity'),
    ({"memory-request": "1GB"}, 'spendgate.dev/memory-request: "1GB" is not a Kubernetes'),
    ({"memory-limit": "0"}, 'spendgate.dev/memory-limit: "0" is not a positive Kubernetes'),
    ({"cpu-limit": ""}, 'spendgate.dev/cpu-limit: "" is not a positive Kubernetes quantity'),
    ({"memory-request": "512Mi"}, "memory-request (512Mi) exceeds spendgate.dev/memory-limit"),
    ({"cpu-request": "2", "cpu-limit": "1500m"}, "cpu-request (2) exceeds spendgate.dev/cpu-li"),
    ({"upstream_port": "8000"}, "unknown annotation spendgate.dev/upstream_port; allowed: "),
]


@pytest.mark.parametrize(("annotations", "expected"), BAD_ANNOTATIONS)
def test_bad_annotations_are_refused_with_a_clear_message(
    annotations: dict[str, str | None], expected: str
) -> None:
    pod = vllm_pod()
    for key, value in annotations.items():
        if value is None:
            pod["metadata"]["annotations"].pop(f"spendgate.dev/{key}")
        else:
            pod["metadata"]["annotations"][f"spendgate.dev/{key}"] = value
    message = refusal(pod)
    assert message.startswith("spendgate: ")
    assert expected in message
    assert "allowed" in message or "required" in message


def test_every_problem_is_reported_at_once() -> None:
    pod = vllm_pod(upstream_port="x", fail_mode="no", pricebook="UPPER")
    message = refusal(pod)
    for name in ("upstream-port", "fail-mode", "pricebook"):
        assert f"spendgate.dev/{name}:" in message


def test_bad_inject_label_values_are_refused() -> None:
    pod = vllm_pod()
    pod["metadata"]["labels"]["spendgate.dev/inject"] = "yes"
    assert refusal(pod) == (
        'spendgate: label spendgate.dev/inject on the pod: "yes"; allowed: "true", "false"'
    )
    del pod["metadata"]["labels"]["spendgate.dev/inject"]
    message = refusal(pod, labels={"spendgate.dev/inject": "True"})
    assert 'on the namespace models: "True"' in message


def test_sidecar_port_name_and_empty_pods() -> None:
    pod = vllm_pod()
    pod["spec"]["containers"][0]["ports"].append({"name": "spendgate", "containerPort": 9999})
    assert "already has a port named" in refusal(pod)
    pod = vllm_pod()
    pod["spec"]["containers"][0]["ports"].append({"name": "spendgate-probe", "containerPort": 1})
    assert "already has a port named 'spendgate-probe'" in refusal(pod)
    assert "no spec.containers" in refusal({"metadata": vllm_pod()["metadata"], "spec": {}})


QUANTITIES = "250m=0.25 1=1 1.5=1.5 .5=0.5 128Mi=134217728 1Gi=1073741824 500M=5e8 1e3=1e3 1E=1e18"


@pytest.mark.parametrize(("text", "value"), [q.split("=") for q in QUANTITIES.split()])
def test_quantities(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "Mi", "1.2.3", "1 Mi", "1mi", "1GB", "-1", "1Ki1", "0x10"])
def test_invalid_quantities(text: str) -> None:
    assert parse_quantity(text) is None


def test_money_path_settings_and_the_journal_reach_every_sidecar() -> None:
    defaults = InjectionDefaults(
        fail_open_allowance="0.25", redis_pool_size="64", redis_timeout="1s",
        hold_grace="45s", hold_sweep_interval="5s", journal_size_limit="16Mi",
    )  # fmt: skip
    pod = vllm_pod(fail_mode="open")
    pod["spec"]["volumes"] = None  # null reads as absent: the list is created whole
    after = injected(pod, defaults=defaults)
    env = env_of(sidecars(after)[0])
    assert env["SPENDGATE_FAIL_OPEN_ALLOWANCE"] == "0.25"
    assert env["SPENDGATE_REDIS_POOL_SIZE"] == "64"
    assert env["SPENDGATE_REDIS_TIMEOUT"] == "1s"
    assert env["SPENDGATE_HOLD_GRACE"] == "45s"
    assert env["SPENDGATE_HOLD_SWEEP_INTERVAL"] == "5s"
    assert env["SPENDGATE_JOURNAL_DIR"] == "/var/lib/spendgate/journal"
    assert after["spec"]["volumes"] == [
        {"name": "spendgate-journal", "emptyDir": {"sizeLimit": "16Mi"}}
    ]
    # Unset: the sidecar's own defaults, no variable at all.
    plain = env_of(sidecars(injected(vllm_pod()))[0])
    assert "SPENDGATE_FAIL_OPEN_ALLOWANCE" not in plain
    assert "SPENDGATE_REDIS_POOL_SIZE" not in plain


def test_a_pod_with_a_volume_named_like_the_journal_is_refused() -> None:
    pod = vllm_pod()
    pod["spec"]["volumes"] = [{"name": "spendgate-journal", "emptyDir": {}}]
    assert "already has a volume named 'spendgate-journal'" in refusal(pod)
