"""Sidecar injection: what the admission webhook does to a Pod. Pure functions, no I/O.

``plan_injection`` takes a Pod as in an AdmissionReview (from a Deployment's template it has
no ``metadata.name``) and returns an ``Injection`` (RFC 6902 JSON patch operations, empty when
nothing is to be done) or a ``Refusal`` naming each bad label or annotation and what it allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from json import dumps as _q
from typing import Any

from spendgate import __version__

INJECT_LABEL = "spendgate.dev/inject"
UPSTREAM_PORT = "spendgate.dev/upstream-port"
PORT = "spendgate.dev/port"
PROBE_PORT = "spendgate.dev/probe-port"
PRICEBOOK = "spendgate.dev/pricebook"
FAIL_MODE = "spendgate.dev/fail-mode"
INJECTED = "spendgate.dev/injected"
RESOURCES = {  # annotation -> (requests|limits, resource, InjectionDefaults field)
    "spendgate.dev/cpu-request": ("requests", "cpu", "cpu_request"),
    "spendgate.dev/memory-request": ("requests", "memory", "memory_request"),
    "spendgate.dev/cpu-limit": ("limits", "cpu", "cpu_limit"),
    "spendgate.dev/memory-limit": ("limits", "memory", "memory_limit"),
}
ANNOTATIONS = (UPSTREAM_PORT, PORT, PROBE_PORT, PRICEBOOK, FAIL_MODE, INJECTED, *RESOURCES)
CONTAINER_NAME = "spendgate-sidecar"
PORT_NAME = "spendgate"
PROBE_PORT_NAME = "spendgate-probe"  # /healthz, /readyz, /metrics: never the customer's port
JOURNAL_VOLUME = "spendgate-journal"  # an emptyDir: fail-open charges outlive the container
# Sidecar settings passed through as given (the sidecar checks them; "" = its own default).
PASSED_SETTINGS = {
    "fail_open_allowance": "SPENDGATE_FAIL_OPEN_ALLOWANCE",
    "redis_pool_size": "SPENDGATE_REDIS_POOL_SIZE",
    "redis_timeout": "SPENDGATE_REDIS_TIMEOUT",
    "hold_grace": "SPENDGATE_HOLD_GRACE",
    "hold_sweep_interval": "SPENDGATE_HOLD_SWEEP_INTERVAL",
}
FAIL_MODES = ("closed", "open")
SKIPPED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})

_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(
    r"^\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|m|k|M|G|T|P|E)?$"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


@dataclass(frozen=True)
class InjectionDefaults:
    """What the admission webhook puts into opted-in pods unless annotations say otherwise."""

    image: str = "ghcr.io/spendgate/spendgate:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    port: int = 8080
    probe_port: int = 8081
    fail_mode: str = "closed"
    pricebook: str = "default"  # a PriceBook name in the pod's namespace
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    redis_secret: str = "spendgate-redis"  # Secret with key "url" (may hold a password)
    redis_secret_key: str = "url"
    redis_cluster: bool = False
    # Passed to every sidecar when set (PASSED_SETTINGS); "" keeps the sidecar's default.
    fail_open_allowance: str = ""
    redis_pool_size: str = ""
    redis_timeout: str = ""
    hold_grace: str = ""
    hold_sweep_interval: str = ""
    journal_dir: str = "/var/lib/spendgate/journal"  # the journal's emptyDir is mounted here
    journal_size_limit: str = "64Mi"  # of that emptyDir
    # Native sidecar (init container with restartPolicy Always, Kubernetes >= 1.29):
    # None = detect from the API server's /version; True/False forces it.
    native_sidecars: bool | None = None


@dataclass(frozen=True)
class Injection:
    patch: list[dict[str, Any]]  # empty: admit the pod unchanged
    reason: str  # for logs: why this patch (or none)


@dataclass(frozen=True)
class Refusal:
    message: str


@dataclass(frozen=True)
class SidecarConfig:
    upstream_port: int
    port: int
    pricebook: str
    fail_mode: str
    resources: dict[str, dict[str, str]]
    probe_port: int = 8081


def escape(key: str) -> str:
    """A JSON pointer reference token (RFC 6901): ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return key.replace("~", "~0").replace("/", "~1")


