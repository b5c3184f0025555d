"""Stripe decision logic without HTTP or Redis: amounts, the event state machine, templates."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from spendgate.operator.stripe.actions import (
    Adjust,
    CheckPaymentMethods,
    Fund,
    Notify,
    RefundTopup,
    ReverseGrant,
    SetAccess,
)
from spendgate.operator.stripe.apply import remaining_from_summary
from spendgate.operator.stripe.client import idempotency_key, is_permanent_rejection, is_retryable
from spendgate.operator.stripe.currency import (
    currency_matches,
    micros_to_minor_ceil,
    minor_to_micros,
)
from spendgate.operator.stripe.links import Link
from spendgate.operator.stripe.mapping import actions_for_event, event_stripe_customer
from spendgate.operator.stripe.reconcile import invoice_state, pick_subscription
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.sync import TemplateError, budget_from_customer, kubernetes_name
from spendgate.operator.stripe.thresholds import threshold_amount
from tests.support.stripe_fakes import make_event, paid_topup_session

SETTINGS = StripeSettings()
LINK = Link("acme", "cus_ACME", "USD")


def grant(value: int = 2500, currency: str = "usd", **extra: Any) -> dict[str, Any]:
    return {
        "id": "credgr_1",
        "object": "billing.credit_grant",
        "customer": "cus_ACME",
        "amount": {"type": "monetary", "monetary": {"currency": currency, "value": value}},
        "voided_at": None,
        "expires_at": None,
        **extra,
    }


def acts(kind: str, obj: dict[str, Any], link: Link = LINK, created: int = 1000, **kw: Any) -> Any:
    return actions_for_event(make_event(kind, obj, created=created, **kw), link, SETTINGS)


def test_minor_units_to_micro_units() -> None:
    assert minor_to_micros(1250, "usd") == 12_500_000
    assert minor_to_micros(500, "JPY") == 500_000_000  # zero-decimal
    assert minor_to_micros(1234, "kwd") == 1_234_000  # three decimals
    assert micros_to_minor_ceil(1, "usd") == 1  # a fraction of a cent bills a cent
    assert micros_to_minor_ceil(20_000, "usd") == 2
    with pytest.raises(ValueError):
        minor_to_micros(1.5, "usd")  # type: ignore[arg-type]
    assert currency_matches("usd", "USD")
    assert not currency_matches("eur", "USD")
    assert not currency_matches("usd", "credits")


def test_credit_grant_funds_once_by_grant_id_and_checks_currency() -> None:
    assert acts("billing.credit_grant.created", grant()) == [
        Fund("credgr_1", 25_000_000, "stripe credit grant: credit grant")
    ]
    updated = acts("billing.credit_grant.updated", grant())
    assert [type(a) for a in updated] == [Fund] and updated[0].funding_id == "credgr_1"
    wrong = acts("billing.credit_grant.created", grant(currency="eur"))
    assert [type(a) for a in wrong] == [Notify] and wrong[0].reason == "StripeCurrencyMismatch"
    custom = grant()
    custom["amount"] = {"type": "custom_pricing_unit", "custom_pricing_unit": {"value": "5"}}
    assert [a.reason for a in acts("billing.credit_grant.created", custom)] == [
        "StripeGrantUnsupported"
    ]
    # Not yet effective: nothing now (reconciliation funds it later).
    assert acts("billing.credit_grant.created", grant(effective_at=5000), created=1000) == []


def test_voided_or_expired_grant_reverses_what_is_left() -> None:
    voided = acts("billing.credit_grant.updated", grant(voided_at=999))
    assert voided == [ReverseGrant("credgr_1", 25_000_000, None, "voided")]
    expired = acts("billing.credit_grant.updated", grant(expires_at=900), created=1000)
    assert expired == [ReverseGrant("credgr_1", 25_000_000, None, "expired")]
    known = acts("billing.credit_grant.updated", grant(voided_at=999, _spendgate_remaining=7))
    assert known[0].remaining == 7
    summary = {
        "balances": [
            {
                "available_balance": {
                    "type": "monetary",
                    "monetary": {"currency": "usd", "value": 300},
                }
            }
        ]
    }
    assert remaining_from_summary(summary, "USD") == 3_000_000
    assert remaining_from_summary({"balances": []}, "USD") is None


def test_topups_fund_by_payment_intent_from_either_event() -> None:
    session = paid_topup_session()
    pi = {
        "id": "pi_1",
        "object": "payment_intent",
        "customer": "cus_ACME",
        "amount": 1000,
        "amount_received": 1000,
        "currency": "usd",
        "metadata": {"spendgate_topup": "true"},
    }
    a = acts("checkout.session.completed", session)
    b = acts("payment_intent.succeeded", pi)
    assert [x.funding_id for x in a] == [x.funding_id for x in b] == ["pi_1"]  # one funding id
    assert a[0].amount == b[0].amount == 10_000_000
    assert acts("checkout.session.completed", {**session, "payment_status": "unpaid"}) == []
    # Invoice payments are payment intents too: without the top-up marker, nothing.
    assert acts("payment_intent.succeeded", {**pi, "metadata": {}}) == []


def test_refunds_and_disputes_take_money_back_only_from_funded_topups() -> None:
    charge = {
        "id": "ch_1",
        "object": "charge",
        "customer": "cus_ACME",
        "payment_intent": "pi_1",
        "amount_refunded": 400,
        "currency": "usd",
    }
    assert acts("charge.refunded", charge) == [RefundTopup("ch_1", "pi_1", 4_000_000)]
    dispute = {
        "id": "du_1",
        "object": "dispute",
        "charge": "ch_1",
        "payment_intent": "pi_1",
        "amount": 1000,
        "currency": "usd",
        "reason": "fraudulent",
    }
    created = acts("charge.dispute.created", {**dispute, "customer": "cus_ACME"}, created=7)
    assert created[0] == Adjust("du_1", -10_000_000, "stripe dispute du_1", "pi_1")
    assert isinstance(created[1], SetAccess) and created[1].source == "dispute"
    assert created[1].suspend and created[1].created == 7
    lenient = Link("acme", "cus_ACME", "USD", suspend_on_dispute=False)
    assert [type(a) for a in acts("charge.dispute.created", dispute, link=lenient)] == [
        Adjust,
        Notify,
    ]
    won = acts("charge.dispute.closed", {**dispute, "status": "won"})
    assert won[0] == Adjust("du_1.won", 10_000_000, "stripe dispute won", "du_1")
    assert won[1] == SetAccess("dispute", False, "dispute du_1 won", 1000)


@pytest.mark.parametrize(
    ("policy", "grace_ms", "expected"),
    [
        ("suspend", 0, [SetAccess]),
        ("grace", 3_600_000, [SetAccess]),
        ("alert", 0, [Notify]),
    ],
)
def test_payment_failure_by_policy(policy: str, grace_ms: int, expected: list[type]) -> None:
    link = Link("acme", "cus_ACME", "USD", on_payment_failure=policy, grace_ms=grace_ms)
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_ACME", "status": "open"}
    actions = acts("invoice.payment_failed", invoice, link=link, created=50)
    assert [type(a) for a in actions] == expected
    if policy != "alert":
        assert actions[0].source == "payment" and actions[0].suspend
        assert actions[0].grace_ms == grace_ms and actions[0].created == 50
    paid = acts("invoice.paid", {**invoice, "status": "paid"}, link=link, created=60)
    assert paid == [SetAccess("payment", False, "invoice in_1 settled", 60)]


def test_subscription_status_maps_to_the_subscription_source() -> None:
    def sub(status: str, sid: str = "sub_1") -> dict[str, Any]:
        return {"id": sid, "object": "subscription", "customer": "cus_ACME", "status": status}

    for status in ("unpaid", "canceled", "paused", "incomplete_expired"):
        (action,) = acts("customer.subscription.updated", sub(status))
        assert action.source == "subscription" and action.suspend, status
    for status in ("active", "trialing"):
        (action,) = acts("customer.subscription.resumed", sub(status))
        assert action.source == "subscription" and not action.suspend
    assert acts("customer.subscription.updated", sub("incomplete")) == []
    (past_due,) = acts("customer.subscription.updated", sub("past_due"))
    assert past_due.suspend  # past_due follows the payment-failure policy (suspend)
    pinned = Link("acme", "cus_ACME", "USD", subscription="sub_1")
    assert acts("customer.subscription.deleted", sub("canceled", "sub_2"), link=pinned) == []


def test_customer_deleted_and_payment_methods() -> None:
    (deleted,) = acts("customer.deleted", {"id": "cus_ACME", "object": "customer"})
    assert deleted.source == "stripe-deleted" and deleted.suspend
    strict = Link("acme", "cus_ACME", "USD", require_payment_method=True)
    pm = {"id": "pm_1", "object": "payment_method", "customer": "cus_ACME"}
    (attached,) = acts("payment_method.attached", pm, link=strict)
    assert attached.source == "payment-method" and not attached.suspend
    detached_event = make_event(
        "payment_method.detached", {**pm, "customer": None}, previous={"customer": "cus_ACME"}
    )
    assert event_stripe_customer(detached_event) == "cus_ACME"
    assert actions_for_event(detached_event, strict, SETTINGS) == [
        CheckPaymentMethods(detached_event["created"])
    ]
    assert acts("payment_method.attached", pm) == []  # not required: not tracked


def test_reconciliation_reads_invoices_and_subscriptions() -> None:
    assert invoice_state({"status": "paid"}) == "paid"
    assert invoice_state({"status": "void"}) == "paid"
    failed = {"status": "open", "attempted": True, "attempt_count": 1, "amount_remaining": 100}
    assert invoice_state(failed) == "failed"
    assert invoice_state({"status": "open", "attempted": False, "amount_remaining": 100}) is None
    assert invoice_state({"status": "draft"}) is None
    subs = [
        {"id": "sub_old", "status": "canceled", "created": 1},
        {"id": "sub_live", "status": "active", "created": 0},
        {"id": "sub_new", "status": "past_due", "created": 5},
    ]
    assert pick_subscription(subs)["id"] == "sub_live"
    assert pick_subscription([subs[0], subs[2]])["id"] == "sub_new"
    assert pick_subscription([]) is None


def test_billing_threshold_is_the_cap_in_minor_units() -> None:
    capped = Link("acme", "cus_ACME", "USD", subscription="sub_1", mode="capped", limit=50_005_000)
    assert threshold_amount(capped) == 5000  # rounded down: Stripe invoices at or before the cap
    assert threshold_amount(Link("acme", "cus_ACME", "USD", limit=5)) is None  # prepaid
    assert threshold_amount(Link("a", "cus_A", "credits", mode="capped", limit=10**9)) is None


def test_retry_classification_and_idempotency_keys() -> None:
    import stripe

    assert is_retryable(stripe.RateLimitError("slow down", http_status=429))
    assert is_retryable(stripe.APIError("boom", http_status=500))
    assert is_retryable(stripe.APIConnectionError("reset"))
    bad = stripe.InvalidRequestError("bad", param="x", http_status=400)
    assert not is_retryable(bad) and is_permanent_rejection(bad)
    assert not is_permanent_rejection(stripe.RateLimitError("slow down", http_status=429))
    assert idempotency_key("meter", "acme", "r1") == idempotency_key("meter", "acme", "r1")
    assert idempotency_key("meter", "acme", "r1") != idempotency_key("meter", "acme", "r2")
    assert len(idempotency_key("x" * 300)) <= 255


TEMPLATE: dict[str, Any] = {
    "metadata": {"name": "${name}", "namespace": "billing"},
    "spec": {
        "customerId": "${customerId}",
        "displayName": "${customer.name}",
        "currency": "USD",
        "balance": "0",
        "policy": {"requirePaymentMethod": True},
        "rateLimits": [{"requests": 10, "per": "second"}],
    },
}


def test_budget_from_customer_template() -> None:
    customer = {
        "id": "cus_AbC123",
        "object": "customer",
        "name": "Acme Inc",
        "email": "ops@acme.test",
        "metadata": {"spendgate": "true", "spendgate_customer_id": "acme"},
    }
    manifest = budget_from_customer(copy.deepcopy(TEMPLATE), customer)
    assert manifest["kind"] == "CustomerBudget"
    assert manifest["spec"]["customerId"] == "acme"
    assert manifest["spec"]["displayName"] == "Acme Inc"
    assert manifest["spec"]["stripe"] == {"customerId": "cus_AbC123"}
    assert manifest["metadata"]["name"] == kubernetes_name("cus_AbC123")
    assert manifest["metadata"]["labels"]["spendgate.dev/imported-from"] == "stripe"
    assert kubernetes_name("cus_AbC123") != kubernetes_name("cus_abc123")
    # Without the metadata id, the Stripe id names the customer.
    plain = budget_from_customer(TEMPLATE, {**customer, "metadata": {}})
    assert plain["spec"]["customerId"] == "cus_AbC123"
    with pytest.raises(TemplateError, match=r"customer\.name"):
        budget_from_customer(TEMPLATE, {"id": "cus_X", "metadata": {}})
    broken = copy.deepcopy(TEMPLATE)
    broken["spec"]["mode"] = "capped"  # needs limit and period
    with pytest.raises(TemplateError, match="capped"):
        budget_from_customer(broken, customer)


def test_an_imported_budget_is_a_root() -> None:
    """A Stripe customer maps to a tree's root: a template naming a parent imports nothing."""
    customer = {"id": "cus_AbC123", "name": "Acme Inc", "metadata": {}}
    assert "parent" not in budget_from_customer(TEMPLATE, customer)["spec"]
    child = copy.deepcopy(TEMPLATE)
    child["spec"]["parent"] = "initech"
    with pytest.raises(TemplateError, match="stripe links a root budget"):
        budget_from_customer(child, customer)
