"""A CustomerBudget's status from its account in Redis.

The state machine (Active, Exhausted, Suspended, PendingPaymentMethod; Misconfigured is the
reconciler's), the ``Funded`` and ``Suspended`` conditions, the account fields, the alert
thresholds with their prepaid baseline, the soft limits reached (soft_limits.py), and the Events
and alerts that changes of these send.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from spendgate.ledger import Account
from spendgate.models import BudgetState, CustomerBudget, Mode
from spendgate.money import AmountError, format_amount, parse_amount
from spendgate.periods import current_period, period_start_ms

from ..alerts.sender import Alert
from ..kube import conditions as cond
from ..kube.objects import EventSpec, ready_events
from .soft_limits import STATUS_FIELD as SOFT_LIMITS_FIELD
from .soft_limits import evaluate_soft_limits, soft_limit_changes

# Suspension sources (fields of the customer's ``susp`` hash in Redis) and what they mean.
SPEC_SOURCE = "spec"  # spec.policy.suspended (written by the configure script)
DELETED_SOURCE = "deleted"  # the CustomerBudget was deleted (ConfigStore.revoke_customer)
PAYMENT_METHOD_SOURCE = "payment-method"  # requirePaymentMethod and none on file (Stripe sync)
SUSPENSION_REASONS = {
    SPEC_SOURCE: "SuspendedInSpec",
    DELETED_SOURCE: "BudgetDeleted",
    PAYMENT_METHOD_SOURCE: "PendingPaymentMethod",
    # Written by the Stripe sync (operator/stripe/mapping.py):
    "payment": "PaymentFailed",
    "subscription": "SubscriptionInactive",
    "dispute": "Disputed",
    "stripe-deleted": "StripeCustomerDeleted",
    # Written by the abnormal-spend policy (spendgate/accounting/abnormal.py); lifted by
    # `spendgate resume`:
    "abnormal-spend": "AbnormalSpend",
}

FUNDED, SUSPENDED = "Funded", "Suspended"
ATTENTION_STATES = frozenset(
    {
        BudgetState.exhausted,
        BudgetState.suspended,
        BudgetState.pending_payment_method,
        BudgetState.misconfigured,
    }
)
# The account fields of the status; cleared when the budget does not own its customer.
ACCOUNT_FIELDS = (
    "balance",
    "held",
    "available",
    "spentThisPeriod",
    "ownSpentThisPeriod",
    "periodStart",
    "currency",
)


# --------------------------------------------------------------------------- state


def budget_state(account: Account, now_ms: int) -> tuple[BudgetState, list[str]]:
    """Active, Exhausted, Suspended or PendingPaymentMethod, with the reasons for humans."""
    if account.suspensions:
        reasons = [f"{source}: {why}" for source, why in sorted(account.suspensions.items())]
        if set(account.suspensions) == {PAYMENT_METHOD_SOURCE}:
            return BudgetState.pending_payment_method, reasons
        return BudgetState.suspended, reasons
    account = current_period(account, now_ms)
    spent = account.spent
    currency = account.currency or ""
    cap_reached = [
        f"spend cap reached: {format_amount(spent)} of {format_amount(account.limit)} {currency}"
        f" spent this {account.period}"
    ]
    if account.mode == Mode.capped:
        # Capped: exhausted when the cap is spent; in-flight holds alone do not count.
        return (
            (BudgetState.exhausted, cap_reached)
            if spent >= account.limit
            else (
                BudgetState.active,
                [],
            )
        )
    if account.available <= 0:  # prepaid: available = balance - held (and the cap)
        if account.limit and spent + account.held >= account.limit:
            return BudgetState.exhausted, cap_reached
        return BudgetState.exhausted, [
            f"no balance available: balance {format_amount(account.balance)} {currency},"
            f" held {format_amount(account.held)}"
        ]
    return BudgetState.active, []


def account_fields(account: Account, now_ms: int) -> dict[str, Any]:
    account = current_period(account, now_ms)
    start = period_start_ms(account.period, now_ms) if account.period else 0
    return {
        "currency": account.currency,
        "balance": format_amount(account.balance),
        "held": format_amount(account.held),
        "available": format_amount(account.available),
        "spentThisPeriod": format_amount(account.spent),
        "ownSpentThisPeriod": format_amount(account.own_spent),
        "periodStart": _ms_to_iso(start) if account.period else None,
    }


def account_conditions(
    account: Account,
    state: BudgetState,
    reasons: list[str],
    generation: int | None,
    now: datetime,
) -> list[cond.Condition]:
    account = current_period(account, _ms(now))
    currency = account.currency or ""
    if state is BudgetState.exhausted:
        capped = "spend cap" in (reasons[0] if reasons else "")
        funded = cond.make_condition(
            FUNDED,
            "False",
            "SpendCapReached" if capped else "BalanceExhausted",
            "; ".join(reasons),
            generation=generation,
            now=now,
        )
    elif account.mode == Mode.capped:
        funded = cond.make_condition(
            FUNDED,
            "True",
            "WithinSpendCap",
            f"{format_amount(account.limit - account.spent)} {currency} left of"
            f" the {format_amount(account.limit)} {currency} cap this {account.period}",
            generation=generation,
            now=now,
        )
    else:
        funded = cond.make_condition(
            FUNDED,
            "True",
            "BalanceAvailable",
            f"{format_amount(account.available)} {currency} available",
            generation=generation,
            now=now,
        )
    if account.suspensions:
        sources = sorted(account.suspensions)
        reason = "MultipleReasons"
        if len(sources) == 1:
            reason = SUSPENSION_REASONS.get(sources[0], "Suspended")
        suspended = cond.make_condition(
            SUSPENDED, "True", reason, "; ".join(reasons), generation=generation, now=now
        )
    else:
        suspended = cond.make_condition(
            SUSPENDED, "False", "NotSuspended", "", generation=generation, now=now
        )
    return [funded, suspended]


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    alerted: int  # highest threshold alerted (0: none)
    baseline: dict[str, str] | None  # prepaid: {"balance", "charged"} after the last top-up
    crossed: int | None = None  # a threshold crossed now (alert!)
    used: int = 0  # micro-units used of ``base``
    base: int = 0


def evaluate_thresholds(
    budget: CustomerBudget, account: Account, old_status: Mapping[str, Any], now_ms: int
) -> Thresholds:
    """Which alert threshold (percent) the budget has reached, and whether that is news.

    *Capped*: percent of ``limit`` spent this period. *Prepaid*: percent spent of the balance
    the customer had after the last top-up (the *baseline*); money coming in (a top-up, a
    credit, a larger opening balance: ``balance + charged`` grows) starts a new baseline. A
    prepaid budget with a period ``limit`` alerts on whichever of the two is further along.

    ``status.alertedThreshold`` remembers what was already alerted, so restarts and periodic
    refreshes never alert twice; when usage falls below it (a top-up, a new period) it falls
    too, and the thresholds can alert again.
    """
    thresholds = budget.spec.policy.alert_thresholds
    alerted = old_status.get("alertedThreshold") or 0
    alerted = alerted if isinstance(alerted, int) else 0
    spent = current_period(account, now_ms).spent
    baseline: dict[str, str] | None = None
    candidates: list[tuple[int, int]] = []  # (used, base)
    if account.mode == Mode.capped:
        candidates.append((spent, account.limit))
    else:
        old = old_status.get("alertBaseline") or {}
        b, c = _micros(old.get("balance")), _micros(old.get("charged"))
        total_in = account.balance + account.charged
        if b is None or c is None or total_in > b + c:
            b, c = account.balance, account.charged  # money came in: count afresh
        baseline = {"balance": format_amount(b), "charged": format_amount(c)}
        if b > 0:
            candidates.append((account.charged - c, b))
        if account.limit:
            candidates.append((spent, account.limit))
    if not candidates:
        return Thresholds(alerted, baseline)
    used, base = max(candidates, key=lambda ub: (ub[0] * 100 // ub[1]) if ub[1] > 0 else 0)
    reached = max((t for t in thresholds if used * 100 >= t * base), default=0)
    if reached > alerted:
        return Thresholds(reached, baseline, crossed=reached, used=used, base=base)
    return Thresholds(min(alerted, reached), baseline, used=used, base=base)


def threshold_message(budget: CustomerBudget, account: Account, t: Thresholds) -> str:
    currency = budget.spec.currency
    percent = t.used * 100 // t.base if t.base else 0
    who = f"CustomerBudget {budget.ref} (customer {budget.spec.customer_id})"
    if account.mode == Mode.capped or (account.limit and t.base == account.limit):
        return (
            f"{who} crossed {t.crossed}% of its spend cap: {format_amount(t.used)} of"
            f" {format_amount(t.base)} {currency} spent this {account.period} ({percent}%)"
        )
    return (
        f"{who} crossed {t.crossed}% of its balance: {format_amount(t.used)} of"
        f" {format_amount(t.base)} {currency} used since the last top-up ({percent}%),"
        f" {format_amount(account.balance)} {currency} left"
    )


# --------------------------------------------------------------------------- status


def transition_events(
    old_status: Mapping[str, Any], status: Mapping[str, Any], *, configured_message: str | None
) -> list[EventSpec]:
    """Events for changes of the Ready condition and of the state."""
    events = ready_events(old_status, status, configured_message=configured_message)
    old_state, new_state = old_status.get("state"), status.get("state")
    if new_state is not None and new_state != old_state:
        why = "; ".join(status.get("stateReasons") or [])
        arrow = f"{old_state} → {new_state}" if old_state else f"{new_state}"
        kind: Literal["Normal", "Warning"] = (
            "Warning" if BudgetState(new_state) in ATTENTION_STATES else "Normal"
        )
        events.append(
            EventSpec(kind, "StateChanged", f"state {arrow}" + (f": {why}" if why else ""))
        )
    return events


def _state_alert(budget: CustomerBudget, old_state: Any, status: Mapping[str, Any]) -> Alert | None:
    new_state = status.get("state")
    if new_state == old_state or new_state is None or old_state is None:
        return None  # no change, or the first observation of a new budget
    if BudgetState.misconfigured.value in (new_state, old_state):
        return None  # configuration problems are Events and conditions, not money alerts
    why = "; ".join(status.get("stateReasons") or [])
    warning = BudgetState(new_state) in ATTENTION_STATES
    return Alert(
        kind="StateChanged",
        budget=budget.ref,
        customer_id=budget.spec.customer_id,
        severity="warning" if warning else "info",
        message=(
            f"CustomerBudget {budget.ref} (customer {budget.spec.customer_id}) is now {new_state}"
            f" (was {old_state})" + (f": {why}" if why else "")
        ),
        fields={
            "state": new_state,
            "previousState": old_state,
            "reasons": list(status.get("stateReasons") or []),
            "balance": status.get("balance"),
            "available": status.get("available"),
            "spentThisPeriod": status.get("spentThisPeriod"),
            "currency": budget.spec.currency,
        },
    )


def fill_account_status(
    budget: CustomerBudget,
    account: Account,
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    now: datetime,
) -> tuple[list[EventSpec], list[Alert]]:
    """Fill the account fields, state, Funded/Suspended, thresholds and soft limits into
    ``status``."""
    now_ms = _ms(now)
    generation = budget.metadata.generation
    state, reasons = budget_state(account, now_ms)
    status.update(account_fields(account, now_ms))
    status["customerId"] = budget.spec.customer_id
    status["state"] = state.value
    status["stateReasons"] = reasons
    status["conditions"] = cond.set_conditions(
        status.get("conditions"), account_conditions(account, state, reasons, generation, now)
    )
    thresholds = evaluate_thresholds(budget, account, old_status, now_ms)
    status["alertedThreshold"] = thresholds.alerted
    status["alertBaseline"] = thresholds.baseline
    events: list[EventSpec] = []
    alerts: list[Alert] = []
    if thresholds.crossed is not None:
        message = threshold_message(budget, account, thresholds)
        events.append(EventSpec("Warning", "ThresholdCrossed", message))
        alerts.append(
            Alert(
                kind="ThresholdCrossed",
                budget=budget.ref,
                customer_id=budget.spec.customer_id,
                message=message,
                fields={
                    "threshold": thresholds.crossed,
                    "used": format_amount(thresholds.used),
                    "of": format_amount(thresholds.base),
                    "balance": status["balance"],
                    "available": status["available"],
                    "spentThisPeriod": status["spentThisPeriod"],
                    "currency": budget.spec.currency,
                    "state": state.value,
                },
            )
        )
    soft_limits = evaluate_soft_limits(budget, account, old_status, now_ms)
    status[SOFT_LIMITS_FIELD] = soft_limits.reached
    soft_events, soft_alerts = soft_limit_changes(budget, account, soft_limits, status)
    events += soft_events
    alerts += soft_alerts
    alert = _state_alert(budget, old_status.get("state"), status)
    if alert is not None:
        alerts.append(alert)
    return events, alerts


def clear_account_status(status: dict[str, Any]) -> None:
    """No account in ``status``: the budget does not own its customer."""
    for name in ACCOUNT_FIELDS:
        status[name] = None
    status["alertBaseline"] = None
    status["alertedThreshold"] = None
    status[SOFT_LIMITS_FIELD] = None
    status["activeKeys"] = None
    status["conditions"] = [
        c
        for c in status.get("conditions") or []
        if c.get("type") not in (FUNDED, SUSPENDED, "LedgerConsistent")
    ]


def _micros(text: Any) -> int | None:
    if not isinstance(text, str | int):
        return None
    try:
        return parse_amount(text, allow_negative=True)
    except AmountError:
        return None


def _ms_to_iso(ms: int) -> str:
    return cond.now_iso(datetime.fromtimestamp(ms / 1000, UTC))


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


__all__ = [
    "ACCOUNT_FIELDS",
    "PAYMENT_METHOD_SOURCE",
    "Thresholds",
    "account_conditions",
    "account_fields",
    "budget_state",
    "clear_account_status",
    "evaluate_thresholds",
    "fill_account_status",
    "threshold_message",
    "transition_events",
]
