"""Services that send clients straight to the model port of injected pods, around the meter."""

from __future__ import annotations

from typing import Any

import jsonpatch

from spendgate.operator.admission.injection import Injection, InjectionDefaults, plan_injection
from spendgate.operator.admission.service_check import bypassing_services
from tests.support.model_pods import NAMESPACE, OPERATOR_NAMESPACE, triton_pod, vllm_pod


def inject(pod: dict[str, Any], name: str) -> dict[str, Any]:
    result = plan_injection(
        pod,
        NAMESPACE,
        {"spendgate.dev/inject": "true"},
        InjectionDefaults(),
        native_sidecars=True,
        operator_namespace=OPERATOR_NAMESPACE,
    )
    assert isinstance(result, Injection) and result.patch
    pod = jsonpatch.apply_patch(pod, result.patch)
    pod["metadata"]["name"] = name
    return pod


def service(name: str, selector: dict[str, str] | None, *ports: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": list(ports)}
    if selector is not None:
        spec["selector"] = selector
    return {"metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


VLLM = inject(vllm_pod(), "llama-3-8b-6b7c9d5f4-x2x9k")
TRITON = inject(triton_pod(), "triton-5d8f7b6c9-abcde")


def test_services_through_the_sidecar_are_fine() -> None:
    services = [
        service("llama", {"app": "llama-3-8b"}, {"port": 80, "targetPort": "spendgate"}),
        service("llama-num", {"app": "llama-3-8b"}, {"port": 80, "targetPort": 8080}),
        service("triton", {"app": "triton"}, {"name": "http", "port": 80, "targetPort": 8080}),
    ]
    assert bypassing_services(services, [VLLM, TRITON]) == []


def test_target_port_by_number_bypasses_the_meter() -> None:
    services = [
        service("llama", {"app": "llama-3-8b"}, {"name": "http", "port": 80, "targetPort": 8000})
    ]
    (warning,) = bypassing_services(services, [VLLM, TRITON])
    assert warning.service == "llama"
    assert warning.namespace == NAMESPACE
    assert warning.port == "http (80)"
    assert warning.target == 8000
    assert warning.pods == ("llama-3-8b-6b7c9d5f4-x2x9k",)
    assert warning.reason == "SpendgateMeterBypassed"
    assert "bypass spendgate's metering" in warning.message
    assert "Set targetPort: spendgate" in warning.message
    assert "port 8000 on spendgate-injected pods (llama-3-8b-6b7c9d5f4-x2x9k)" in warning.message


def test_target_port_by_name_and_default_target() -> None:
    services = [
        service("by-name", {"app": "llama-3-8b"}, {"port": 80, "targetPort": "http"}),
        service("no-target", {"app": "triton"}, {"port": 8000}),  # targetPort defaults to port
        service("grpc", {"app": "triton"}, {"port": 8001, "targetPort": "grpc"}),
        service("unknown-name", {"app": "triton"}, {"port": 80, "targetPort": "nope"}),
    ]
    warnings = bypassing_services(services, [VLLM, TRITON])
    assert [(w.service, w.port, w.target) for w in warnings] == [
        ("by-name", "80", 8000),
        ("no-target", "8000", 8000),
    ]


def test_only_injected_selected_pods_count() -> None:
    plain = vllm_pod()
    plain["metadata"]["name"] = "not-injected"
    bypass = {"port": 80, "targetPort": 8000}
    services = [
        service("other-app", {"app": "something-else"}, bypass),
        service("headless-manual", None, bypass),  # no selector: Endpoints made by hand
        service("narrower", {"app": "llama-3-8b", "tier": "gold"}, bypass),
    ]
    external = service("external", {"app": "llama-3-8b"}, bypass)
    external["spec"]["type"] = "ExternalName"
    assert bypassing_services([*services, external], [VLLM, plain]) == []
    # the same Service over a plain (not injected) pod is no bypass of a meter it never had
    assert bypassing_services([service("llama", {"app": "llama-3-8b"}, bypass)], [plain]) == []


def test_one_warning_per_service_port_with_the_pods_reached() -> None:
    second = inject(vllm_pod(), "llama-3-8b-6b7c9d5f4-zz7q1")
    services = [
        service(
            "llama",
            {"app": "llama-3-8b"},
            {"name": "http", "port": 80, "targetPort": 8000},
            {"name": "metered", "port": 8080, "targetPort": "spendgate"},
            {"name": "alt", "port": 81, "targetPort": "http"},
        )
    ]
    warnings = bypassing_services(services, [VLLM, second])
    assert [w.port for w in warnings] == ["http (80)", "alt (81)"]
    assert warnings[0].pods == ("llama-3-8b-6b7c9d5f4-x2x9k", "llama-3-8b-6b7c9d5f4-zz7q1")
