"""The Redis ledger (spendgate.ledger + spendgate/lua) against real Redis: single and Cluster.

Every test here takes ``ledger``, which is parametrized over a single Redis and the 3-master
Redis Cluster (``ledger_redis``), and an injected clock so windows, deadlines and periods can be
stepped to the millisecond. Concurrency tests live in ``test_ledger_concurrency.py``.
"""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import redis.asyncio.cluster
from redis.crc import key_slot

from spendgate.keys import for_customer
from spendgate.ledger import Ledger, LedgerError, Outcome, Usage
from spendgate.models import CustomerBudgetSpec
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000  # micro-units per currency unit
CUSTOMER = "acme"
TTL = 60_000


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """UTC wall time as milliseconds since the epoch (integers only)."""
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) * 1000


T0 = ms(2024, 3, 13, 12)  # a Wednesday, mid-month, mid-day


class Clock:
    """The ledger's injected clock (replaces Redis TIME); tests move it by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, delta_ms: int) -> int:
        self.now += delta_ms
        return self.now


def spec(customer_id: str = CUSTOMER, **fields: Any) -> CustomerBudgetSpec:
    """A CustomerBudget spec from camelCase fields, like a manifest's ``spec``."""
    body: dict[str, Any] = {"customerId": customer_id, "currency": "USD", **fields}
    return CustomerBudgetSpec.model_validate(body)


