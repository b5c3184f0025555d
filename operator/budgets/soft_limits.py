"""A CustomerBudget's soft limits in its status (``status.softLimitsReached``), and the Events
and alerts their changes send.

The reserve script enforces throttle and downgrade itself; the operator shows every soft limit
reached and is what *notifies*: a ``notify`` soft limit joining the list is a Warning Event and
an alert, once — the status remembers the list, so refreshes and restarts never alert twice;
when it leaves the list (a new period, a top-up) it can alert again. A throttle or downgrade
joining or leaving the list is a Normal Event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spendgate.ledger import Account
from spendgate.models import CustomerBudget, SoftLimit, SoftLimitAction
from spendgate.money import format_amount
from spendgate.periods import current_period
from spendgate.soft_limits import reached

from ..alerts.sender import Alert
from ..kube.objects import EventSpec

REACHED, CLEARED = "SoftLimitReached", "SoftLimitCleared"
STATUS_FIELD = "softLimitsReached"

_EFFECTS = {
    SoftLimitAction.throttle: "requests are now throttled",
    SoftLimitAction.downgrade: "requests now go to their rule's downgradeTo model",
}
_LIFTED = {
    SoftLimitAction.throttle: "requests are no longer throttled",
    SoftLimitAction.downgrade: "requests are no longer downgraded",
}


@dataclass(frozen=True)
class SoftLimits:
    reached: list[str]  # labels, in spec order, each once: status.softLimitsReached
    changes: list[tuple[SoftLimit, bool]]  # in spec order; True: joined the list, False: left
    used: int = 0  # spent + held this period, micro-units
    available: int = 0
    limit: int = 0  # what ``at`` is a percentage of (0: none)

    @property
    def joined(self) -> list[SoftLimit]:
        return [soft for soft, now_reached in self.changes if now_reached]

    @property
    def left(self) -> list[SoftLimit]:
        """Reached before, not now; a soft limit removed from the spec just leaves quietly."""
        return [soft for soft, now_reached in self.changes if not now_reached]


def evaluate_soft_limits(
    budget: CustomerBudget, account: Account, old_status: Mapping[str, Any], now_ms: int
) -> SoftLimits:
    """Which soft limits are reached on the account's figures, and which changed since
    ``old_status``."""
    account = current_period(account, now_ms)
    used = account.spent + account.held
    available = account.available
    limit = account.limit or budget.spec.limit or 0
    before = _labels(old_status.get(STATUS_FIELD))
    labels: list[str] = []
    changes: list[tuple[SoftLimit, bool]] = []
    seen: set[str] = set()
    for soft in budget.spec.policy.soft_limits:
        label = soft.label
        if label in seen:
            continue  # the same action and trigger twice: one entry, one Event
        seen.add(label)
        if reached(soft, limit, used, available):
            labels.append(label)
            if label not in before:
                changes.append((soft, True))
        elif label in before:
            changes.append((soft, False))
    return SoftLimits(labels, changes, used=used, available=available, limit=limit)


def figures(budget: CustomerBudget, account: Account, soft: SoftLimit, s: SoftLimits) -> str:
    """The figures behind a soft limit, like "90.00 of 100.00 USD spent or held this month
    (90%)" or "4.00 USD available"."""
    currency = budget.spec.currency
    if soft.at is not None and s.limit:
        return (
            f"{format_amount(s.used)} of {format_amount(s.limit)} {currency} spent or held"
            f" this {account.period} ({s.used * 100 // s.limit}%)"
        )
    return f"{format_amount(s.available)} {currency} available"


def soft_limit_message(
    budget: CustomerBudget, account: Account, soft: SoftLimit, s: SoftLimits, *, now_reached: bool
) -> str:
    who = f"CustomerBudget {budget.ref} (customer {budget.spec.customer_id})"
    facts = figures(budget, account, soft, s)
    if now_reached:
        effect = _EFFECTS.get(soft.action)
        head = f"{who} reached its soft limit {soft.label}"
        return f"{head}: {effect}; {facts}" if effect else f"{head}: {facts}"
    lifted = _LIFTED.get(soft.action)
    head = f"{who} is no longer at its soft limit {soft.label}"
    return f"{head}: {lifted}; {facts}" if lifted else f"{head}: {facts}"


def soft_limit_changes(
    budget: CustomerBudget,
    account: Account,
    s: SoftLimits,
    status: Mapping[str, Any],
) -> tuple[list[EventSpec], list[Alert]]:
    """An Event per soft limit that joined or left the list; an alert per ``notify`` one
    that joined. ``status`` holds the account fields and state already."""
    events: list[EventSpec] = []
    alerts: list[Alert] = []
    for soft, now_reached in s.changes:
        message = soft_limit_message(budget, account, soft, s, now_reached=now_reached)
        if not now_reached:
            events.append(EventSpec("Normal", CLEARED, message))
            continue
        if soft.action is not SoftLimitAction.notify:
            events.append(EventSpec("Normal", REACHED, message))
            continue
        events.append(EventSpec("Warning", REACHED, message))
        alerts.append(
            Alert(
                kind=REACHED,
                budget=budget.ref,
                customer_id=budget.spec.customer_id,
                message=message,
                fields={
                    "softLimit": soft.label,
                    "action": soft.action.value,
                    "used": format_amount(s.used),
                    "limit": format_amount(s.limit) if s.limit else None,
                    "balance": status.get("balance"),
                    "available": status.get("available"),
                    "spentThisPeriod": status.get("spentThisPeriod"),
                    "currency": budget.spec.currency,
                    "state": status.get("state"),
                },
            )
        )
    return events, alerts


def _labels(value: Any) -> set[str]:
    if not isinstance(value, list):
        return set()
    return {label for label in value if isinstance(label, str)}


__all__ = [
    "CLEARED",
    "REACHED",
    "STATUS_FIELD",
    "SoftLimits",
    "evaluate_soft_limits",
    "figures",
    "soft_limit_changes",
    "soft_limit_message",
]
