"""Operator settings: from CLI flags, falling back to ``SPENDGATE_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InjectionDefaults:
    """What the admission webhook puts into opted-in pods unless annotations say otherwise."""

    image: str = "ghcr.io/spendgate/spendgate:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    port: int = 8080
    fail_mode: str = "closed"
    pricebook: str = "default"  # a PriceBook name in the pod's namespace
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    redis_secret: str = "spendgate-redis"  # Secret with key "url" (may hold a password)
    redis_secret_key: str = "url"
    redis_cluster: bool = False
    # Native sidecar (init container with restartPolicy Always, Kubernetes >= 1.29):
    # None = detect from the API server's /version; True/False forces it.
    native_sidecars: bool | None = None


@dataclass(frozen=True)
class OperatorSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    namespace: str = "spendgate-system"  # where the operator runs; never injected
    namespaces: tuple[str, ...] = ()  # watched namespaces; empty = cluster-wide
    status_interval_s: float = 30.0  # status refresh from Redis (leader only)
    alert_webhook_url: str | None = None  # Slack-compatible JSON alerts
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8443  # admission (HTTPS)
    webhook_cert_file: str | None = None
    webhook_key_file: str | None = None
    health_port: int = 8081  # /healthz, /readyz
    peering: str = "spendgate"  # kopf peering object name
    injection: InjectionDefaults = field(default_factory=InjectionDefaults)