def key(name: str, *rate_limits: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "secretRef": {"name": f"{name}-secret"}, "rateLimits": list(rate_limits)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def ledger(
    ledger_redis: Any, ledger_redis_target: RedisTarget, clock: Clock
) -> AsyncIterator[Ledger]:
    channel = ledger_redis_target.script_channel()
    ledger = Ledger(ledger_redis, clock=clock, channel=channel)
    await ledger.load_scripts()
    yield ledger
    if channel is not None:
        await channel.close()


async def reserve(
    ledger: Ledger,
    request_id: str,
    amount: int,
    *,
    customer: str = CUSTOMER,
    key_id: str = "default",
    currency: str = "USD",
    ttl_ms: int = TTL,
):
    return await ledger.reserve(
        customer, request_id, amount, key_id=key_id, currency=currency, ttl_ms=ttl_ms
    )


async def usage_entries(ledger: Ledger, customer: str = CUSTOMER) -> list[dict[str, str]]:
    return [e for e in await ledger.ledger_entries(customer, 1000) if e["type"] == "usage"]


# --------------------------------------------------------------------------- configure


async def test_opening_balance_applied_once(ledger: Ledger) -> None:
    assert await ledger.configure(spec(balance="10.00")) == 10 * UNIT
    assert await ledger.configure(spec(balance="10.00")) == 0  # same spec: no-op
    assert await ledger.configure(spec(balance="10.00", displayName="Acme")) == 0
    account = await ledger.account(CUSTOMER)
    assert account.configured
    assert (account.balance, account.held, account.currency, account.mode) == (
        10 * UNIT,
        0,
        "USD",
        "prepaid",
    )
    entries = await ledger.ledger_entries(CUSTOMER)
    assert len(entries) == 1
    assert entries[0]["type"] == "adjust"
    assert entries[0]["amount"] == str(10 * UNIT)
    assert entries[0]["source"] == "spec"


async def test_reapplying_spec_keeps_spending_and_funding(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", 3 * UNIT)
    await ledger.settle(CUSTOMER, "r1", 3 * UNIT)
    await ledger.fund(CUSTOMER, "topup-1", 5 * UNIT)
    assert await ledger.configure(spec(balance="10")) == 0
    assert (await ledger.account(CUSTOMER)).balance == 12 * UNIT


async def test_changing_spec_balance_applies_difference(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", 3 * UNIT)
    await ledger.settle(CUSTOMER, "r1", 3 * UNIT)
    assert await ledger.configure(spec(balance="15")) == 5 * UNIT
    assert (await ledger.account(CUSTOMER)).balance == 12 * UNIT
    assert await ledger.configure(spec(balance="12.5")) == -2_500_000
    assert (await ledger.account(CUSTOMER)).balance == 9_500_000
    # Dropping the balance from the spec takes nothing back; putting the same one back is a no-op.
    assert await ledger.configure(spec()) == 0
    assert await ledger.configure(spec(balance="12.5")) == 0
    assert (await ledger.account(CUSTOMER)).balance == 9_500_000
    adjusts = [e for e in await ledger.ledger_entries(CUSTOMER) if e["type"] == "adjust"]
    assert [int(e["amount"]) for e in adjusts] == [10 * UNIT, 5 * UNIT, -2_500_000]
    assert [int(e["balance"]) for e in adjusts] == [10 * UNIT, 12 * UNIT, 9_500_000]


async def test_spec_suspension_sets_and_clears(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10", policy={"suspended": True}))
    account = await ledger.account(CUSTOMER)
    assert "spec" in account.suspensions
    refused = await reserve(ledger, "r1", UNIT)
    assert refused.outcome is Outcome.suspended
    assert refused.detail.startswith("spec: ")
    assert (await ledger.account(CUSTOMER)).held == 0

    await ledger.configure(spec(balance="10"))
    assert (await ledger.account(CUSTOMER)).suspensions == {}
    assert (await reserve(ledger, "r2", UNIT)).ok


async def test_spec_unsuspend_keeps_other_suspensions(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10", policy={"suspended": True}))
    await ledger.suspend(CUSTOMER, "stripe", "invoice payment failed")
    await ledger.configure(spec(balance="10"))
    assert (await ledger.account(CUSTOMER)).suspensions == {"stripe": "invoice payment failed"}
    refused = await reserve(ledger, "r1", UNIT)
    assert refused.outcome is Outcome.suspended
    assert refused.detail == "stripe: invoice payment failed"


# --------------------------------------------------------------------------- reserve


async def test_insufficient_balance_holds_nothing(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="1.00"))
    refused = await reserve(ledger, "r1", UNIT + 1)
    assert refused.outcome is Outcome.insufficient
    assert not refused.ok
    assert refused.available == UNIT
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held) == (UNIT, 0)
    assert await ledger.holds(CUSTOMER) == {}
    # Exactly the available amount is fine, and then nothing is left.
    ok = await reserve(ledger, "r2", UNIT)
    assert ok.ok and ok.available == 0
    assert (await reserve(ledger, "r3", 1)).outcome is Outcome.insufficient
    assert await ledger.holds(CUSTOMER) == {"r2": UNIT}


async def test_reserve_holds_and_reports(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    reservation = await reserve(ledger, "r1", 2 * UNIT, ttl_ms=30_000)
    assert reservation.ok
    assert reservation.outcome is Outcome.reserved
    assert reservation.available == 8 * UNIT
    assert reservation.deadline_ms == clock.now + 30_000
    assert reservation.rate is None  # no rate limits configured
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held, account.available) == (10 * UNIT, 2 * UNIT, 8 * UNIT)
    assert await ledger.holds(CUSTOMER) == {"r1": 2 * UNIT}


async def test_zero_balance_refuses_all_but_free_requests(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="0"))
    assert (await reserve(ledger, "r1", 1)).outcome is Outcome.insufficient
    assert (await reserve(ledger, "free", 0)).ok  # a free request holds nothing


async def test_capped_mode_cap_reached(ledger: Ledger) -> None:
    await ledger.configure(spec(mode="capped", limit="5.00", period="day"))
    assert (await reserve(ledger, "r1", 3 * UNIT)).ok
    refused = await reserve(ledger, "r2", 3 * UNIT)
    assert refused.outcome is Outcome.cap_reached
    assert refused.available == 2 * UNIT
    await ledger.settle(CUSTOMER, "r1", 3 * UNIT)
    account = await ledger.account(CUSTOMER)
    assert (account.spent, account.held, account.available) == (3 * UNIT, 0, 2 * UNIT)
    assert account.balance == -3 * UNIT  # post-paid: balance just records what is owed
    assert (await reserve(ledger, "r3", 2 * UNIT)).ok
    assert (await reserve(ledger, "r4", 1)).outcome is Outcome.cap_reached


async def test_prepaid_with_spend_cap(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", limit="5", period="day"))
    refused = await reserve(ledger, "r1", 6 * UNIT)
    assert refused.outcome is Outcome.cap_reached  # money is there, the cap is not
    assert refused.available == 5 * UNIT
    assert (await reserve(ledger, "r2", 4 * UNIT)).ok
    await ledger.settle(CUSTOMER, "r2", 4 * UNIT)
    assert (await reserve(ledger, "r3", UNIT + 1)).outcome is Outcome.cap_reached
    assert (await reserve(ledger, "r4", UNIT)).ok
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.spent, account.held) == (96 * UNIT, 4 * UNIT, UNIT)
    assert account.available == 0


async def test_prepaid_with_cap_still_needs_balance(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="2", limit="5", period="day"))
    assert (await reserve(ledger, "r1", 3 * UNIT)).outcome is Outcome.insufficient


async def test_per_request_cost_cap(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", policy={"maxRequestCost": "2.00"}))
    refused = await reserve(ledger, "r1", 2 * UNIT + 1)
    assert refused.outcome is Outcome.cost_cap
    assert (await ledger.account(CUSTOMER)).held == 0
    assert (await reserve(ledger, "r2", 2 * UNIT)).ok


async def test_suspended_with_reason(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await ledger.suspend(CUSTOMER, "stripe", "card declined")
    refused = await reserve(ledger, "r1", UNIT)
    assert refused.outcome is Outcome.suspended
    assert refused.detail == "stripe: card declined"
    assert (await ledger.account(CUSTOMER)).held == 0
    await ledger.unsuspend(CUSTOMER, "stripe")
    assert (await reserve(ledger, "r1", UNIT)).ok  # the refused id was not burnt


async def test_currency_mismatch(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    refused = await reserve(ledger, "r1", UNIT, currency="EUR")
    assert refused.outcome is Outcome.currency_mismatch
    assert refused.detail == "USD"
    assert (await ledger.account(CUSTOMER)).held == 0


async def test_unknown_customer(ledger: Ledger) -> None:
    refused = await reserve(ledger, "r1", UNIT, customer="nobody")
    assert refused.outcome is Outcome.unknown_customer
    account = await ledger.account("nobody")
    assert not account.configured
    assert account.held == 0


@pytest.mark.parametrize("request_id", ["", "has space", "a/b", "x" * 129, "{tag}"])
async def test_invalid_request_ids_refused(ledger: Ledger, request_id: str) -> None:
    await ledger.configure(spec(balance="10"))
    with pytest.raises(LedgerError):
        await reserve(ledger, request_id, 1)
    with pytest.raises(LedgerError):
        await ledger.settle(CUSTOMER, request_id, 1)
    with pytest.raises(LedgerError):
        await ledger.fund(CUSTOMER, request_id, 1)


async def test_invalid_amounts_refused(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    with pytest.raises(LedgerError):
        await reserve(ledger, "r1", -1)
    with pytest.raises(LedgerError):
        await ledger.settle(CUSTOMER, "r1", -1)
    with pytest.raises(LedgerError):
        await ledger.extend(CUSTOMER, "r1", 0, ttl_ms=TTL)
    with pytest.raises(LedgerError):
        await ledger.fund(CUSTOMER, "f1", 0)
    with pytest.raises(LedgerError):
        await ledger.adjust(CUSTOMER, "a1", 0)
    with pytest.raises(ValueError):
        await reserve(ledger, "r1", 1, customer="bad{customer}")
    assert (await ledger.account(CUSTOMER)).balance == 10 * UNIT


# --------------------------------------------------------------------------- idempotency


async def test_replayed_settle_has_one_effect(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", 2 * UNIT)
    first = await ledger.settle(CUSTOMER, "r1", 1_500_000)
    assert not first.duplicate
    assert (first.balance, first.held, first.spent) == (8_500_000, 0, 1_500_000)
    again = await ledger.settle(CUSTOMER, "r1", 1_500_000)
    different = await ledger.settle(CUSTOMER, "r1", 9 * UNIT)  # same id, other cost: still once
    assert again.duplicate and different.duplicate
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.spent, account.charged) == (8_500_000, 1_500_000, 1_500_000)
    assert len(await usage_entries(ledger)) == 1


async def test_replayed_fund_has_one_effect(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="0"))
    first = await ledger.fund(CUSTOMER, "in_123", 5 * UNIT, source="stripe", note="top-up")
    again = await ledger.fund(CUSTOMER, "in_123", 5 * UNIT, source="stripe", note="top-up")
    assert not first.duplicate and again.duplicate
    assert first.balance == again.balance == 5 * UNIT
    assert first.entry_id == again.entry_id
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.funded) == (5 * UNIT, 5 * UNIT)
    funds = [e for e in await ledger.ledger_entries(CUSTOMER) if e["type"] == "fund"]
    assert len(funds) == 1


async def test_replayed_adjust_has_one_effect(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    first = await ledger.adjust(CUSTOMER, "refund-7", -3 * UNIT, note="chargeback")
    again = await ledger.adjust(CUSTOMER, "refund-7", -3 * UNIT, note="chargeback")
    assert not first.duplicate and again.duplicate
    assert first.entry_id == again.entry_id
    assert (await ledger.account(CUSTOMER)).balance == 7 * UNIT
    adjusts = [e for e in await ledger.ledger_entries(CUSTOMER) if e["funding_id"] == "refund-7"]
    assert len(adjusts) == 1
    assert adjusts[0]["amount"] == str(-3 * UNIT)


async def test_reserve_after_settle_is_duplicate(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", UNIT)
    await ledger.settle(CUSTOMER, "r1", UNIT)
    again = await reserve(ledger, "r1", UNIT)
    assert again.outcome is Outcome.duplicate
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held) == (9 * UNIT, 0)
    assert await ledger.holds(CUSTOMER) == {}


async def test_reserve_after_release_is_duplicate(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", UNIT)
    assert await ledger.release(CUSTOMER, "r1") == UNIT
    assert (await reserve(ledger, "r1", UNIT)).outcome is Outcome.duplicate
    assert (await ledger.account(CUSTOMER)).held == 0


async def test_replayed_reserve_returns_existing_hold(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    first = await reserve(ledger, "r1", 4 * UNIT)
    clock.advance(1_000)
    again = await reserve(ledger, "r1", 4 * UNIT)
    assert again.ok
    assert again.deadline_ms == first.deadline_ms  # the same hold, not a new one
    account = await ledger.account(CUSTOMER)
    assert account.held == 4 * UNIT
    assert await ledger.holds(CUSTOMER) == {"r1": 4 * UNIT}
    # Even with a balance that could not pay for a second hold.
    await reserve(ledger, "r2", 6 * UNIT)
    assert (await reserve(ledger, "r1", 4 * UNIT)).ok
    assert (await ledger.account(CUSTOMER)).held == 10 * UNIT


async def test_replayed_release_is_noop(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", UNIT)
    assert await ledger.release(CUSTOMER, "r1") == UNIT
    assert await ledger.release(CUSTOMER, "r1") is None
    assert (await ledger.settle(CUSTOMER, "r1", UNIT)).duplicate  # released is final
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held) == (10 * UNIT, 0)


# --------------------------------------------------------------------------- holds


async def test_expired_hold_released_by_next_reserve(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    held = await reserve(ledger, "crashed", 4 * UNIT, ttl_ms=5_000)
    assert held.deadline_ms == T0 + 5_000

    clock.now = T0 + 4_999  # not yet: the hold still counts
    assert (await reserve(ledger, "big", 7 * UNIT)).outcome is Outcome.insufficient
    assert (await ledger.account(CUSTOMER)).held == 4 * UNIT

    clock.now = T0 + 5_001  # past the deadline: the next reserve reaps it first
    assert (await reserve(ledger, "big", 7 * UNIT)).ok
    account = await ledger.account(CUSTOMER)
    assert account.held == 7 * UNIT
    assert account.expired_holds == 1
    assert await ledger.holds(CUSTOMER) == {"big": 7 * UNIT}
    assert account.balance == 10 * UNIT  # expiry charges nothing


async def test_reaping_brings_held_back_to_zero(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    for i in range(5):
        await reserve(ledger, f"r{i}", UNIT, ttl_ms=1_000)
    assert (await ledger.account(CUSTOMER)).held == 5 * UNIT
    clock.advance(2_000)
    assert (await reserve(ledger, "free", 0)).ok
    account = await ledger.account(CUSTOMER)
    assert (account.held, account.expired_holds) == (0, 5)
    assert await ledger.holds(CUSTOMER) == {"free": 0}


async def test_settle_after_expiry_still_charges(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "slow", 2 * UNIT, ttl_ms=1_000)
    clock.advance(5_000)
    await reserve(ledger, "other", UNIT)  # reaps "slow"
    assert await ledger.holds(CUSTOMER) == {"other": UNIT}
    settled = await ledger.settle(CUSTOMER, "slow", 1_500_000, key_id="default")
    assert not settled.duplicate
    assert (settled.balance, settled.held, settled.spent) == (8_500_000, UNIT, 1_500_000)
    [entry] = await usage_entries(ledger)
    assert (entry["request_id"], entry["cost"], entry["estimate"]) == ("slow", "1500000", "0")


async def test_settle_of_expired_unreaped_hold(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "slow", 2 * UNIT, ttl_ms=1_000)
    clock.advance(5_000)
    settled = await ledger.settle(CUSTOMER, "slow", 3 * UNIT)
    assert (settled.balance, settled.held) == (8 * UNIT, 0)  # the hold still bounds the charge
    assert (settled.charged, settled.absorbed) == (2 * UNIT, UNIT)
    assert (await ledger.account(CUSTOMER)).expired_holds == 0


async def test_settle_above_hold_charges_the_hold_and_absorbs_the_rest(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="1"))
    await reserve(ledger, "r1", 800_000)
    settled = await ledger.settle(CUSTOMER, "r1", 1_200_000)
    assert (settled.balance, settled.held) == (200_000, 0)
    assert (settled.charged, settled.absorbed) == (800_000, 400_000)
    account = await ledger.account(CUSTOMER)
    assert (account.charged, account.absorbed) == (800_000, 400_000)
    [entry] = await usage_entries(ledger)
    assert (entry["cost"], entry["absorbed"]) == ("800000", "400000")
    assert (await reserve(ledger, "r2", 200_000)).ok


async def test_settle_without_hold_never_takes_a_prepaid_balance_below_zero(
    ledger: Ledger,
) -> None:
    await ledger.configure(spec(balance="1"))
    await reserve(ledger, "other", 300_000)
    settled = await ledger.settle(CUSTOMER, "unreserved", 2 * UNIT)  # served fail-open
    assert (settled.charged, settled.absorbed) == (700_000, 1_300_000)
    assert (settled.balance, settled.held) == (300_000, 300_000)
    await ledger.settle(CUSTOMER, "late", UNIT)
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.absorbed) == (300_000, 2_300_000)
    assert account.available == 0


async def test_release_frees_without_charge(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", 3 * UNIT)
    await reserve(ledger, "r2", 2 * UNIT)
    assert await ledger.release(CUSTOMER, "r1") == 3 * UNIT
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held, account.spent) == (10 * UNIT, 2 * UNIT, 0)
    assert await ledger.holds(CUSTOMER) == {"r2": 2 * UNIT}
    assert await usage_entries(ledger) == []
    assert await ledger.release(CUSTOMER, "never-reserved") == 0


async def test_extend_grows_hold_when_money_available(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="3"))
    await reserve(ledger, "stream", UNIT, ttl_ms=1_000)
    clock.advance(900)
    extension = await ledger.extend(CUSTOMER, "stream", 1_500_000, ttl_ms=1_000)
    assert extension.ok
    assert (extension.hold, extension.available) == (2_500_000, 500_000)
    assert await ledger.holds(CUSTOMER) == {"stream": 2_500_000}
    assert (await ledger.account(CUSTOMER)).held == 2_500_000

    # The deadline moved with the extension: at the old deadline the hold is still live.
    clock.advance(500)
    assert (await reserve(ledger, "probe", 0)).ok
    assert (await ledger.account(CUSTOMER)).held == 2_500_000

    settled = await ledger.settle(CUSTOMER, "stream", 2_200_000)
    assert (settled.balance, settled.held) == (800_000, 0)
    [entry] = await usage_entries(ledger)
    assert entry["estimate"] == str(UNIT)  # the original estimate, for cost rate limits


async def test_extend_refused_when_money_missing(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="3"))
    await reserve(ledger, "stream", 2 * UNIT)
    refused = await ledger.extend(CUSTOMER, "stream", UNIT + 1, ttl_ms=TTL)
    assert not refused.ok
    assert refused.reason == "insufficient"
    assert refused.available == UNIT
    assert await ledger.holds(CUSTOMER) == {"stream": 2 * UNIT}
    assert (await ledger.account(CUSTOMER)).held == 2 * UNIT
    assert (await ledger.extend(CUSTOMER, "stream", UNIT, ttl_ms=TTL)).ok


async def test_extend_refused_over_spend_cap(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", limit="3", period="day"))
    await reserve(ledger, "stream", 2 * UNIT)
    refused = await ledger.extend(CUSTOMER, "stream", UNIT + 1, ttl_ms=TTL)
    assert not refused.ok and refused.available == UNIT
    await ledger.configure(spec(mode="capped", limit="3", period="day"))
    refused = await ledger.extend(CUSTOMER, "stream", UNIT + 1, ttl_ms=TTL)
    assert not refused.ok and refused.available == UNIT


async def test_extend_refused_when_suspended(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "stream", UNIT)
    await ledger.suspend(CUSTOMER, "stripe", "payment failed")
    refused = await ledger.extend(CUSTOMER, "stream", UNIT, ttl_ms=TTL)
    assert not refused.ok
    assert refused.reason == "suspended"
    assert (await ledger.account(CUSTOMER)).held == UNIT


async def test_extend_refused_beyond_per_request_cost_cap(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", policy={"maxRequestCost": "2.00"}))
    await reserve(ledger, "stream", UNIT)
    refused = await ledger.extend(CUSTOMER, "stream", UNIT + 1, ttl_ms=TTL)
    assert not refused.ok
    assert refused.reason == "cost_cap"
    assert await ledger.holds(CUSTOMER) == {"stream": UNIT}
    assert (await ledger.extend(CUSTOMER, "stream", UNIT, ttl_ms=TTL)).ok  # up to the cap
    assert await ledger.holds(CUSTOMER) == {"stream": 2 * UNIT}


async def test_extend_without_live_hold(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    assert (await ledger.extend(CUSTOMER, "nope", UNIT, ttl_ms=TTL)).reason == "no_hold"
    await reserve(ledger, "r1", UNIT)
    await ledger.settle(CUSTOMER, "r1", UNIT)
    assert (await ledger.extend(CUSTOMER, "r1", UNIT, ttl_ms=TTL)).reason == "duplicate"
    assert (await ledger.account(CUSTOMER)).held == 0


# --------------------------------------------------------------------------- periods


PERIOD_CASES = [
    # period, when the money is spent, the next period's first millisecond
    pytest.param("day", ms(2024, 3, 13, 8), ms(2024, 3, 14), id="day"),
    pytest.param("day", ms(2023, 12, 31, 23, 59), ms(2024, 1, 1), id="day-new-year"),
    pytest.param("week", ms(2024, 1, 3, 10), ms(2024, 1, 8), id="week-wed-to-mon"),
    pytest.param("week", ms(2024, 1, 1), ms(2024, 1, 8), id="week-from-monday-0h"),
    pytest.param("week", ms(2024, 1, 7, 23), ms(2024, 1, 8), id="week-sunday-night"),
    pytest.param("week", ms(2020, 12, 30), ms(2021, 1, 4), id="week-across-year"),
    pytest.param("month", ms(2024, 4, 1), ms(2024, 5, 1), id="month-30-days"),
    pytest.param("month", ms(2023, 12, 15), ms(2024, 1, 1), id="month-dec-to-jan"),
    pytest.param("month", ms(2024, 2, 1), ms(2024, 3, 1), id="month-feb-leap"),
    pytest.param("month", ms(2024, 2, 29, 12), ms(2024, 3, 1), id="month-feb-29"),
    pytest.param("month", ms(2023, 2, 10), ms(2023, 3, 1), id="month-feb-common"),
    pytest.param("month", ms(2100, 2, 10), ms(2100, 3, 1), id="month-feb-2100-not-leap"),
]


@pytest.mark.parametrize(("period", "spend_at", "boundary"), PERIOD_CASES)
async def test_capped_period_rollover(
    ledger: Ledger, clock: Clock, period: str, spend_at: int, boundary: int
) -> None:
    clock.now = spend_at
    await ledger.configure(spec(mode="capped", limit="10", period=period))
    assert (await reserve(ledger, "r1", 10 * UNIT)).ok
    await ledger.settle(CUSTOMER, "r1", 10 * UNIT)
    spent_period = (await ledger.account(CUSTOMER)).period_start_ms
    assert spent_period <= spend_at < boundary

    clock.now = boundary - 1
    assert (await reserve(ledger, "r2", 1)).outcome is Outcome.cap_reached
    assert (await ledger.account(CUSTOMER)).spent == 10 * UNIT

    clock.now = boundary
    assert (await reserve(ledger, "r3", 10 * UNIT)).ok
    account = await ledger.account(CUSTOMER)
    assert (account.spent, account.period_start_ms) == (0, boundary)
    assert account.balance == -10 * UNIT  # rollover resets spending, not what is owed


@pytest.mark.parametrize(
    ("period", "now", "start"),
    [
        ("day", ms(2024, 3, 13, 23, 59, 59) + 999, ms(2024, 3, 13)),
        ("week", ms(2024, 3, 13, 12), ms(2024, 3, 11)),  # Wednesday -> Monday
        ("week", ms(2024, 3, 17, 23, 59, 59), ms(2024, 3, 11)),  # Sunday -> Monday before
        ("week", ms(2024, 3, 18), ms(2024, 3, 18)),  # Monday 00:00 starts its own week
        ("week", ms(1970, 1, 1, 5), ms(1969, 12, 29)),  # epoch day 0 was a Thursday
        ("month", ms(2024, 2, 29, 23, 59, 59) + 999, ms(2024, 2, 1)),
        ("month", ms(2024, 12, 31, 23), ms(2024, 12, 1)),
        ("month", ms(2000, 3, 1), ms(2000, 3, 1)),
    ],
)
async def test_period_start(
    ledger: Ledger, clock: Clock, period: str, now: int, start: int
) -> None:
    clock.now = now
    await ledger.configure(spec(mode="capped", limit="10", period=period))
    assert (await ledger.account(CUSTOMER)).period_start_ms == start


async def test_prepaid_cap_rolls_over(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="100", limit="5", period="day"))
    await reserve(ledger, "r1", 5 * UNIT)
    await ledger.settle(CUSTOMER, "r1", 5 * UNIT)
    clock.now = ms(2024, 3, 14) - 1
    assert (await reserve(ledger, "r2", 1)).outcome is Outcome.cap_reached
    clock.now = ms(2024, 3, 14)
    assert (await reserve(ledger, "r3", 5 * UNIT)).ok
    assert (await ledger.account(CUSTOMER)).balance == 95 * UNIT


async def test_settle_in_next_period_counts_there(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(mode="capped", limit="10", period="day"))
    await reserve(ledger, "late", 4 * UNIT)
    clock.now = ms(2024, 3, 14, 0, 0, 1)
    settled = await ledger.settle(CUSTOMER, "late", 3 * UNIT)
    assert settled.spent == 3 * UNIT
    assert (await ledger.account(CUSTOMER)).period_start_ms == ms(2024, 3, 14)


# --------------------------------------------------------------------------- rate limits


@pytest.mark.parametrize(
    ("per", "count", "interval"),
    [
        ("second", 10, 100),
        ("minute", 6, 10_000),
        ("hour", 4, 900_000),
        ("day", 8, 10_800_000),
    ],
)
async def test_request_rate_burst_and_edge(
    ledger: Ledger, clock: Clock, per: str, count: int, interval: int
) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"requests": count, "per": per}]))
    for i in range(count):
        reservation = await reserve(ledger, f"burst-{i}", 1)
        assert reservation.ok, (i, reservation)
        assert reservation.rate is not None
        assert reservation.rate.limit == count
        assert reservation.rate.remaining == count - 1 - i

    refused = await reserve(ledger, "one-too-many", 1)
    assert refused.outcome is Outcome.rate_limited
    assert refused.retry_after_ms == interval
    assert refused.rate is not None and refused.rate.remaining == 0
    assert refused.limit_id is not None and refused.limit_id.startswith("c:requests")

    clock.now = T0 + interval - 1
    refused = await reserve(ledger, "one-too-many", 1)
    assert refused.outcome is Outcome.rate_limited
    assert refused.retry_after_ms == 1

    clock.now = T0 + interval
    assert (await reserve(ledger, "one-too-many", 1)).ok
    assert (await reserve(ledger, "and-another", 1)).outcome is Outcome.rate_limited

    # A quiet full window refills the whole burst.
    clock.now = T0 + interval + count * interval
    for i in range(count):
        assert (await reserve(ledger, f"refill-{i}", 1)).ok
    assert (await reserve(ledger, "refill-over", 1)).outcome is Outcome.rate_limited


async def test_request_rate_uneven_interval_rounds_retry_up(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"requests": 3, "per": "second"}]))
    for i in range(3):
        assert (await reserve(ledger, f"r{i}", 1)).ok
    refused = await reserve(ledger, "r3", 1)
    assert refused.retry_after_ms == 334  # 333.33 ms, rounded up: never retry too early
    clock.now = T0 + 333
    assert (await reserve(ledger, "r3", 1)).outcome is Outcome.rate_limited
    clock.now = T0 + 334
    assert (await reserve(ledger, "r3", 1)).ok


