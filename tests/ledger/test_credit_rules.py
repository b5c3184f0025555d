"""fund/adjust refusals (credit.lua): a reused id, a capped customer, a negative balance.

Each refusal changes nothing: the balance, the ledger stream and the id's record stay as they
were. Run on a single Redis, over the pipelined channel and on the 3-master Cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from spendgate.credits import (
    CappedAccount,
    CreditRefused,
    IdempotencyConflict,
    NegativeBalance,
    parse_record,
)
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from spendgate.models import CustomerBudgetSpec
from tests.support.redis_servers import RedisTarget

UNIT = 1_000_000
CUSTOMER = "acme"


def spec(**fields: Any) -> CustomerBudgetSpec:
    body: dict[str, Any] = {"customerId": CUSTOMER, "currency": "USD", **fields}
    return CustomerBudgetSpec.model_validate(body)


@pytest_asyncio.fixture
async def ledger(ledger_redis: Any, ledger_redis_target: RedisTarget) -> AsyncIterator[Ledger]:
    channel = ledger_redis_target.script_channel()
    ledger = Ledger(ledger_redis, channel=channel)
    await ledger.load_scripts()
    yield ledger
    if channel is not None:
        await channel.close()


async def snapshot(ledger: Ledger, funding_id: str) -> tuple[Any, ...]:
    account = await ledger.account(CUSTOMER)
    record = await ledger.redis.get(for_customer(CUSTOMER).funding(funding_id))
    entries = await ledger.ledger_entries(CUSTOMER)
    return account.balance, account.funded, record, len(entries)


async def refused(ledger: Ledger, funding_id: str, call: Any, error: type) -> CreditRefused:
    before = await snapshot(ledger, funding_id)
    with pytest.raises(error) as raised:
        await call
    assert await snapshot(ledger, funding_id) == before
    return raised.value


async def test_fund_id_reused_for_another_amount_names_both(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="0"))
    first = await ledger.fund(CUSTOMER, "topup-1", 10 * UNIT)
    error = await refused(
        ledger, "topup-1", ledger.fund(CUSTOMER, "topup-1", 20 * UNIT), IdempotencyConflict
    )
    message = str(error)
    assert "id 'topup-1' was already used for fund of +10.00" in message
    assert "this fund is +20.00" in message and first.entry_id in message
    replay = await ledger.fund(CUSTOMER, "topup-1", 10 * UNIT)  # identical: still a no-op
    assert replay.duplicate and replay.entry_id == first.entry_id
    assert (await ledger.account(CUSTOMER)).balance == 10 * UNIT


async def test_adjust_with_a_fundings_id_is_refused(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="0"))
    await ledger.fund(CUSTOMER, "in_1", 5 * UNIT)
    for amount in (5 * UNIT, -UNIT):  # same amount, other type: refused all the same
        error = await refused(
            ledger, "in_1", ledger.adjust(CUSTOMER, "in_1", amount), IdempotencyConflict
        )
        assert "already used for fund of +5.00" in str(error)
    assert "this adjust is -1.00" in str(error)


async def test_fund_with_an_adjustments_id_is_refused(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="10"))
    await ledger.adjust(CUSTOMER, "fix-1", 2 * UNIT)
    error = await refused(
        ledger, "fix-1", ledger.fund(CUSTOMER, "fix-1", 2 * UNIT), IdempotencyConflict
    )
    assert "already used for adjust of +2.00" in str(error) and "this fund is +2.00" in str(error)


async def test_records_without_a_type_compare_amounts(ledger: Ledger) -> None:
    """Ids recorded before the type was kept ("amount@entry") still refuse another amount;
    "0@..." (an id marked spent, e.g. a voided Stripe grant) replays for any amount."""
    await ledger.configure(spec(balance="0"))
    keys = for_customer(CUSTOMER)
    await ledger.redis.set(keys.funding("old-1"), f"{3 * UNIT}@1-0")
    assert (await ledger.fund(CUSTOMER, "old-1", 3 * UNIT)).duplicate
    with pytest.raises(IdempotencyConflict, match=r"already used for a credit of \+3\.00"):
        await ledger.adjust(CUSTOMER, "old-1", -3 * UNIT)
    await ledger.redis.set(keys.funding("grant-9"), "0@voided")
    assert (await ledger.fund(CUSTOMER, "grant-9", 7 * UNIT)).duplicate
    assert (await ledger.account(CUSTOMER)).balance == 0


async def test_funding_a_capped_customer_is_refused(ledger: Ledger) -> None:
    await ledger.configure(spec(mode="capped", limit="100", period="month"))
    for call in (ledger.fund(CUSTOMER, "f1", UNIT), ledger.adjust(CUSTOMER, "f1", -UNIT)):
        error = await refused(ledger, "f1", call, CappedAccount)
        assert "customer 'acme' is capped (post-paid)" in str(error)
        assert "change spec.limit" in str(error)


async def test_adjust_below_zero_needs_allow_negative(ledger: Ledger) -> None:
    await ledger.configure(spec(balance="2"))
    error = await refused(
        ledger,
        "chargeback-1",
        ledger.adjust(CUSTOMER, "chargeback-1", -5 * UNIT, allow_negative=False),
        NegativeBalance,
    )
    assert "from 2.00 to -3.00" in str(error) and "--allow-negative" in str(error)
    exact = await ledger.adjust(CUSTOMER, "to-zero", -2 * UNIT, allow_negative=False)
    assert exact.balance == 0  # down to zero is not negative
    allowed = await ledger.adjust(CUSTOMER, "chargeback-1", -5 * UNIT, allow_negative=True)
    assert allowed.balance == -5 * UNIT
    upward = await ledger.adjust(CUSTOMER, "goodwill", UNIT, allow_negative=False)
    assert upward.balance == -4 * UNIT  # raising a negative balance is always allowed


def test_parse_record() -> None:
    assert parse_record("5000000@1700000000000-0@fund").kind == "fund"
    assert parse_record("-1@2-0").amount == -1 and parse_record("-1@2-0").kind == ""
    assert parse_record("0@voided").entry_id == "voided"
    assert parse_record("garbage").amount is None
