"""spendgate.operator.kube.conditions: metav1.Condition bookkeeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from spendgate.operator.kube import conditions as cond

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_make_condition_shape() -> None:
    c = cond.make_condition("Ready", "True", "Configured", "all good", generation=3, now=T0)
    assert c == {
        "type": "Ready",
        "status": "True",
        "reason": "Configured",
        "message": "all good",
        "lastTransitionTime": "2025-03-01T12:00:00Z",
        "observedGeneration": 3,
    }
    assert "observedGeneration" not in cond.make_condition("Ready", "True", "X", now=T0)


@pytest.mark.parametrize("reason", ["", "not camel", "Has-Dash", "1Digit", "Trailing:"])
def test_reason_must_be_camel_case(reason: str) -> None:
    with pytest.raises(ValueError, match="reason"):
        cond.make_condition("Ready", "False", reason)


def test_status_must_be_valid() -> None:
    with pytest.raises(ValueError, match="status"):
        cond.make_condition("Ready", "Maybe", "X")  # type: ignore[arg-type]


def test_long_messages_are_cut_to_the_api_limit() -> None:
    c = cond.make_condition("Ready", "False", "X", "x" * 40_000)
    assert len(c["message"]) == cond.MAX_MESSAGE


def test_same_status_keeps_the_transition_time() -> None:
    old = [cond.make_condition("Ready", "False", "SecretMissing", "a", now=T0)]
    new = cond.set_condition(old, cond.make_condition("Ready", "False", "InvalidSpec", "b", now=T1))
    assert new[0]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert new[0]["reason"] == "InvalidSpec" and new[0]["message"] == "b"


def test_status_change_moves_the_transition_time() -> None:
    old = [cond.make_condition("Ready", "False", "SecretMissing", now=T0)]
    new = cond.set_condition(old, cond.make_condition("Ready", "True", "Configured", now=T1))
    assert new[0]["lastTransitionTime"] == "2025-03-01T12:05:00Z"


def test_one_condition_per_type_order_kept_new_types_appended() -> None:
    conditions = cond.set_conditions(
        None,
        [
            cond.make_condition("Ready", "True", "A", now=T0),
            cond.make_condition("Funded", "True", "B", now=T0),
        ],
    )
    conditions = cond.set_conditions(
        conditions,
        [
            cond.make_condition("Funded", "False", "C", now=T1),
            cond.make_condition("Suspended", "False", "D", now=T1),
        ],
    )
    assert [c["type"] for c in conditions] == ["Ready", "Funded", "Suspended"]
    assert cond.status_of(conditions, "Funded") == "False"
    assert cond.is_true(conditions, "Ready")
    assert not cond.is_true(conditions, "Missing")
    assert cond.find(conditions, "Missing") is None


def test_set_condition_does_not_mutate_its_input() -> None:
    old = [cond.make_condition("Ready", "True", "A", now=T0)]
    snapshot = [dict(c) for c in old]
    cond.set_condition(old, cond.make_condition("Ready", "False", "B", now=T1))
    assert old == snapshot


def test_transitioned() -> None:
    old = [cond.make_condition("Ready", "False", "SecretMissing", "one", now=T0)]
    same = cond.make_condition("Ready", "False", "SecretMissing", "other message", now=T1)
    assert not cond.transitioned(old, same)
    assert cond.transitioned(old, cond.make_condition("Ready", "False", "InvalidSpec"))
    assert cond.transitioned(old, cond.make_condition("Ready", "True", "SecretMissing"))
    assert cond.transitioned([], same)


def test_now_iso_is_utc() -> None:
    local = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=1)))
    assert cond.now_iso(local) == "2025-03-01T13:00:00Z"
