"""Operator settings: from CLI flags, falling back to ``SPENDGATE_*`` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..admission.injection import InjectionDefaults
from ..stripe.settings import StripeSettings


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
    # On shutdown, the webhook servers (admission, Stripe) keep answering this long after the
    # leader's work stopped: the endpoints of a terminating pod take a moment to disappear.
    shutdown_drain_s: float = 3.0
    health_port: int = 8081  # /healthz, /readyz
    health_host: str = "0.0.0.0"
    # --- reconciliation (spendgate.operator.runtime.handlers)
    retry_delay_s: float = 5.0  # before retrying a reconcile that met Redis/API trouble
    reconcile_timeout_s: float = 30.0  # one reconcile attempt, all I/O included
    resync_interval_s: float = 600.0  # a full reconcile (Secrets re-read) at least this often
    max_workers: int = 100  # objects kopf handles at once, per resource (bounds startup bursts)
    kube_timeout_s: float = 10.0  # one request of the operator's own API client
    alert_attempts: int = 4  # POSTs per alert at most (exponential backoff between)
    alert_timeout_s: float = 5.0  # per POST
    pod_name: str = ""  # Lease holder identity and Event reportingInstance (downward API)
    injection: InjectionDefaults = field(default_factory=InjectionDefaults)
    # --- HA: one election. The holder of a Lease (coordination.k8s.io/v1,
    # operator/runtime/leader.py) in ``lease_namespace`` (default: namespace) runs kopf's
    # handlers and the singleton work (Stripe processing, reconciliation, usage export, grace
    # timer; the bypass check, audit, spend watch); False: kopf at once, no singleton work.
    leader_election: bool = True
    lease_name: str = "spendgate-leader"
    lease_namespace: str | None = None
    lease_duration_s: float = 15.0  # others take over this long after the last renewal
    lease_renew_deadline_s: float = 10.0  # the leader steps down when it could not renew so long
    lease_retry_s: float = 2.0  # renew period of the leader; retry period of the others
    # --- Services that bypass the sidecar (a Warning Event on the Service; leader only)
    bypass_check_interval_s: float = 120.0  # 0: no check
    bypass_rewarn_s: float = 3600.0  # the same finding is warned about again after this long
    # --- `spendgate audit` over every customer (operator/budgets/audit.py; leader only)
    audit_interval_s: float = 300.0  # 0: no periodic audit
    # --- absorbed cost and abnormal spend (operator/budgets/spend_watch.py; leader only)
    spend_watch_interval_s: float = 60.0  # 0: neither is watched
    # --- Stripe (operator/stripe/): None = disabled, nothing of Stripe starts
    stripe: StripeSettings | None = None

    @property
    def lease_ns(self) -> str:
        return self.lease_namespace or self.namespace