async def test_request_rate_burst_smaller_than_limit(ledger: Ledger, clock: Clock) -> None:
    limits = [{"requests": 10, "per": "second", "burst": 2}]
    await ledger.configure(spec(balance="100", rateLimits=limits))
    assert (await reserve(ledger, "r1", 1)).ok
    assert (await reserve(ledger, "r2", 1)).ok
    refused = await reserve(ledger, "r3", 1)
    assert refused.outcome is Outcome.rate_limited
    assert refused.retry_after_ms == 100
    clock.advance(100)
    assert (await reserve(ledger, "r3", 1)).ok


async def test_per_key_limits_are_independent(ledger: Ledger) -> None:
    one_per_minute = {"requests": 2, "per": "minute"}
    await ledger.configure(
        spec(
            balance="100",
            apiKeys=[key("alpha", one_per_minute), key("beta", one_per_minute), key("gamma")],
        )
    )
    assert (await reserve(ledger, "a1", 1, key_id="alpha")).ok
    assert (await reserve(ledger, "a2", 1, key_id="alpha")).ok
    refused = await reserve(ledger, "a3", 1, key_id="alpha")
    assert refused.outcome is Outcome.rate_limited
    assert refused.limit_id is not None and refused.limit_id.startswith("k:alpha:")
    assert (await reserve(ledger, "b1", 1, key_id="beta")).ok
    assert (await reserve(ledger, "b2", 1, key_id="beta")).ok
    assert (await reserve(ledger, "b3", 1, key_id="beta")).outcome is Outcome.rate_limited
    for i in range(20):  # a key without limits of its own is not limited
        assert (await reserve(ledger, f"g{i}", 1, key_id="gamma")).ok


