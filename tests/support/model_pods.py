"""Pods as the API server sends them to the admission webhook: from Deployment templates of GPU
model servers (a ReplicaSet's pod has ``generateName`` and no ``name`` yet)."""

from __future__ import annotations

import copy
from typing import Any

NAMESPACE = "models"
OPERATOR_NAMESPACE = "spendgate-system"

_VLLM: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "llama-3-8b-6b7c9d5f4-",
        "namespace": NAMESPACE,
        "labels": {
            "app": "llama-3-8b",
            "pod-template-hash": "6b7c9d5f4",
            "spendgate.dev/inject": "true",
        },
        "annotations": {
            "spendgate.dev/upstream-port": "8000",
            "spendgate.dev/pricebook": "llama-3-8b",
            "prometheus.io/scrape": "true",
        },
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "llama-3-8b-6b7c9d5f4"}
        ],
    },
    "spec": {
        "containers": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.6.3",
                "args": ["--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--port", "8000"],
                "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                "resources": {
                    "limits": {"nvidia.com/gpu": 1, "memory": "32Gi"},
                    "requests": {"cpu": "4", "memory": "32Gi"},
                },
                "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "restartPolicy": "Always",
    },
}

_TRITON: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "triton-5d8f7b6c9-",
        "labels": {"app": "triton"},
        "annotations": {"spendgate.dev/upstream-port": "8000"},
    },
    "spec": {
        "initContainers": [
            {"name": "fetch-models", "image": "busybox:1.36", "command": ["sh", "-c", "true"]}
        ],
        "containers": [
            {
                "name": "triton",
                "image": "nvcr.io/nvidia/tritonserver:24.08-py3",
                "args": ["tritonserver", "--model-repository=/models"],
                "ports": [
                    {"name": "http", "containerPort": 8000},
                    {"name": "grpc", "containerPort": 8001},
                    {"name": "metrics", "containerPort": 8002},
                ],
                "resources": {"limits": {"nvidia.com/gpu": 1}},
            }
        ],
    },
}


def vllm_pod(**annotations: str) -> dict[str, Any]:
    """The vLLM pod; keyword arguments add annotations (``cpu_limit`` -> ``.../cpu-limit``)."""
    pod = copy.deepcopy(_VLLM)
    pod["metadata"]["annotations"].update(_annotations(annotations))
    return pod


def triton_pod(**annotations: str) -> dict[str, Any]:
    pod = copy.deepcopy(_TRITON)
    pod["metadata"]["annotations"].update(_annotations(annotations))
    return pod


def _annotations(given: dict[str, str]) -> dict[str, str]:
    return {"spendgate.dev/" + key.replace("_", "-"): value for key, value in given.items()}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom source."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    everything = spec.get("initContainers", []) + spec.get("containers", [])
    return [c for c in everything if c["name"] == "spendgate-sidecar"]
