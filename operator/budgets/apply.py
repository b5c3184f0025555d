"""Checking a parsed budget and applying it to Redis: steps 2 and 3 of
:func:`.reconcile.reconcile_budget`.

:func:`apply_budget` goes: the ``customerId`` claim -> the Secrets (:func:`.checks.resolve_keys`)
and the named PriceBooks (:func:`.checks.check_pricebooks`) -> ``ConfigStore.apply_budget``
(the code behind ``spendgate apply``) -> the Stripe link. Keys whose Secret is missing or
invalid are applied as disabled (revoked). Every problem is a :class:`.checks.Problem`; Redis
being unreachable raises :class:`~..kube.retry.RedisUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spendgate.config_store import BudgetApplied, ConfigConflict, ConfigStore, TreeConflict
from spendgate.models import CustomerBudget, Mode
from spendgate.money import format_amount

from ..kube.retry import redis_call
from .checks import (
    API_KEY_CONFLICT,
    CUSTOMER_ID_CONFLICT,
    INVALID_TREE,
    STRIPE_CUSTOMER_CONFLICT,
    Problem,
    SecretReader,
    check_pricebooks,
    resolve_keys,
)
from .status import PAYMENT_METHOD_SOURCE
from .stripe_hooks import StripeHooks


@dataclass
class Applied:
    """What applying did. ``applied`` is None when nothing was applied (``problems`` say
    why); ``linked`` holds Stripe's status fields."""

    problems: list[Problem]
    applied: BudgetApplied | None = None
    linked: dict[str, Any] = field(default_factory=dict)


async def apply_budget(
    budget: CustomerBudget,
    store: ConfigStore,
    read_secret: SecretReader,
    stripe: StripeHooks | None,
) -> Applied:
    """Check ``budget`` and apply it to Redis (the caller holds the customer's lock)."""
    spec = budget.spec
    owner = await redis_call(store.owner_of(spec.customer_id))
    if owner is not None and owner != budget.ref:
        message = (
            f"spec.customerId: {spec.customer_id!r} is already claimed by CustomerBudget"
            f" {owner}; each customer needs exactly one budget (this one is not applied)"
        )
        return Applied([Problem(CUSTOMER_ID_CONFLICT, message)])

    resolution = await resolve_keys(budget, read_secret)
    problems = [*resolution.problems, *await check_pricebooks(budget, store)]
    effective = with_keys_disabled(budget, resolution.unusable)
    try:
        applied = await redis_call(store.apply_budget(effective, resolution.keys))
    except TreeConflict as error:
        return Applied([*problems, Problem(INVALID_TREE, str(error))])
    except ConfigConflict as error:
        reason = CUSTOMER_ID_CONFLICT if "customerId" in str(error) else API_KEY_CONFLICT
        return Applied([*problems, Problem(reason, str(error))])
    if not spec.policy.require_payment_method:
        await redis_call(store.ledger.unsuspend(spec.customer_id, PAYMENT_METHOD_SOURCE))
    linked: dict[str, Any] = {}
    if stripe is not None:
        conflict = await redis_call(stripe.link(spec))
        if conflict is not None:
            problems.append(
                Problem(STRIPE_CUSTOMER_CONFLICT, f"spec.stripe.customerId: {conflict}")
            )
        linked = await redis_call(stripe.status(spec))
    return Applied(problems, applied, linked)


def with_keys_disabled(budget: CustomerBudget, names: set[str]) -> CustomerBudget:
    """``budget`` with the API keys ``names`` disabled (their Secret is missing or invalid)."""
    if not names:
        return budget
    spec = budget.spec
    keys = [
        key.model_copy(update={"disabled": True}) if key.name in names else key
        for key in spec.api_keys
    ]
    return budget.model_copy(update={"spec": spec.model_copy(update={"api_keys": keys})})


def configured_summary(budget: CustomerBudget, keys: int) -> str:
    """What is configured: the stable message of ``Ready=True``."""
    spec = budget.spec
    parts = [f"customer {spec.customer_id}", f"{plural(keys, 'API key')}"]
    if spec.mode is Mode.capped and spec.limit is not None:
        parts.append(f"capped at {format_amount(spec.limit)} {spec.currency} per {spec.period}")
    else:
        opening = format_amount(spec.balance or 0)
        parts.append(f"prepaid, opening balance {opening} {spec.currency}")
    return ", ".join(parts)


def applied_changes(applied: BudgetApplied) -> str:
    """What this apply changed, for the ``Configured`` Event."""
    parts = []
    if applied.balance_change:
        sign = "+" if applied.balance_change > 0 else ""
        parts.append(f"balance {sign}{format_amount(applied.balance_change)}")
    if applied.keys_removed:
        parts.append(f"{plural(applied.keys_removed, 'key')} revoked")
    return f" ({', '.join(parts)})" if parts else ""


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


__all__ = [
    "Applied",
    "applied_changes",
    "apply_budget",
    "configured_summary",
    "plural",
    "with_keys_disabled",
]
