"""Abnormal spend in the operator: ``spec.policy.abnormalSpend`` of each budget, checked by the
leader's spend watch (:mod:`.spend_watch`) with the core policy (spendgate/accounting/abnormal.py).

On a trip, once per episode:

- ``action: alert`` -- a Warning Event ``AbnormalSpend`` on the budget and the alert webhook.
  The episode ends when the spend has been back to normal for a whole window (or a person
  acknowledged it, below); a later trip alerts again.
- ``action: suspend`` -- the customer is suspended in Redis with source ``abnormal-spend`` (the
  sidecars refuse it with 403 from their next request), the status becomes ``Suspended`` with
  reason ``AbnormalSpend``, and the Event and alert are sent. It stays suspended until a person
  lifts it.

A person lifts it (or acknowledges an alert) either with ``spendgate resume CUSTOMER`` or by
setting the annotation ``resume.spendgate.dev/abnormal-spend`` on the CustomerBudget to a new
value (who and why, say): :func:`resume_from_annotation`, called by a kopf handler. Each value
acts once (the last one handled is kept in Redis); afterwards only spend from then on counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError

from spendgate.accounting import abnormal
from spendgate.accounting.abnormal import AbnormalPolicy, Action, Verdict
from spendgate.budget_tree import tree_keys
from spendgate.config_store import ConfigStore
from spendgate.models import AbnormalSpendPolicy
from spendgate.money import format_amount

from ..kube.objects import EventSpec, object_ref
from ..kube.retry import redis_call
from .checks import raw_customer_id
from .notify import BudgetNotifier, BudgetTarget

log = logging.getLogger("spendgate.operator.abnormal")

REASON = abnormal.REASON  # "AbnormalSpend": the Event reason and the Suspended reason
# Outside kopf's prefix (spendgate.dev/): kopf ignores its own annotations when diffing.
RESUME_ANNOTATION = "resume.spendgate.dev/abnormal-spend"
RESUMED = "AbnormalSpendResumed"
TRIPS = Counter(
    "spendgate_operator_abnormal_spend_trips",
    "Abnormal-spend episodes the spend watch acted on, by action (alerted, suspended)",
    ["action"],
)
_TOKEN = "resume_token"  # field of the abnormal state hash: the last annotation value handled


def policy_of(body: Mapping[str, Any] | None) -> AbnormalSpendPolicy | None:
    """``spec.policy.abnormalSpend`` of a budget body; None when absent. An invalid one raises
    ValueError (the reconciler reports it as InvalidSpec)."""
    raw = (((body or {}).get("spec") or {}).get("policy") or {}).get("abnormalSpend")
    if raw is None:
        return None
    try:
        return AbnormalSpendPolicy.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"spec.policy.abnormalSpend: {error}") from None


def core_policy(policy: AbnormalSpendPolicy) -> AbnormalPolicy:
    return AbnormalPolicy(
        action=Action(policy.action.value),
        minimum=policy.minimum,
        factor=policy.factor,
        percentile=policy.percentile,
        window_ms=policy.window,
        baseline_days=policy.baseline_days,
        min_active_hours=policy.min_active_hours,
    )


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    acted: str | None = None  # "alerted" | "suspended" | None


def _fields(verdict: Verdict, policy: AbnormalPolicy, currency: str | None) -> dict[str, Any]:
    return {
        "action": policy.action.value,
        "recent": format_amount(verdict.recent),
        "baseline": format_amount(verdict.baseline or 0),
        "threshold": format_amount(verdict.threshold or 0),
        "windowMinutes": policy.window_ms // 60_000,
        "activeHours": verdict.active_hours,
        "currency": currency,
    }


async def watch_abnormal(
    redis: Any,
    target: BudgetTarget,
    policy_model: AbnormalSpendPolicy,
    notifier: BudgetNotifier | None,
    now_ms: int,
) -> Outcome:
    """Roll up, check, and act on a trip once per episode (state in Redis, so a failover
    neither repeats nor forgets an episode)."""
    policy = core_policy(policy_model)
    customer = target.customer_id
    verdict, state = await abnormal.check(redis, customer, policy, now_ms)
    if not verdict.tripped:
        alerted = state.get("alerted_ms")
        calm = alerted is not None and now_ms - alerted >= policy.window_ms
        if calm and "tripped_ms" not in state:
            await redis.hdel(
                abnormal.state_key(await tree_keys(redis, customer)), "alerted_ms"
            )  # the episode is over
        return Outcome(verdict)
    detail = verdict.describe(target.currency)
    if policy.action is Action.suspend:
        if await abnormal.is_suspended(redis, customer) is not None:
            return Outcome(verdict)  # suspended already: nothing more to say
        why = f"spend far above its normal: {detail}"
        await abnormal.suspend(redis, customer, why, now_ms)
        await abnormal.mark_alerted(redis, customer, now_ms)
        message = (
            f"customer {customer} suspended for abnormal spend: {detail}. Requests are refused"
            f" (403) until a person resumes it: `spendgate resume {customer}` or the annotation"
            f" {RESUME_ANNOTATION}"
        )
        acted = "suspended"
    else:
        if "alerted_ms" in state:
            return Outcome(verdict)  # this episode was told already
        await abnormal.mark_alerted(redis, customer, now_ms)
        message = f"abnormal spend for customer {customer}: {detail}"
        acted = "alerted"
    TRIPS.labels(acted).inc()
    log.warning(
        "abnormal spend", extra={"customer": customer, "budget": target.ref, "action": acted}
    )
    if notifier is not None:
        await notifier.tell(
            target,
            REASON,
            message,
            alert_fields=_fields(verdict, policy, target.currency),
            refresh=acted == "suspended",
        )
    return Outcome(verdict, acted)


async def forget(redis: Any, customer_id: str) -> None:
    """The budget has no policy (any more): drop the rollup's cursor and buckets, so the ledger
    trimmer no longer keeps entries for it. A standing suspension stays (a person lifts it)."""
    keys = await tree_keys(redis, customer_id)
    await redis.hdel(abnormal.state_key(keys), "cursor", "alerted_ms")
    await redis.delete(abnormal.minute_buckets_key(keys))
    await redis.delete(abnormal.hour_buckets_key(keys))


async def has_rollup(redis: Any, customer_id: str) -> bool:
    keys = await tree_keys(redis, customer_id)
    return bool(await redis.hexists(abnormal.state_key(keys), "cursor"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def resume_from_annotation(
    body: Mapping[str, Any], redis: Any, customer_id: str, now_ms: int
) -> list[EventSpec]:
    """Lift an abnormal-spend suspension (or acknowledge an alert) when the budget's
    ``resume.spendgate.dev/abnormal-spend`` annotation has a value not handled before."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    token = str(annotations.get(RESUME_ANNOTATION) or "").strip()
    if not token:
        return []
    key = abnormal.state_key(await tree_keys(redis, customer_id))
    handled = await redis.hget(key, _TOKEN)
    if handled is not None and _text(handled) == token:
        return []
    lifted = await abnormal.resume(redis, customer_id, now_ms)
    await redis.hset(key, _TOKEN, token)
    log.info(
        "abnormal spend resumed by annotation",
        extra={"customer": customer_id, "lifted": lifted, "token": token[:100]},
    )
    if lifted:
        message = (
            f"abnormal-spend suspension of customer {customer_id} lifted ({RESUME_ANNOTATION}:"
            f" {token[:200]}); only spend from now on counts towards the next trip"
        )
    else:
        message = (
            f"customer {customer_id} was not suspended for abnormal spend ({RESUME_ANNOTATION}:"
            f" {token[:200]}); its episode is acknowledged: only spend from now on counts"
        )
    return [EventSpec("Normal", RESUMED, message)]


async def resume_budget(
    body: Mapping[str, Any], store: ConfigStore, now_ms: int
) -> list[EventSpec]:
    """:func:`resume_from_annotation` for the budget that owns its customer (kopf's handler)."""
    customer = raw_customer_id(body)
    if (
        customer is None
        or not str(
            ((body.get("metadata") or {}).get("annotations") or {}).get(RESUME_ANNOTATION) or ""
        ).strip()
    ):
        return []
    owner = await redis_call(store.owner_of(customer))
    if owner != object_ref(body):
        return [
            EventSpec(
                "Warning",
                RESUMED,
                f"{RESUME_ANNOTATION} ignored: customer {customer} is not configured by this"
                " budget",
            )
        ]
    return await redis_call(resume_from_annotation(body, store.redis, customer, now_ms))


__all__ = [
    "REASON",
    "RESUMED",
    "RESUME_ANNOTATION",
    "Outcome",
    "core_policy",
    "forget",
    "has_rollup",
    "policy_of",
    "resume_budget",
    "resume_from_annotation",
    "watch_abnormal",
]
