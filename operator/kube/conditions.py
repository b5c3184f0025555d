"""``metav1.Condition`` helpers: one condition per type, transitions timestamped.

Conditions are plain dicts in the camelCase shape Kubernetes stores
(``type``, ``status``, ``reason``, ``message``, ``lastTransitionTime``, ``observedGeneration``).
``lastTransitionTime`` changes only when ``status`` does, as the API conventions ask: a new
reason or message with the same status keeps the old timestamp.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
Condition = dict[str, Any]

READY = "Ready"  # the one condition type every spendgate object reports
INVALID_SPEC = "InvalidSpec"  # the Ready=False reason of a spec that does not validate
MAX_MESSAGE = 32_768  # metav1.Condition.message maxLength
_REASON_RE = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def now_iso(now: datetime | None = None) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes ``metav1.Time``."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_condition(
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: datetime | None = None,
) -> Condition:
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
    if not _REASON_RE.match(reason):
        raise ValueError(f"condition reason {reason!r} is not CamelCase (metav1.Condition)")
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    condition: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso(now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def status_of(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> str | None:
    condition = find(conditions, type_)
    return None if condition is None else condition.get("status")


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    return status_of(conditions, type_) == "True"


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None, new: Condition
) -> list[Condition]:
    """A copy of ``conditions`` with ``new`` in place of the condition of its type.

    The position of an existing type is kept (a stable list for ``kubectl get -o yaml``); a new
    type is appended. If the status did not change, the old ``lastTransitionTime`` is kept.
    """
    result: list[Condition] = []
    replaced = False
    for old in conditions or ():
        if old.get("type") != new["type"]:
            result.append(dict(old))
            continue
        merged = dict(new)
        if old.get("status") == new["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        result.append(merged)
        replaced = True
    if not replaced:
        result.append(dict(new))
    return result


def set_conditions(
    conditions: Sequence[Mapping[str, Any]] | None, new: Iterable[Condition]
) -> list[Condition]:
    result = [dict(c) for c in conditions or ()]
    for condition in new:
        result = set_condition(result, condition)
    return result


def transitioned(old: Iterable[Mapping[str, Any]] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` differs from the condition of its type in ``old`` in status or reason."""
    previous = find(old, new["type"])
    return previous is None or (
        previous.get("status"),
        previous.get("reason"),
    ) != (new["status"], new["reason"])


__all__ = [
    "INVALID_SPEC",
    "READY",
    "Condition",
    "ConditionStatus",
    "find",
    "is_true",
    "make_condition",
    "now_iso",
    "set_condition",
    "set_conditions",
    "status_of",
    "transitioned",
]