async def test_customer_limit_is_shared_by_keys(ledger: Ledger) -> None:
    await ledger.configure(
        spec(
            balance="100",
            rateLimits=[{"requests": 3, "per": "minute"}],
            apiKeys=[key("alpha"), key("beta")],
        )
    )
    assert (await reserve(ledger, "a1", 1, key_id="alpha")).ok
    assert (await reserve(ledger, "b1", 1, key_id="beta")).ok
    assert (await reserve(ledger, "a2", 1, key_id="alpha")).ok
    refused = await reserve(ledger, "b2", 1, key_id="beta")
    assert refused.outcome is Outcome.rate_limited
    assert refused.limit_id is not None and refused.limit_id.startswith("c:")


async def test_tightest_limit_reported(ledger: Ledger) -> None:
    await ledger.configure(
        spec(
            balance="100",
            rateLimits=[{"requests": 100, "per": "minute"}],
            apiKeys=[key("alpha", {"requests": 5, "per": "minute"})],
        )
    )
    reservation = await reserve(ledger, "a1", 1, key_id="alpha")
    assert reservation.rate is not None
    assert (reservation.rate.limit, reservation.rate.remaining) == (5, 4)


async def test_cost_limit_counts_estimate_at_reserve(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "minute"}]))
    assert (await reserve(ledger, "r1", 600_000)).ok
    refused = await reserve(ledger, "r2", 600_000)
    assert refused.outcome is Outcome.rate_limited
    assert refused.retry_after_ms == 12_000  # 0.20 over, at 1.00 per 60 s
    assert refused.limit_id is not None and refused.limit_id.startswith("c:cost:")
    assert (await reserve(ledger, "r3", 400_000)).ok  # exactly what is left
    assert (await reserve(ledger, "r4", 1)).outcome is Outcome.rate_limited


