"""Soft limits: when a budget level's threshold is reached (docs/operator.md, *Soft limits*).

One rule for both places that evaluate it: the reserve script (throttle, downgrade; it mirrors
:func:`reached` on live figures) and the operator (notify, on the figures in the status).
"""

from __future__ import annotations

from .models import CustomerBudgetSpec, SoftLimit, SoftLimitAction


def spent_at(soft: SoftLimit, limit: int) -> int:
    """For ``at``: the spend (with holds) at which it acts, in micro-units, rounded up."""
    assert soft.at is not None
    return -(-limit * soft.at // 100)


def reached(soft: SoftLimit, limit: int | None, used: int, available: int) -> bool:
    """``used`` is spent + held this period, ``available`` what may still be spent."""
    if soft.at is not None:
        return bool(limit) and used >= spent_at(soft, limit or 0)
    return available < (soft.below or 0)


def script_entries(spec: CustomerBudgetSpec) -> list[tuple[SoftLimit, dict[str, str | int]]]:
    """The soft limits the reserve script acts on (notify is the operator's), each with its
    trigger for the script: ``{"action", "used" | "left"}``."""
    entries: list[tuple[SoftLimit, dict[str, str | int]]] = []
    for soft in spec.policy.soft_limits:
        if soft.action is SoftLimitAction.notify:
            continue
        if soft.at is not None:
            trigger: dict[str, str | int] = {"used": spent_at(soft, spec.limit or 0)}
        else:
            trigger = {"left": soft.below or 0}
        entries.append((soft, {"action": soft.action.value, **trigger}))
    return entries
