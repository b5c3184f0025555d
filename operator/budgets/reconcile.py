"""Reconciling CustomerBudgets: spec and Secrets into Redis, Redis back into status.

Plain async functions over plain dicts (a budget's body as the API server returns it), so they
are tested without Kubernetes; ``spendgate.operator.runtime.handlers`` wires them to kopf.

- :func:`reconcile_budget` validates the spec, reads the referenced Secrets through an injected
  :class:`SecretReader`, checks the claimed ``customerId`` and the named PriceBooks, applies the
  budget with ``ConfigStore.apply_budget`` (the code behind ``spendgate apply``) and computes
  the status from the account in Redis.
- :func:`refresh_budget` is the periodic status refresh; it falls back to a full reconcile when
  the budget is not Ready or Redis lost its configuration.
- :func:`finalize_budget` runs when a budget is deleted: keys revoked, account frozen.

With Stripe enabled, a :class:`StripeHooks` (operator/stripe/wiring.py) links each applied
budget to its Stripe customer (``StripeCustomerConflict`` when another budget holds it), fills
``status.lastStripeSync`` and ``status.exportLagSeconds``, and releases the link on deletion.

Every problem becomes a ``Ready=False`` condition with a reason and a message naming the field
(and a Warning Event); nothing is skipped silently. Redis being unreachable is different: it is
temporary, so it shows as ``Ready=Unknown`` (``RedisUnavailable``) and the caller retries.

**Keys whose Secret is missing or invalid are revoked**, not kept: the rest of the budget is
applied and the budget reports ``SecretMissing``/``SecretInvalid``. Deleting a key's Secret thus
stops that key at once, which is the safe reading of an ambiguous situation.

Read top to bottom: one function per kopf handler, each a straight line of steps --
**parse** (:func:`.checks.parse_budget`) -> **check and apply to Redis**
(:func:`.apply.apply_budget`) -> **status, conditions, Events** (:func:`configured`, from the
account in Redis by :mod:`.status`); :func:`misconfigured` and :func:`retry_later` are the two
ways out before the end.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from spendgate.config_store import BudgetApplied, ConfigStore
from spendgate.ledger import Account
from spendgate.models import BudgetState, CustomerBudget, ManifestError

from ..alerts.sender import Alert
from ..kube import conditions as cond
from ..kube.conditions import INVALID_SPEC, READY
from ..kube.objects import EventSpec, generation_of, object_ref, plain, status_patch
from ..kube.retry import RetryableError, redis_call
from .apply import Applied, applied_changes, apply_budget, configured_summary, plural
from .checks import Problem, SecretReader, parse_budget, raw_customer_id, ready_condition
from .ledger_condition import read_audit_record, set_ledger_condition
from .locks import KeyedLocks
from .status import ACCOUNT_FIELDS, clear_account_status, fill_account_status, transition_events
from .stripe_hooks import StripeHooks

# What a reconciliation keeps of the old status until it knows better.
CARRIED_STATUS = (
    "conditions",
    "state",
    "stateReasons",
    "customerId",
    "alertedThreshold",
    "alertBaseline",
    "softLimitsReached",
    "activeKeys",
    *ACCOUNT_FIELDS,
)
INVALID_SPEC_STATE = "the spec is invalid; the last valid configuration (if any) stays in effect"
NOT_APPLIED_STATE = "the budget is not applied: see the Ready condition"


@dataclass
class Reconciled:
    """What a reconciliation found: the new status, what to tell, and whether to retry."""

    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    error: RetryableError | None = None
    applied: BudgetApplied | None = None
    customer_id: str | None = None

    def patch(self, old_status: Mapping[str, Any] | None) -> dict[str, Any]:
        return status_patch(old_status, self.status)


# --------------------------------------------------------------------------- create/update/resume


async def reconcile_budget(
    body: Mapping[str, Any],
    *,
    store: ConfigStore,
    read_secret: SecretReader,
    locks: KeyedLocks | None = None,
    now: datetime | None = None,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    """Apply a CustomerBudget to Redis and compute its status. Never raises for bad input.

    Returns the status to write and the Events/alerts to send; ``error`` is set when the
    attempt must be retried (Redis or the Kubernetes API unreachable).
    """
    now = now or datetime.now(UTC)
    old_status: dict[str, Any] = plain(body.get("status") or {})
    status = {key: old_status[key] for key in CARRIED_STATUS if key in old_status}
    generation = generation_of(body)
    try:
        budget = parse_budget(body)
    except ManifestError as error:
        problems = [Problem(INVALID_SPEC, problem) for problem in error.problems]
        return misconfigured(
            old_status, status, problems, generation, now, INVALID_SPEC_STATE, raw_customer_id(body)
        )
    customer = budget.spec.customer_id
    try:
        async with locks(customer) if locks is not None else contextlib.nullcontext():
            outcome = await apply_budget(budget, store, read_secret, stripe)
            if outcome.applied is None:
                # Nothing was applied: never show another budget's account.
                clear_account_status(status)
                status["customerId"] = customer
                return misconfigured(
                    old_status,
                    status,
                    outcome.problems,
                    generation,
                    now,
                    NOT_APPLIED_STATE,
                    customer,
                )
            status.update(outcome.linked)
            account = await redis_call(store.ledger.account(customer))
            audited = await redis_call(read_audit_record(store.redis, customer))
    except RetryableError as error:
        return retry_later(old_status, status, error, generation, now, customer)
    return configured(budget, old_status, status, outcome, account, audited, now)


def configured(
    budget: CustomerBudget,
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    outcome: Applied,
    account: Account,
    audited: Mapping[str, str],
    now: datetime,
) -> Reconciled:
    """The budget is applied: its conditions, its account in the status, and what to tell."""
    applied = outcome.applied
    assert applied is not None
    generation = budget.metadata.generation
    summary = configured_summary(budget, applied.keys_added)
    status["conditions"] = cond.set_condition(
        status.get("conditions"), ready_condition(outcome.problems, generation, now, summary)
    )
    status["observedGeneration"] = generation
    status["activeKeys"] = applied.keys_added
    account_events, alerts = fill_account_status(budget, account, old_status, status, now)
    account_events += set_ledger_condition(audited, old_status, status, generation, now)
    changed = (
        old_status.get("observedGeneration") != generation
        or applied.balance_change != 0
        or applied.keys_removed > 0
    )
    detail = summary + applied_changes(applied) if changed else None
    events = transition_events(old_status, status, configured_message=detail)
    return Reconciled(
        status,
        events + account_events,
        alerts,
        applied=applied,
        customer_id=budget.spec.customer_id,
    )


def misconfigured(
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    problems: list[Problem],
    generation: int | None,
    now: datetime,
    why: str,
    customer_id: str | None,
) -> Reconciled:
    """The budget as written is not in effect: ``Ready=False`` with ``problems``."""
    status["conditions"] = cond.set_condition(
        status.get("conditions"), ready_condition(problems, generation, now, "")
    )
    status["state"] = BudgetState.misconfigured.value
    status["stateReasons"] = [why]
    status["observedGeneration"] = generation
    events = transition_events(old_status, status, configured_message=None)
    return Reconciled(status, events, customer_id=customer_id)


def retry_later(
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    error: RetryableError,
    generation: int | None,
    now: datetime,
    customer_id: str | None,
) -> Reconciled:
    """Redis or the API did not answer: ``Ready=Unknown``, the rest as it was; retried."""
    status["conditions"] = cond.set_condition(
        status.get("conditions"), error.ready_condition(generation, now)
    )
    events = transition_events(old_status, status, configured_message=None)
    return Reconciled(status, events, error=error, customer_id=customer_id)


# --------------------------------------------------------------------------- timer


async def refresh_budget(
    body: Mapping[str, Any],
    *,
    store: ConfigStore,
    read_secret: SecretReader,
    locks: KeyedLocks | None = None,
    now: datetime | None = None,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    """The periodic status refresh from Redis (balances, state, thresholds).

    A budget that is not Ready, whose spec changed since it was applied, or whose customer is
    no longer configured in Redis (a Redis that lost its data) is reconciled in full instead.
    """
    now = now or datetime.now(UTC)
    in_full = functools.partial(
        reconcile_budget,
        body,
        store=store,
        read_secret=read_secret,
        locks=locks,
        now=now,
        stripe=stripe,
    )
    old_status: dict[str, Any] = plain(body.get("status") or {})
    budget = _applied_as_is(body, old_status)
    if budget is None:
        return await in_full()
    customer = budget.spec.customer_id
    try:
        owner = await redis_call(store.owner_of(customer))
        account = await redis_call(store.ledger.account(customer))
        linked = await redis_call(stripe.status(budget.spec)) if stripe is not None else {}
        audited = await redis_call(read_audit_record(store.redis, customer))
    except RetryableError as error:
        generation = budget.metadata.generation
        return retry_later(old_status, dict(old_status), error, generation, now, customer)
    if owner != budget.ref or not account.configured:
        return await in_full()
    status = {**old_status, **linked}
    events, alerts = fill_account_status(budget, account, old_status, status, now)
    events += set_ledger_condition(audited, old_status, status, budget.metadata.generation, now)
    events = transition_events(old_status, status, configured_message=None) + events
    return Reconciled(status, events, alerts, customer_id=customer)


def _applied_as_is(body: Mapping[str, Any], old_status: Mapping[str, Any]) -> CustomerBudget | None:
    """The budget, when Ready for the generation it has now; None: reconcile it in full."""
    ready = cond.is_true(old_status.get("conditions"), READY)
    if not ready or old_status.get("observedGeneration") != generation_of(body):
        return None
    try:
        return parse_budget(body)
    except ManifestError:
        return None


# --------------------------------------------------------------------------- delete


async def finalize_budget(
    body: Mapping[str, Any], *, store: ConfigStore, stripe: StripeHooks | None = None
) -> list[EventSpec]:
    """The budget is being deleted: revoke its keys and freeze its account, at once.

    The account and its ledger stream stay in Redis: requests in flight still settle (and are
    recorded), and usage not yet exported to Stripe is kept; the exporter trims the stream
    after exporting. A re-created budget for the same customer picks the account up again.
    Raises RedisUnavailable (the finalizer stays until Redis is back).
    """
    ref = object_ref(body)
    customer = raw_customer_id(body)
    if customer is None:
        return [EventSpec("Normal", "Deleted", "no valid customerId: nothing was configured")]
    owner = await redis_call(store.owner_of(customer))
    if owner != ref:
        holder = f"CustomerBudget {owner}" if owner else "no budget"
        return [
            EventSpec(
                "Normal",
                "Deleted",
                f"customer {customer} is claimed by {holder}, not by this one: nothing to revoke",
            )
        ]
    removed = await redis_call(store.revoke_customer(customer, f"CustomerBudget {ref} was deleted"))
    if stripe is not None:
        await redis_call(stripe.unlink(customer))
    return [
        EventSpec(
            "Normal",
            "Revoked",
            f"customer {customer}: {plural(removed, 'API key')} revoked and the account"
            " suspended; ledger entries not yet exported are kept",
        )
    ]


__all__ = [
    "KeyedLocks",
    "Reconciled",
    "StripeHooks",
    "configured",
    "finalize_budget",
    "misconfigured",
    "reconcile_budget",
    "refresh_budget",
    "retry_later",
]