async def test_cost_limit_corrected_down_at_settle(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "minute"}]))
    assert (await reserve(ledger, "r1", 600_000)).ok
    assert (await reserve(ledger, "r2", 600_000)).outcome is Outcome.rate_limited
    await ledger.settle(CUSTOMER, "r1", 100_000)  # cost far below the estimate
    assert (await reserve(ledger, "r2", 900_000)).ok
    assert (await reserve(ledger, "r3", 1)).outcome is Outcome.rate_limited


async def test_cost_limit_corrected_up_at_settle(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "minute"}]))
    assert (await reserve(ledger, "r1", 100_000)).ok
    assert (await ledger.extend(CUSTOMER, "r1", 800_000, ttl_ms=TTL)).ok  # a long stream
    await ledger.settle(CUSTOMER, "r1", 900_000)  # cost far above the estimate
    assert (await reserve(ledger, "r2", 100_001)).outcome is Outcome.rate_limited
    assert (await reserve(ledger, "r2", 100_000)).ok


async def test_cost_limit_correction_after_idle_time(ledger: Ledger, clock: Clock) -> None:
    """The extra cost is charged when it becomes known; time that passed before does not
    absorb it (GCRA: the new arrival time starts from max(tat, now))."""
    await ledger.configure(spec(balance="100", rateLimits=[{"cost": "1.00", "per": "minute"}]))
    assert (await reserve(ledger, "long", 100_000)).ok
    assert (await ledger.extend(CUSTOMER, "long", 800_000, ttl_ms=TTL)).ok
    clock.advance(30_000)  # the bucket is full again by now
    await ledger.settle(CUSTOMER, "long", 900_000)  # 0.80 more than held: 0.20 left
    assert (await reserve(ledger, "next", 250_000)).outcome is Outcome.rate_limited
    assert (await reserve(ledger, "next", 200_000)).ok


