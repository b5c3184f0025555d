"""A customer's account as people and programs read it: state, balance, held, spent, limit."""

from __future__ import annotations

from typing import Any

from ..ledger import Account
from ..models import BudgetState, Mode
from ..money import format_amount
from ..periods import current_period


def balance_view(account: Account, now_ms: int) -> dict[str, Any]:
    """The account at ``now_ms``, amounts as exact decimal strings (``spendgate balance`` and
    the sidecar's ``GET /v1/spendgate/balance``)."""
    account = current_period(account, now_ms)
    reasons = [f"{source}: {reason}" for source, reason in sorted(account.suspensions.items())]
    if reasons:
        state = BudgetState.suspended
    elif account.available <= 0:
        state = BudgetState.exhausted
        noun = "spend cap" if account.mode == Mode.capped or account.limit else "balance"
        reasons = [f"no {noun} available"]
    else:
        state = BudgetState.active
    report: dict[str, Any] = {
        "customerId": account.customer_id,
        "state": state.value,
        "reasons": reasons,
        "currency": account.currency,
        "mode": account.mode,
        "balance": format_amount(account.balance),
        "held": format_amount(account.held),
        "available": format_amount(account.available),
        "spentThisPeriod": format_amount(account.spent),
        "ownSpentThisPeriod": format_amount(account.own_spent),
    }
    if account.limit:
        report["limit"] = format_amount(account.limit)
        report["period"] = account.period
    return report
