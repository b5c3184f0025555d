"""Services that route around the meter. Pure functions, no I/O.

An injected pod's model still listens on its own port; a Service whose ``targetPort`` is that
port (by number, or by a container port name that resolves to it) sends clients straight to
the GPU, unmetered. The operator turns each finding into a Warning Event on the Service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .injection import PORT_NAME, UPSTREAM_PORT, is_injected


@dataclass(frozen=True)
class BypassWarning:
    service: str  # the Service's name
    namespace: str | None
    port: str  # the Service port, as "name (port)" or the port number
    target: int  # the model's port the Service reaches
    pods: tuple[str, ...]  # injected pods reached (names, at most a few)
    message: str

    reason: str = "SpendgateMeterBypassed"  # for the Event


def _pod_name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or metadata.get("generateName") or "?")


def _upstream_port(pod: Mapping[str, Any]) -> int | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(UPSTREAM_PORT)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _selects(selector: Mapping[str, str], pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def _resolve(target: Any, pod: Mapping[str, Any]) -> int | None:
    """The container port a Service's targetPort means in this pod (None: not found)."""
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    spec = pod.get("spec") or {}
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return port.get("containerPort")
    return None


def bypassing_services(
    services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]
) -> list[BypassWarning]:
    """One warning per Service port that targets the upstream port of an injected pod it selects.

    ``services`` and ``pods`` are of one namespace (the API's dicts); pods without the sidecar
    and Services without a selector (hand-made Endpoints, ExternalName) are not judged.
    """
    injected = [
        (pod, port)
        for pod in pods
        if is_injected(pod) and (port := _upstream_port(pod)) is not None
    ]
    warnings = []
    for service in services:
        metadata, spec = service.get("metadata") or {}, service.get("spec") or {}
        selector = spec.get("selector") or {}
        if not selector or spec.get("type") == "ExternalName":
            continue
        selected = [(pod, port) for pod, port in injected if _selects(selector, pod)]
        for service_port in spec.get("ports") or []:
            target = service_port.get("targetPort", service_port.get("port"))
            reached = [
                (pod, upstream) for pod, upstream in selected if _resolve(target, pod) == upstream
            ]
            if not reached:
                continue
            name, number = service_port.get("name"), service_port.get("port")
            label = f"{name} ({number})" if name else str(number)
            upstream = reached[0][1]
            pod_names = tuple(sorted({_pod_name(pod) for pod, _ in reached}))[:5]
            message = (
                f"Service {metadata.get('name')} port {label} targets port {target}, the model's"
                f" port {upstream} on spendgate-injected pods ({', '.join(pod_names)}): requests"
                f" bypass spendgate's metering and budgets. Set targetPort: {PORT_NAME}"
                " (the sidecar's named port)."
            )
            warnings.append(
                BypassWarning(
                    service=str(metadata.get("name")),
                    namespace=metadata.get("namespace"),
                    port=label,
                    target=upstream,
                    pods=pod_names,
                    message=message,
                )
            )
    return warnings
