"""A small, known ledger for the accounting tests: two customers, funding, usage, holds."""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.asyncio.cluster

from spendgate.accounting.refusals import RefusalKey, add_refusals
from spendgate.budget_tree import TreeIndex
from spendgate.keys import CUSTOMERS
from spendgate.ledger import Ledger, Usage
from spendgate.models import CustomerBudgetSpec

UNIT = 1_000_000


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0)) * 1000


# 09:00 UTC three days ago: in the past (a stream id is never earlier than its entry's time)
# and within the retention of refusal counters.
T0 = (int(time.time() * 1000) // 86_400_000 - 3) * 86_400_000 + 9 * 3_600_000
DAY = time.strftime("%Y-%m-%d", time.gmtime(T0 / 1000))


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, delta_ms: int) -> int:
        self.now += delta_ms
        return self.now


def client_for(url: str, cluster: bool) -> Any:
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url)
    return redis.asyncio.Redis.from_url(url)


def budget(customer_id: str, balance: str = "100.00", **fields: Any) -> CustomerBudgetSpec:
    body = {"customerId": customer_id, "currency": "USD", "balance": balance, **fields}
    return CustomerBudgetSpec.model_validate(body)


@dataclass(frozen=True)
class Known:
    """What ``populate`` wrote, for assertions."""

    acme_cost: int = 3 * 1_250_000 + 2_000_000  # three llama requests and one mistral one
    acme_input: int = 3 * 100 + 400
    acme_output: int = 3 * 50 + 200
    acme_funded: int = 20 * UNIT
    beta_cost: int = 500_000


async def populate(client: Any, clock: Clock) -> Known:
    """acme: opening 100.00, +20.00 funded, 4 settled requests over two hours (keys prod and
    dev), one live hold of 0.75; refusals. beta: opening 10.00, 1 request."""
    ledger = Ledger(client, clock=clock)
    await ledger.load_scripts()
    for spec in (budget("acme"), budget("beta", "10.00")):
        await ledger.configure(spec)
        await client.hset(CUSTOMERS, spec.customer_id, f"default/{spec.customer_id}")
    await ledger.fund("acme", "topup-1", 20 * UNIT, source="cli", note="first top-up")
    for i in range(3):
        clock.advance(60_000)
        rid = f"req-llama-{i}"
        await ledger.reserve("acme", rid, 2 * UNIT, key_id="prod", currency="USD", ttl_ms=60_000)
        await ledger.settle(
            "acme", rid, 1_250_000, key_id="prod",
            usage=Usage(model="llama-3", input_tokens=100, output_tokens=50, outcome="ok"),
        )  # fmt: skip
    clock.advance(3_600_000)  # the next hour
    await ledger.settle(
        "acme", "req-mistral-0", 2_000_000, key_id="dev",
        usage=Usage(model="mistral", input_tokens=400, output_tokens=200),
    )  # fmt: skip
    await ledger.reserve(
        "acme", "req-live", 750_000, key_id="dev", currency="USD", ttl_ms=5 * 86_400_000
    )
    await ledger.settle("beta", "req-beta-0", 500_000, key_id="main", usage=Usage(model="llama-3"))
    hour = T0 - T0 % 3_600_000
    await add_refusals(
        client,
        {
            RefusalKey("acme", hour, "insufficient", "prod", "llama-3"): 2,
            RefusalKey("acme", hour, "rate_limited", "dev", "mistral"): 5,
        },
        TreeIndex(client),
    )
    return Known()
