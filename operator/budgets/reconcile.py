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

What a budget refers to is checked in :mod:`.checks`; its status is computed from the
account in Redis by :mod:`.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from spendgate.config_store import BudgetApplied, ConfigConflict, ConfigStore
from spendgate.models import BudgetState, CustomerBudget, ManifestError, Mode
from spendgate.money import format_amount

from ..alerts.sender import Alert
from ..kube import conditions as cond
from ..kube.conditions import INVALID_SPEC, READY
from ..kube.objects import EventSpec, generation_of, object_ref, plain, status_patch
from ..kube.retry import RetryableError, redis_call
from .checks import (
    API_KEY_CONFLICT,
    CUSTOMER_ID_CONFLICT,
    STRIPE_CUSTOMER_CONFLICT,
    Problem,
    SecretReader,
    check_pricebooks,
    parse_budget,
    raw_customer_id,
    ready_condition,
    resolve_keys,
)
from .ledger_condition import read_audit_record, set_ledger_condition
from .status import (
    ACCOUNT_FIELDS,
    PAYMENT_METHOD_SOURCE,
    clear_account_status,
    fill_account_status,
    transition_events,
)


class StripeHooks(Protocol):
    """Stripe's part of reconciling a budget; Redis errors propagate (retried)."""

    async def link(self, spec: Any) -> str | None:
        """Record the budget's Stripe link (or drop it: no ``spec.stripe``); a message when
        another budget holds the Stripe customer (nothing is linked then)."""
        ...

    async def status(self, spec: Any) -> dict[str, Any]:
        """``lastStripeSync``, ``exportLagSeconds``, ``exchangeRate`` (None when not linked)."""
        ...

    async def unlink(self, customer_id: str) -> None:
        """The budget is deleted: release its link once its usage is exported."""
        ...


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


class KeyedLocks:
    """One asyncio.Lock per key (customer id): two budgets claiming one customer never race."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def forget(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]


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
    status: dict[str, Any] = {
        key: old_status.get(key)
        for key in (
            "conditions",
            "state",
            "stateReasons",
            "customerId",
            "alertedThreshold",
            "alertBaseline",
            "activeKeys",
            *ACCOUNT_FIELDS,
        )
        if key in old_status
    }
    generation = generation_of(body)
    try:
        budget = parse_budget(body)
    except ManifestError as error:
        problems = [Problem(INVALID_SPEC, problem) for problem in error.problems]
        status["conditions"] = cond.set_condition(
            status.get("conditions"), ready_condition(problems, generation, now, "")
        )
        status["state"] = BudgetState.misconfigured.value
        status["stateReasons"] = [
            "the spec is invalid; the last valid configuration (if any) stays in effect"
        ]
        status["observedGeneration"] = generation
        events = transition_events(old_status, status, configured_message=None)
        return Reconciled(status, events, customer_id=raw_customer_id(body))

    customer = budget.spec.customer_id
    try:
        async with locks(customer) if locks is not None else contextlib.nullcontext():
            return await _reconcile_parsed(
                budget, old_status, status, store, read_secret, now, stripe
            )
    except RetryableError as error:
        status["conditions"] = cond.set_condition(
            status.get("conditions"), error.ready_condition(generation, now)
        )
        events = transition_events(old_status, status, configured_message=None)
        return Reconciled(status, events, error=error, customer_id=customer)


async def _reconcile_parsed(
    budget: CustomerBudget,
    old_status: dict[str, Any],
    status: dict[str, Any],
    store: ConfigStore,
    read_secret: SecretReader,
    now: datetime,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    spec = budget.spec
    generation = budget.metadata.generation
    problems: list[Problem] = []

    owner = await redis_call(store.owner_of(spec.customer_id))
    if owner is not None and owner != budget.ref:
        problems.append(
            Problem(
                CUSTOMER_ID_CONFLICT,
                f"spec.customerId: {spec.customer_id!r} is already claimed by CustomerBudget"
                f" {owner}; each customer needs exactly one budget (this one is not applied)",
            )
        )
        return _unapplied(budget, old_status, status, problems, now)

    resolution = await resolve_keys(budget, read_secret)
    problems += resolution.problems
    problems += await check_pricebooks(budget, store)
    effective = budget
    if resolution.unusable:
        effective = budget.model_copy(
            update={
                "spec": spec.model_copy(
                    update={
                        "api_keys": [
                            key.model_copy(update={"disabled": True})
                            if key.name in resolution.unusable
                            else key
                            for key in spec.api_keys
                        ]
                    }
                )
            }
        )
    try:
        applied = await redis_call(store.apply_budget(effective, resolution.keys))
    except ConfigConflict as error:
        reason = CUSTOMER_ID_CONFLICT if "customerId" in str(error) else API_KEY_CONFLICT
        problems.append(Problem(reason, str(error)))
        return _unapplied(budget, old_status, status, problems, now)
    if not spec.policy.require_payment_method:
        await redis_call(store.ledger.unsuspend(spec.customer_id, PAYMENT_METHOD_SOURCE))
    if stripe is not None:
        conflict = await redis_call(stripe.link(spec))
        if conflict is not None:
            problems.append(
                Problem(STRIPE_CUSTOMER_CONFLICT, f"spec.stripe.customerId: {conflict}")
            )
        status.update(await redis_call(stripe.status(spec)))
    account = await redis_call(store.ledger.account(spec.customer_id))
    audited = await redis_call(read_audit_record(store.redis, spec.customer_id))

    summary = _summary(budget, applied.keys_added)
    status["conditions"] = cond.set_condition(
        status.get("conditions"), ready_condition(problems, generation, now, summary)
    )
    status["observedGeneration"] = generation
    status["activeKeys"] = applied.keys_added
    events_acc, alerts = fill_account_status(budget, account, old_status, status, now)
    events_acc += set_ledger_condition(audited, old_status, status, generation, now)
    changed = (
        old_status.get("observedGeneration") != generation
        or applied.balance_change != 0
        or applied.keys_removed > 0
    )
    detail = summary + _changes(applied)
    events = transition_events(old_status, status, configured_message=detail if changed else None)
    return Reconciled(
        status, events + events_acc, alerts, applied=applied, customer_id=spec.customer_id
    )


def _unapplied(
    budget: CustomerBudget,
    old_status: dict[str, Any],
    status: dict[str, Any],
    problems: list[Problem],
    now: datetime,
) -> Reconciled:
    """Nothing was applied: report why; never show another budget's account."""
    generation = budget.metadata.generation
    status["conditions"] = cond.set_condition(
        status.get("conditions"), ready_condition(problems, generation, now, "")
    )
    clear_account_status(status)
    status["customerId"] = budget.spec.customer_id
    status["state"] = BudgetState.misconfigured.value
    status["stateReasons"] = ["the budget is not applied: see the Ready condition"]
    status["observedGeneration"] = generation
    events = transition_events(old_status, status, configured_message=None)
    return Reconciled(status, events, customer_id=budget.spec.customer_id)


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
    old_status: dict[str, Any] = plain(body.get("status") or {})
    full = not cond.is_true(old_status.get("conditions"), READY) or old_status.get(
        "observedGeneration"
    ) != generation_of(body)
    budget: CustomerBudget | None = None
    if not full:
        try:
            budget = parse_budget(body)
        except ManifestError:
            full = True
    if full or budget is None:
        return await reconcile_budget(
            body, store=store, read_secret=read_secret, locks=locks, now=now, stripe=stripe
        )
    try:
        owner = await redis_call(store.owner_of(budget.spec.customer_id))
        account = await redis_call(store.ledger.account(budget.spec.customer_id))
        linked = await redis_call(stripe.status(budget.spec)) if stripe is not None else {}
        audited = await redis_call(read_audit_record(store.redis, budget.spec.customer_id))
    except RetryableError as error:
        status = dict(old_status)
        status["conditions"] = cond.set_condition(
            status.get("conditions"), error.ready_condition(budget.metadata.generation, now)
        )
        return Reconciled(
            status,
            transition_events(old_status, status, configured_message=None),
            error=error,
            customer_id=budget.spec.customer_id,
        )
    if owner != budget.ref or not account.configured:
        return await reconcile_budget(
            body, store=store, read_secret=read_secret, locks=locks, now=now, stripe=stripe
        )
    status = dict(old_status)
    status.update(linked)
    events, alerts = fill_account_status(budget, account, old_status, status, now)
    events += set_ledger_condition(audited, old_status, status, budget.metadata.generation, now)
    events = transition_events(old_status, status, configured_message=None) + events
    return Reconciled(status, events, alerts, customer_id=budget.spec.customer_id)


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
            f"customer {customer}: {_plural(removed, 'API key')} revoked and the account"
            " suspended; ledger entries not yet exported are kept",
        )
    ]


def _summary(budget: CustomerBudget, keys: int) -> str:
    """What is configured: the stable message of ``Ready=True``."""
    spec = budget.spec
    parts = [f"customer {spec.customer_id}", f"{_plural(keys, 'API key')}"]
    if spec.mode is Mode.capped and spec.limit is not None:
        parts.append(f"capped at {format_amount(spec.limit)} {spec.currency} per {spec.period}")
    else:
        opening = format_amount(spec.balance or 0)
        parts.append(f"prepaid, opening balance {opening} {spec.currency}")
    return ", ".join(parts)


def _changes(applied: BudgetApplied) -> str:
    """What this apply changed, for the ``Configured`` Event."""
    parts = []
    if applied.balance_change:
        sign = "+" if applied.balance_change > 0 else ""
        parts.append(f"balance {sign}{format_amount(applied.balance_change)}")
    if applied.keys_removed:
        parts.append(f"{_plural(applied.keys_removed, 'key')} revoked")
    return f" ({', '.join(parts)})" if parts else ""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


__all__ = [
    "KeyedLocks",
    "Reconciled",
    "StripeHooks",
    "finalize_budget",
    "reconcile_budget",
    "refresh_budget",
]