async def test_cost_limit_per_key_corrected_at_settle(ledger: Ledger) -> None:
    await ledger.configure(
        spec(balance="100", apiKeys=[key("alpha", {"cost": "1.00", "per": "minute"})])
    )
    assert (await reserve(ledger, "r1", 600_000, key_id="alpha")).ok
    await ledger.settle(CUSTOMER, "r1", 100_000)  # key id comes from the hold
    assert (await reserve(ledger, "r2", 900_000, key_id="alpha")).ok


async def test_refused_request_consumes_no_rate_allowance(ledger: Ledger) -> None:
    await ledger.configure(
        spec(
            balance="1",
            rateLimits=[{"requests": 3, "per": "minute"}],
            apiKeys=[key("alpha", {"requests": 1, "per": "minute"}), key("beta")],
            policy={"maxRequestCost": "0.50"},
        )
    )
    for i in range(5):  # refused for money: no allowance used
        assert (await reserve(ledger, f"poor-{i}", 2 * UNIT)).outcome is Outcome.cost_cap
    await ledger.configure(
        spec(
            balance="1",
            rateLimits=[{"requests": 3, "per": "minute"}],
            apiKeys=[key("alpha", {"requests": 1, "per": "minute"}), key("beta")],
        )
    )
    for i in range(5):
        assert (await reserve(ledger, f"poor2-{i}", 2 * UNIT)).outcome is Outcome.insufficient
    assert (await reserve(ledger, "a1", 1, key_id="alpha")).ok
    for i in range(5):  # refused by alpha's own limit: the customer limit is not charged
        refused = await reserve(ledger, f"a-over-{i}", 1, key_id="alpha")
        assert refused.outcome is Outcome.rate_limited
    assert (await reserve(ledger, "b1", 1, key_id="beta")).ok
    assert (await reserve(ledger, "b2", 1, key_id="beta")).ok
    assert (await reserve(ledger, "b3", 1, key_id="beta")).outcome is Outcome.rate_limited
    account = await ledger.account(CUSTOMER)
    assert (account.balance, account.held) == (UNIT, 3)


