"""Sidecar settings: from CLI flags, falling back to ``SPENDGATE_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailMode(StrEnum):
    closed = "closed"  # refuse with 503 when the billing store is unreachable (default)
    open = "open"  # serve, count locally, reconcile when Redis is back


@dataclass(frozen=True)
class SidecarSettings:
    upstream: str  # the model container, e.g. http://127.0.0.1:8000
    redis_url: str = "redis://127.0.0.1:6379/0"
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    probe_host: str = "0.0.0.0"  # /healthz, /readyz, /metrics: never on the customer's port
    probe_port: int = 8081
    cors_origins: tuple[str, ...] = ()  # origins whose browsers may call the API ("*": any)
    pricebook: str = "default/default"  # namespace/name
    fail_mode: FailMode = FailMode.closed
    # Fail-open: what a customer may be served unreserved (per process, micro-units of the
    # budget's own currency); 0 serves nothing unreserved.
    fail_open_allowance: int = 1_000_000
    journal_dir: str = ""  # charges not on the ledger yet, on local disk ("": memory only)
    pod: str = ""  # pod name for the ledger (downward API in Kubernetes)
    max_body_bytes: int = 10 * 1024 * 1024
    redis_timeout_s: float = 0.5
    hold_grace_ms: int = 30_000  # a hold outlives the rule's timeout by this much
    hold_sweep_interval_ms: int = 10_000  # release every customer's expired holds; 0 = never
    redis_pool_size: int = 256  # Redis calls in flight at once; more wait up to the timeout
    key_refresh_s: float = 60.0  # full key-cache refresh, a safety net behind pub/sub
    drain_timeout_s: float = 30.0
    cluster: bool = False  # talk to Redis Cluster
    pipelined_scripts: bool = True  # hot-path scripts over pipelined connections (per node)
