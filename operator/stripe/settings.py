"""Settings of the Stripe integration, from ``SPENDGATE_STRIPE_*`` environment variables.

The operator builds one :class:`StripeSettings` (``StripeSettings.from_env()``, or the
constructor from its own flags) and hands it to every entry point of ``spendgate.operator.stripe``.
Secrets are never in here: the API key and the webhook signing secrets are read from Kubernetes
Secrets (or the environment) by ``spendgate.operator.stripe.client``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

VALUE_UNITS = ("micros", "minor")


@dataclass(frozen=True)
class SecretRef:
    """A key of a Kubernetes Secret in the operator's namespace."""

    name: str
    key: str


@dataclass(frozen=True)
class StripeSettings:
    enabled: bool = False
    # -- client
    api_key_secret: SecretRef | None = SecretRef("spendgate-stripe", "api-key")
    api_key_env: str = "STRIPE_API_KEY"  # used when the Secret is absent (local runs)
    api_base: str | None = None  # e.g. a local test server; None = Stripe
    meter_events_base: str | None = None  # v2 meter event stream host; None = Stripe
    request_timeout_s: float = 20.0
    max_attempts: int = 5  # per call, for 429 / 5xx / connection errors
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    # -- webhook receiver (its own port, plain HTTP behind the cluster's ingress/TLS)
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8444
    webhook_path: str = "/stripe/webhook"
    # Up to two signing secrets (current and next, during rotation) in this Secret's keys.
    webhook_secret: SecretRef | None = SecretRef("spendgate-stripe", "webhook-secret")
    webhook_secret_next: SecretRef | None = SecretRef("spendgate-stripe", "webhook-secret-next")
    webhook_secret_env: str = "STRIPE_WEBHOOK_SECRET"  # comma-separated, for local runs
    webhook_tolerance_s: int = 300
    webhook_max_body_bytes: int = 1 << 20
    webhook_store_timeout_s: float = 5.0  # recording in Redis; slower -> 503, Stripe retries
    # -- event processor (leader only)
    consumer_group: str = "spendgate-operator"
    claim_idle_ms: int = 30_000  # pending entries idle this long belong to a dead consumer
    processor_batch: int = 50
    processor_block_ms: int = 1_000
    dedupe_ttl_s: int = 30 * 86_400  # Stripe retries for 3 days; events live 30 days
    # -- top-ups: one-off payments funded into the balance carry this metadata key = "true"
    topup_metadata_key: str = "spendgate_topup"
    # Fallback mapping from a Stripe object to a budget when it has no linked customer id.
    customer_metadata_key: str = "spendgate_customer_id"
    # -- reconciliation (leader only)
    reconcile_interval_s: float = 300.0
    clock_skew_s: int = 30  # reconciled states yield to webhook events newer than now - this
    replay_events: bool = True  # each round, record events the receiver missed (GET /v1/events)
    # -- usage export (leader only)
    meter_event_name: str = "spendgate_usage"
    meter_customer_key: str = "stripe_customer_id"
    meter_value_key: str = "value"
    # An entry of a budget tree names the budget of the request's key under this payload key
    # (a meter dimension: a child's usage is billed to its root's Stripe customer).
    meter_budget_key: str = "spendgate_budget"
    meter_value_unit: str = "micros"  # "micros" (exact) or "minor" (cents, rounded up per event)
    export_requests_per_s: float = 50.0
    export_batch: int = 100  # ledger entries read per customer and pass
    export_concurrency: int = 10
    export_interval_s: float = 5.0
    export_v2_stream: bool = False  # /v2/billing/meter_event_stream with a session token
    ledger_retention_s: int = 0  # keep exported entries this long before XTRIM
    # -- budgets synced from Stripe (leader only; operator/stripe/budget_import.py): marked
    # customers (metadata[import_metadata_key] == import_metadata_value) get a CustomerBudget
    # in import_namespace from the YAML template in import_template_file (sync.py: placeholders).
    import_enabled: bool = False
    import_metadata_key: str = "spendgate"
    import_metadata_value: str = "true"
    import_template_file: str | None = None  # e.g. a ConfigMap mounted into the operator
    import_namespace: str | None = None  # required with import_enabled
    import_interval_s: float = 300.0
    # -- capped budgets: keep the subscription's billing_thresholds.amount_gte = limit
    sync_billing_thresholds: bool = True

    def __post_init__(self) -> None:
        if self.meter_value_unit not in VALUE_UNITS:
            raise ValueError(f"meter_value_unit must be one of {VALUE_UNITS}")
        if self.export_requests_per_s <= 0:
            raise ValueError("export_requests_per_s must be positive")
        if self.webhook_max_body_bytes <= 0 or self.webhook_tolerance_s < 0:
            raise ValueError("webhook_max_body_bytes must be positive, tolerance not negative")
        if self.import_interval_s <= 0:
            raise ValueError("import_interval_s must be positive")
        if not self.import_metadata_key:
            raise ValueError("import_metadata_key must not be empty")
        if self.import_enabled and not (self.import_template_file and self.import_namespace):
            raise ValueError(
                "import_enabled needs import_template_file and import_namespace"
                " (SPENDGATE_STRIPE_IMPORT_TEMPLATE_FILE, SPENDGATE_STRIPE_IMPORT_NAMESPACE)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> StripeSettings:
        """``SPENDGATE_STRIPE_<FIELD>`` for every plain field (``SecretRef``s: ``name/key``)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"SPENDGATE_STRIPE_{f.name.upper()}")
            if raw is None:
                continue
            default = f.default
            if f.name in ("api_key_secret", "webhook_secret", "webhook_secret_next"):
                name, _, key = raw.partition("/")
                values[f.name] = SecretRef(name, key) if name and key else None
            elif isinstance(default, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = (raw or None) if default is None else raw
        values.update(overrides)
        return cls(**values)


__all__ = ["VALUE_UNITS", "SecretRef", "StripeSettings"]
