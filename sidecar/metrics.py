"""Prometheus metrics of one sidecar (its own registry, so tests can run several)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


@dataclass
class SidecarMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.decisions = Counter(
            "spendgate_decisions", "Admission decisions by outcome", ["outcome"], registry=r
        )
        self.added_latency = Histogram(
            "spendgate_added_latency_seconds",
            "Time spendgate spends on a request before it reaches the model",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.spend = Counter(
            "spendgate_spend_micros", "Settled cost in micro-units", ["currency"], registry=r
        )
        self.settlements = Counter(
            "spendgate_settlements", "Settlements by outcome", ["outcome"], registry=r
        )
        self.holds_in_flight = Gauge(
            "spendgate_holds_in_flight", "Requests holding a reservation right now", registry=r
        )
        self.redis_errors = Counter(
            "spendgate_redis_errors", "Redis calls that failed", ["operation"], registry=r
        )
        self.backpressure = Counter(
            "spendgate_backpressure",
            "Redis calls refused locally: every pool slot busy for the whole Redis timeout",
            ["operation"],
            registry=r,
        )
        self.pending_settlements = Gauge(
            "spendgate_pending_settlements",
            "Charges waiting for Redis (fail-open or a failed settle)",
            registry=r,
        )
        self.journal_pending = Gauge(
            "spendgate_journal_pending",
            "Requests in the journal not acknowledged yet (charges waiting for Redis, fail-open"
            " requests being served)",
            registry=r,
        )
        self.fail_open_used = Gauge(
            "spendgate_fail_open_used_micros",
            "Served fail-open and not on the ledger yet, summed over customers (micro-units)",
            registry=r,
        )
        self.journal_bytes = Gauge(
            "spendgate_journal_bytes", "Size of the journal file (compacted)", registry=r
        )
        self.stream_cutoffs = Counter(
            "spendgate_stream_cutoffs", "Streams ended because the balance ran out", registry=r
        )
        self.time_cutoffs = Counter(
            "spendgate_time_cutoffs",
            "Requests stopped because the balance could not pay for more GPU time",
            registry=r,
        )
        self.absorbed = Counter(
            "spendgate_absorbed_micros",
            "Cost beyond a request's bound: served, never charged (the platform's loss)",
            ["currency", "rule"],
            registry=r,
        )
        self.cost_expression_errors = Counter(
            "spendgate_cost_expression_errors",
            "Answers a cost expression could not price (charged their bound)",
            ["rule"],
            registry=r,
        )
        self.output_limits = Counter(
            "spendgate_output_limits_set",
            "Requests whose output limit the sidecar set, by reason (balance, maximum, unset)",
            ["reason"],
            registry=r,
        )
        self.count_limits = Counter(
            "spendgate_count_limits_set",
            "Requests whose count (a price expression's clampField) the sidecar lowered",
            registry=r,
        )
        self.downgrades = Counter(
            "spendgate_downgrades",
            "Requests sent as their rule's downgradeTo model (a downgrade soft limit), by the"
            " rule they asked for",
            ["rule"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "spendgate_upstream_errors", "Model container failures", ["kind"], registry=r
        )