def _meta(pod: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``metadata.labels`` or ``metadata.annotations``; absent or null reads as empty."""
    return (pod.get("metadata") or {}).get(key) or {}


def _containers(pod: Mapping[str, Any], field: str = "containers") -> list[Mapping[str, Any]]:
    value = (pod.get("spec") or {}).get(field)
    return [c for c in value if isinstance(c, Mapping)] if isinstance(value, list) else []


def is_injected(pod: Mapping[str, Any]) -> bool:
    """The pod already carries the sidecar (as a container or a native sidecar)."""
    everything = _containers(pod) + _containers(pod, "initContainers")
    return any(c.get("name") == CONTAINER_NAME for c in everything)


def pod_decides(pod: Mapping[str, Any]) -> bool:
    """The pod's own label decides, so the namespace's labels are not needed."""
    return INJECT_LABEL in _meta(pod, "labels")


def _opt(value: Any, where: str) -> bool | None:
    if value in (None, "true", "false"):
        return None if value is None else value == "true"
    raise ValueError(f'label {INJECT_LABEL} on the {where}: {_q(value)}; allowed: "true", "false"')


def skip_reason(
    pod: Mapping[str, Any],
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    operator_namespace: str,
) -> str | None:
    """Why the pod is not to be injected, or None to inject. ValueError on a bad label."""
    if namespace in SKIPPED_NAMESPACES or namespace == operator_namespace:
        return f"namespace {namespace} is never injected"
    on_pod = _opt(_meta(pod, "labels").get(INJECT_LABEL), "pod")
    if on_pod is not None:
        return None if on_pod else f"pod label {INJECT_LABEL}=false"
    on_namespace = _opt((namespace_labels or {}).get(INJECT_LABEL), f"namespace {namespace}")
    return None if on_namespace else "not opted in"


def parse_quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity ("250m", "1.5", "128Mi", "1e3") as a number, None if invalid."""
    match = _QUANTITY.match(text)
    if match is None:
        return None
    number, suffix = Decimal(match["number"]), match["suffix"] or ""
    if suffix in _BINARY:
        return number * 1024 ** _BINARY[suffix]
    exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:] or 0)
    return number.scaleb(exponent)


def _port(text: Any, name: str, problems: list[str]) -> int | None:
    if isinstance(text, str) and text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    problem = " is required (the model's port on 127.0.0.1)" if text is None else f": {_q(text)}"
    problems.append(f"annotation {name}{problem}; allowed: an integer 1-65535")
    return None


def _resources(annotations: Mapping[str, Any], defaults: InjectionDefaults, problems: list[str]):
    resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
    values: dict[str, tuple[Decimal, str]] = {}
    for name, (section, resource, field) in RESOURCES.items():
        given = name in annotations
        text = annotations[name] if given else getattr(defaults, field)
        quantity = parse_quantity(text) if isinstance(text, str) else None
        example = '"250m", "1", "0.5"' if resource == "cpu" else '"128Mi", "1Gi", "500M"'
        if quantity is None or (section == "limits" and quantity <= 0):
            kind = "a positive" if section == "limits" else "a"
            problems.append(
                f"annotation {name}: {_q(text)} is not {kind} Kubernetes quantity;"
                f" allowed: {example}"
            )
            continue
        resources[section][resource] = text
        values[name] = (quantity, f"{name} ({text}{'' if given else ', the default'})")
    for resource in ("cpu", "memory"):
        request = values.get(f"spendgate.dev/{resource}-request")
        limit = values.get(f"spendgate.dev/{resource}-limit")
        if request and limit and request[0] > limit[0]:
            problems.append(
                f"annotation {request[1]} exceeds {limit[1]}; allowed: a request at most the limit"
                f" (set spendgate.dev/{resource}-limit too)"
            )
    return resources


