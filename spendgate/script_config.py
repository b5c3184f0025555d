"""The ``cfg`` hash the ledger scripts read (spendgate/lua), built from a CustomerBudget spec."""

from __future__ import annotations

import json
from typing import Any

from .models import CustomerBudgetSpec, RateLimit
from .soft_limits import script_entries

THROTTLE_SCOPE = "s"  # ids of a throttle soft limit's rate limits: s<index>:...


def is_throttle_limit(limit_id: str | None) -> bool:
    """Whether a rate limit id (a refusal's ``limit_id``) is a throttle soft limit's."""
    return (limit_id or "").startswith(THROTTLE_SCOPE)


def _rate_limit_entries(limits: list[RateLimit], scope: str) -> list[dict[str, Any]]:
    entries = []
    for limit in limits:
        burst = limit.burst if limit.burst is not None else limit.amount
        if limit.kind == "cost" and limit.burst is not None:
            burst = limit.amount * limit.burst // 100  # cost bursts are a percentage
        entries.append(
            {
                # The id encodes the limit itself, so changing a limit starts it afresh.
                "id": f"{scope}:{limit.kind}:{limit.amount}:{limit.per.value}:{burst}",
                "kind": limit.kind,
                "amount": limit.amount,
                "window_ms": limit.per.milliseconds,
                "burst": burst,
            }
        )
    return entries


def budget_config(spec: CustomerBudgetSpec) -> dict[str, str]:
    """The ``cfg`` hash the scripts read, built from a CustomerBudget spec."""
    config = {
        "currency": spec.currency,
        "mode": spec.mode.value,
        "limit": str(spec.limit or 0),
        "period": spec.period.value if spec.period else "",
        "max_cost": str(spec.policy.max_request_cost or 0),
        "rl": json.dumps(_rate_limit_entries(spec.rate_limits, "c")),
    }
    soft = [
        {**trigger, "rl": _rate_limit_entries(limit.rate_limits or [], f"{THROTTLE_SCOPE}{index}")}
        for index, (limit, trigger) in enumerate(script_entries(spec))
    ]
    if soft:
        config["soft"] = json.dumps(soft)
    for key in spec.api_keys:
        if key.rate_limits:
            config[f"krl:{key.name}"] = json.dumps(
                _rate_limit_entries(key.rate_limits, f"k:{key.name}")
            )
        if key.limit is not None and key.period is not None:
            config[f"kcap:{key.name}"] = f"{key.limit}|{key.period.value}"
    return config
