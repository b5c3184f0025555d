"""Reconciling PriceBooks: a valid spec is written to Redis for the sidecars, an invalid one is
reported (``Ready=False``, ``InvalidSpec``) and the last valid version stays in effect."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spendgate.config_store import ConfigStore
from spendgate.models import ManifestError, PriceBook, parse_resource

from ..kube import conditions as cond
from ..kube.conditions import INVALID_SPEC, READY
from ..kube.objects import EventSpec, generation_of, object_ref, plain, ready_events, status_patch
from ..kube.retry import RetryableError, redis_call


@dataclass
class PriceBookReconciled:
    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    error: RetryableError | None = None
    currency: str | None = None

    def patch(self, old_status: Mapping[str, Any] | None) -> dict[str, Any]:
        return status_patch(old_status, self.status)


def parse_pricebook(body: Mapping[str, Any]) -> PriceBook:
    manifest = {key: plain(body[key]) for key in ("apiVersion", "kind", "spec") if key in body}
    meta = body.get("metadata") or {}
    manifest["metadata"] = {k: meta[k] for k in ("name", "namespace", "generation") if k in meta}
    resource = parse_resource(manifest, f"PriceBook {object_ref(body)}")
    if not isinstance(resource, PriceBook):
        raise ManifestError(object_ref(body), [f"kind: {resource.kind} is not a PriceBook"])
    return resource


async def reconcile_pricebook(
    body: Mapping[str, Any], *, store: ConfigStore, now: datetime | None = None
) -> PriceBookReconciled:
    now = now or datetime.now(UTC)
    old_status: dict[str, Any] = plain(body.get("status") or {})
    generation = generation_of(body)
    status: dict[str, Any] = {"conditions": old_status.get("conditions") or []}
    try:
        pricebook = parse_pricebook(body)
    except ManifestError as error:
        message = "; ".join(error.problems) + " (the last valid version, if any, stays in effect)"
        status["conditions"] = cond.set_condition(
            status["conditions"],
            cond.make_condition(
                READY, "False", INVALID_SPEC, message, generation=generation, now=now
            ),
        )
        status["observedGeneration"] = generation
        events = ready_events(old_status, status, configured_message=None)
        return PriceBookReconciled(status, events)
    try:
        await redis_call(store.apply_pricebook(pricebook))
    except RetryableError as error:
        status["conditions"] = cond.set_condition(
            status["conditions"], error.ready_condition(generation, now)
        )
        events = ready_events(old_status, status, configured_message=None)
        return PriceBookReconciled(status, events, error=error)
    spec = pricebook.spec
    rules = len(spec.rules)
    message = (
        f"{rules} rule{'' if rules == 1 else 's'} in {spec.currency}; unmatched requests:"
        f" {spec.unmatched.value}"
    )
    status["conditions"] = cond.set_condition(
        status["conditions"],
        cond.make_condition(READY, "True", "Configured", message, generation=generation, now=now),
    )
    status["observedGeneration"] = generation
    status["currency"] = spec.currency
    status["rules"] = rules
    changed = old_status.get("observedGeneration") != generation
    events = ready_events(old_status, status, configured_message=message if changed else None)
    return PriceBookReconciled(status, events, currency=spec.currency)


async def finalize_pricebook(body: Mapping[str, Any], *, store: ConfigStore) -> list[EventSpec]:
    """Remove a deleted PriceBook from Redis; raises RedisUnavailable to be retried."""
    ref = object_ref(body)
    await redis_call(store.delete_pricebook(ref))
    return [EventSpec("Normal", "Deleted", f"PriceBook {ref} removed from the sidecars' config")]


__all__ = ["PriceBookReconciled", "finalize_pricebook", "parse_pricebook", "reconcile_pricebook"]