async def test_rate_limited_request_holds_no_money(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10", rateLimits=[{"requests": 1, "per": "minute"}]))
    assert (await reserve(ledger, "r1", UNIT)).ok
    assert (await reserve(ledger, "r2", UNIT)).outcome is Outcome.rate_limited
    assert (await ledger.account(CUSTOMER)).held == UNIT
    assert await ledger.holds(CUSTOMER) == {"r1": UNIT}


async def test_changing_a_limit_resets_its_state(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="100", rateLimits=[{"requests": 2, "per": "minute"}]))
    assert (await reserve(ledger, "r1", 1)).ok
    assert (await reserve(ledger, "r2", 1)).ok
    assert (await reserve(ledger, "r3", 1)).outcome is Outcome.rate_limited
    # Re-applying the same limit keeps its state...
    await ledger.configure(spec(balance="100", rateLimits=[{"requests": 2, "per": "minute"}]))
    assert (await reserve(ledger, "r3", 1)).outcome is Outcome.rate_limited
    # ...a changed one starts afresh.
    await ledger.configure(spec(balance="100", rateLimits=[{"requests": 3, "per": "minute"}]))
    for i in range(3):
        assert (await reserve(ledger, f"new-{i}", 1)).ok
    assert (await reserve(ledger, "new-3", 1)).outcome is Outcome.rate_limited
    # Removing the limits removes the limiting.
    await ledger.configure(spec(balance="100"))
    assert (await reserve(ledger, "free", 1)).ok


async def test_changing_a_key_limit_resets_its_state(ledger: Ledger) -> None:
    await ledger.configure(
        spec(balance="100", apiKeys=[key("alpha", {"requests": 1, "per": "hour"})])
    )
    assert (await reserve(ledger, "r1", 1, key_id="alpha")).ok
    assert (await reserve(ledger, "r2", 1, key_id="alpha")).outcome is Outcome.rate_limited
    await ledger.configure(
        spec(balance="100", apiKeys=[key("alpha", {"requests": 1, "per": "minute"})])
    )
    assert (await reserve(ledger, "r2", 1, key_id="alpha")).ok


# --------------------------------------------------------------------------- ledger stream


async def test_ledger_entry_per_balance_change(ledger: Ledger, clock: Clock) -> None:
    await ledger.configure(spec(balance="10"))  # 1 entry
    await ledger.fund(CUSTOMER, "cs_1", 5 * UNIT, source="stripe", note="checkout")  # 2
    await reserve(ledger, "r1", 2 * UNIT, key_id="prod")  # holds are not balance changes
    await reserve(ledger, "r2", UNIT, key_id="prod")
    await reserve(ledger, "r3", UNIT, key_id="prod", ttl_ms=10)
    await ledger.extend(CUSTOMER, "r2", UNIT, ttl_ms=TTL)
    await ledger.release(CUSTOMER, "r2")
    clock.advance(1_000)
    usage = Usage(
        model="llama-3-70b",
        input_tokens=120,
        output_tokens=456,
        upstream_ms=2_345,
        outcome="ok",
        pod="llm-0",
        rule="chat",
    )
    await ledger.settle(CUSTOMER, "r1", 1_234_567, usage=usage)  # 3
    await ledger.settle(CUSTOMER, "r1", 1_234_567, usage=usage)  # duplicate: none
    await ledger.adjust(CUSTOMER, "credit-9", -UNIT, source="support", note="goodwill")  # 4
    await reserve(ledger, "r4", UNIT)  # reaps r3: no entry

    entries = await ledger.ledger_entries(CUSTOMER)
    assert [e["type"] for e in entries] == ["adjust", "fund", "usage", "adjust"]
    spec_entry, fund, used, adjust = entries
    assert spec_entry["funding_id"].startswith("spec:")
    assert fund == {
        "id": fund["id"],
        "type": "fund",
        "funding_id": "cs_1",
        "amount": str(5 * UNIT),
        "balance": str(15 * UNIT),
        "ts": str(T0),
        "source": "stripe",
        "note": "checkout",
    }
    assert used == {
        "id": used["id"],
        "type": "usage",
        "request_id": "r1",
        "key": "prod",
        "cost": "1234567",
        "estimate": str(2 * UNIT),
        "absorbed": "0",
        "ts": str(T0 + 1_000),
        "model": "llama-3-70b",
        "input_tokens": "120",
        "output_tokens": "456",
        "upstream_ms": "2345",
        "outcome": "ok",
        "pod": "llm-0",
        "rule": "chat",
    }
    assert (adjust["funding_id"], adjust["amount"], adjust["source"], adjust["note"]) == (
        "credit-9",
        str(-UNIT),
        "support",
        "goodwill",
    )
    assert adjust["balance"] == str(15 * UNIT - 1_234_567 - UNIT)
    account = await ledger.account(CUSTOMER)
    assert account.balance == int(adjust["balance"])
    # The ledger balances: opening + funding + adjustments - charges = balance.
    assert account.balance == sum(
        int(e["amount"]) if e["type"] != "usage" else -int(e["cost"]) for e in entries
    )