def sidecar_config(pod: Mapping[str, Any], defaults: InjectionDefaults) -> SidecarConfig:
    """The sidecar's settings from the pod's annotations. ValueError lists every problem."""
    annotations = _meta(pod, "annotations")
    problems = [
        f"unknown annotation {key}; allowed: {', '.join(sorted(ANNOTATIONS))}"
        for key in annotations
        if key.startswith("spendgate.dev/") and key not in ANNOTATIONS
    ]
    upstream = _port(annotations.get(UPSTREAM_PORT), UPSTREAM_PORT, problems)
    everything = _containers(pod) + _containers(pod, "initContainers")
    ports = [(c.get("name"), p) for c in everything for p in c.get("ports") or []]
    for name in (PORT_NAME, PROBE_PORT_NAME):
        if any(isinstance(p, Mapping) and p.get("name") == name for _, p in ports):
            problems.append(f"a container already has a port named {name!r}; rename it")
    volumes = (pod.get("spec") or {}).get("volumes") or []
    if any(isinstance(v, Mapping) and v.get("name") == JOURNAL_VOLUME for v in volumes):
        problems.append(f"the pod already has a volume named {JOURNAL_VOLUME!r}; rename it")
    taken = {p.get("containerPort"): name for name, p in ports if isinstance(p, Mapping)}
    port = _own_port(annotations, PORT, defaults.port, {UPSTREAM_PORT: upstream}, taken, problems)
    probe_port = _own_port(
        annotations, PROBE_PORT, defaults.probe_port,
        {UPSTREAM_PORT: upstream, PORT: port}, taken, problems,
    )  # fmt: skip
    pricebook = annotations.get(PRICEBOOK, defaults.pricebook)
    if not isinstance(pricebook, str) or len(pricebook) > 253 or not _DNS1123.match(pricebook):
        problems.append(
            f"annotation {PRICEBOOK}: {_q(pricebook)}; allowed: the name of a PriceBook in the"
            " pod's namespace (DNS-1123: lowercase letters, digits, '-', '.', at most 253)"
        )
    fail_mode = annotations.get(FAIL_MODE, defaults.fail_mode)
    if fail_mode not in FAIL_MODES:
        problems.append(f"annotation {FAIL_MODE}: {_q(fail_mode)}; allowed: closed, open")
    resources = _resources(annotations, defaults, problems)
    if problems:
        raise ValueError("; ".join(problems))
    assert upstream is not None and port is not None and probe_port is not None
    return SidecarConfig(upstream, port, pricebook, fail_mode, resources, probe_port)


def _own_port(
    annotations: Mapping[str, Any],
    annotation: str,
    default: int,
    others: Mapping[str, int | None],
    taken: Mapping[Any, Any],
    problems: list[str],
) -> int | None:
    """A port of the sidecar's own: valid, and neither another setting's nor a container's."""
    port = _port(annotations.get(annotation, str(default)), annotation, problems)
    if port is None:
        return None
    which = "" if annotation in annotations else " (the default)"
    allowed = "allowed: an integer 1-65535 other than the upstream port, the sidecar's other port"
    clash = next((name for name, value in others.items() if value == port), None)
    if clash is not None:
        problems.append(f"annotation {annotation}: {port}{which} is also {clash}; {allowed}"
                        " and the containers' ports")  # fmt: skip
    elif port in taken:
        problems.append(
            f"annotation {annotation}: {port}{which} is already a port of container"
            f" {_q(taken[port])}; allowed: an integer 1-65535 no container uses"
        )
    return port


def _probe(path: str, period: int, fails: int, timeout: int) -> dict[str, Any]:
    timing = {"periodSeconds": period, "failureThreshold": fails, "timeoutSeconds": timeout}
    return {"httpGet": {"path": path, "port": PROBE_PORT_NAME}, **timing}


def sidecar_container(
    config: SidecarConfig, namespace: str, defaults: InjectionDefaults, *, native: bool
) -> dict[str, Any]:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    secret = {"secretKeyRef": {"name": defaults.redis_secret, "key": defaults.redis_secret_key}}
    # Fail-open pods keep serving without Redis, so Redis must not take them out of Services.
    ready_path = "/healthz" if config.fail_mode == "open" else "/readyz"
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": defaults.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["spendgate", "sidecar"],
        "env": [
            {"name": "SPENDGATE_UPSTREAM", "value": f"http://127.0.0.1:{config.upstream_port}"},
            {"name": "SPENDGATE_LISTEN", "value": f"0.0.0.0:{config.port}"},
            {"name": "SPENDGATE_PROBE_LISTEN", "value": f"0.0.0.0:{config.probe_port}"},
            {"name": "SPENDGATE_PRICEBOOK", "value": f"{namespace}/{config.pricebook}"},
            {"name": "SPENDGATE_FAIL_MODE", "value": config.fail_mode},
            {"name": "SPENDGATE_POD", "valueFrom": field("metadata.name")},
            {"name": "SPENDGATE_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "SPENDGATE_REDIS_URL", "valueFrom": secret},
            {"name": "SPENDGATE_REDIS_CLUSTER", "value": str(defaults.redis_cluster).lower()},
            {"name": "SPENDGATE_JOURNAL_DIR", "value": defaults.journal_dir},
            *(
                {"name": env, "value": getattr(defaults, setting)}
                for setting, env in PASSED_SETTINGS.items()
                if getattr(defaults, setting)
            ),
        ],
        "volumeMounts": [{"name": JOURNAL_VOLUME, "mountPath": defaults.journal_dir}],
        "ports": [
            {"name": PORT_NAME, "containerPort": config.port, "protocol": "TCP"},
            {"name": PROBE_PORT_NAME, "containerPort": config.probe_port, "protocol": "TCP"},
        ],
        "resources": config.resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # /healthz is the process; /readyz also needs Redis, which must not restart us.
        "startupProbe": _probe("/healthz", 1, 30, 1),
        "livenessProbe": _probe("/healthz", 10, 3, 2),
        "readinessProbe": _probe(ready_path, 5, 2, 2),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if native:
        container["restartPolicy"] = "Always"
    return container


def _append(pod: Mapping[str, Any], field: str, value: dict[str, Any]) -> dict[str, Any]:
    """Append to ``spec.<field>``; an absent (or null) list is created whole."""
    if isinstance(pod["spec"].get(field), list):
        return {"op": "add", "path": f"/spec/{field}/-", "value": value}
    return {"op": "add", "path": f"/spec/{field}", "value": [value]}


def _patch(
    pod: Mapping[str, Any],
    container: dict[str, Any],
    native: bool,
    version: str,
    defaults: InjectionDefaults,
):
    """Adds the annotation, the container and the journal's volume.

    ``metadata.annotations`` exists: the upstream-port annotation is required."""
    annotation = {
        "op": "add",
        "path": f"/metadata/annotations/{escape(INJECTED)}",
        "value": version,
    }
    journal = {"name": JOURNAL_VOLUME, "emptyDir": {"sizeLimit": defaults.journal_size_limit}}
    field = "initContainers" if native else "containers"
    return [annotation, _append(pod, field, container), _append(pod, "volumes", journal)]


def plan_injection(
    pod: Mapping[str, Any],
    namespace: str,
    namespace_labels: Mapping[str, str] | None,
    defaults: InjectionDefaults,
    *,
    native_sidecars: bool,
    operator_namespace: str,
    version: str = __version__,
) -> Injection | Refusal:
    """The patch for ``pod`` (in ``namespace``), or why it is refused."""
    if is_injected(pod):
        return Injection([], "already injected")
    try:
        skip = skip_reason(pod, namespace, namespace_labels, operator_namespace)
        if skip is not None:
            return Injection([], skip)
        if not isinstance(pod.get("spec"), Mapping) or not _containers(pod):
            raise ValueError("the pod has no spec.containers")
        config = sidecar_config(pod, defaults)
    except ValueError as error:
        return Refusal(f"spendgate: {error}")
    container = sidecar_container(config, namespace, defaults, native=native_sidecars)
    kind = "native sidecar" if native_sidecars else "container"
    patch = _patch(pod, container, native_sidecars, version, defaults)
    return Injection(patch, f"injected as {kind}")