async def test_settle_entry_ids_are_returned(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", UNIT)
    settled = await ledger.settle(CUSTOMER, "r1", UNIT)
    [entry] = await usage_entries(ledger)
    assert settled.entry_id == entry["id"]
    credit = await ledger.fund(CUSTOMER, "f1", UNIT)
    assert credit.entry_id == (await ledger.ledger_entries(CUSTOMER))[-1]["id"]


async def test_settle_key_defaults_to_hold_key(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await reserve(ledger, "r1", UNIT, key_id="batch")
    await ledger.settle(CUSTOMER, "r1", UNIT)
    [entry] = await usage_entries(ledger)
    assert entry["key"] == "batch"


async def test_customers_are_isolated(ledger: Ledger) -> None:
    await ledger.configure(spec("alpha-co", balance="10"))
    await ledger.configure(spec("beta-co", balance="1"))
    assert (await reserve(ledger, "same-id", 5 * UNIT, customer="alpha-co")).ok
    assert (await reserve(ledger, "same-id", 5 * UNIT, customer="beta-co")).outcome is (
        Outcome.insufficient
    )
    await ledger.settle("alpha-co", "same-id", 5 * UNIT)
    assert (await reserve(ledger, "same-id", UNIT, customer="beta-co")).ok
    assert (await ledger.account("alpha-co")).balance == 5 * UNIT
    assert (await ledger.account("beta-co")).held == UNIT


async def test_uses_redis_time_without_clock(ledger_redis: Any) -> None:
    ledger = Ledger(ledger_redis)
    await ledger.configure(spec(balance="10", mode="prepaid"))
    reservation = await reserve(ledger, "r1", UNIT, ttl_ms=1_000)
    server_seconds, _ = await ledger_redis.time()
    assert reservation.deadline_ms is not None
    assert abs(reservation.deadline_ms - (server_seconds * 1000 + 1_000)) < 5_000


async def test_works_with_decoded_responses(ledger_redis_target: Any, clock: Clock) -> None:
    url = ledger_redis_target.url
    client: Any
    if ledger_redis_target.cluster:
        client = redis.asyncio.cluster.RedisCluster.from_url(url, decode_responses=True)
    else:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        ledger = Ledger(client, clock=clock)
        await ledger.configure(spec(balance="10"))
        assert (await reserve(ledger, "r1", UNIT)).ok
        settled = await ledger.settle(CUSTOMER, "r1", UNIT)
        assert settled.balance == 9 * UNIT
        assert (await ledger.fund(CUSTOMER, "f1", UNIT)).balance == 10 * UNIT
        assert (await ledger.account(CUSTOMER)).balance == 10 * UNIT
        assert len(await ledger.ledger_entries(CUSTOMER)) == 3
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- cluster


def test_all_keys_of_a_customer_share_one_slot() -> None:
    keys = for_customer("acme-corp.eu_1")
    names = [
        *keys.script_keys(keys.request("req-1")),
        keys.funding("in_1"),
        keys.request("x" * 128),
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert all(name.startswith("sg:{acme-corp.eu_1}:") for name in names)


@pytest.mark.cluster
async def test_customers_on_different_cluster_nodes(
    redis_cluster: Any, redis_cluster_url: str, clock: Clock
) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster_url)
    try:
        ledger = Ledger(client, clock=clock)
        await ledger.load_scripts()
        # Pick customers until two live on different masters.
        by_node: dict[str, str] = {}
        for i in range(100):
            customer = f"cust-{i}"
            node = client.get_node_from_key(for_customer(customer).acct)
            by_node.setdefault(node.name, customer)
            if len(by_node) == 3:
                break
        assert len(by_node) == 3
        customers = list(by_node.values())
        for n, customer in enumerate(customers, start=1):
            await ledger.configure(spec(customer, balance=str(n)))
            assert (await reserve(ledger, "r1", UNIT, customer=customer)).ok
            await ledger.settle(customer, "r1", UNIT // 2)
            await ledger.fund(customer, "f1", UNIT)
        for n, customer in enumerate(customers, start=1):
            account = await ledger.account(customer)
            assert (account.balance, account.held) == (n * UNIT + UNIT // 2, 0)
    finally:
        await client.aclose()
    # Each customer's data sits whole on the one master that owns its slot.
    for node in redis_cluster.nodes:
        with node.client() as direct:
            stored = [k.decode() for k in direct.keys("sg:*")]
            tags = {k.split("}")[0] for k in stored}
            assert len(tags) == 1, stored
            (customer,) = (c for c in customers if f"sg:{{{c}" in tags)
            assert direct.exists(for_customer(customer).ledger)


async def test_zero_cost_settle_and_zero_hold_release(ledger: Ledger) -> None:
    """A free request (estimate 0) reserves, releases and settles like any other."""
    await ledger.configure(
        CustomerBudgetSpec.model_validate(
            {"customerId": CUSTOMER, "currency": "USD", "balance": "1.00"}
        )
    )
    assert (await reserve(ledger, "free-1", 0)).ok
    assert await ledger.release(CUSTOMER, "free-1") == 0
    assert (await reserve(ledger, "free-2", 0)).ok
    settled = await ledger.settle(CUSTOMER, "free-2", 0)
    assert not settled.duplicate
    assert settled.balance == 1_000_000
    assert settled.held == 0
