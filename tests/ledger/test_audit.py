"""``spendgate.accounting.audit``: a clean ledger passes; each invariant, broken on purpose by
editing Redis, is caught and named. Single Redis and Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from spendgate.accounting.audit import (
    CustomerAudit,
    audit_customer,
    exported_key,
    ledger_base_key,
    trim_ledger,
)
from spendgate.accounting.entries import last_id
from spendgate.keys import STRIPE_EXPORT_CURSORS, for_customer
from spendgate.ledger import Ledger, Usage
from tests.support.accounting_data import Clock, client_for, populate

ACME = for_customer("acme")


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False


@pytest_asyncio.fixture
async def client(target: tuple[str, bool]) -> AsyncIterator[Any]:
    redis = client_for(*target)
    await populate(redis, Clock())
    yield redis
    await redis.aclose()


async def audit(client: Any, customer: str = "acme") -> CustomerAudit:
    return await audit_customer(client, customer, "USD", now_ms=10**13)


def checks(result: CustomerAudit) -> set[str]:
    return {m.check for m in result.mismatches}


async def test_clean_ledger_adds_up(client: Any) -> None:
    result = await audit(client)
    assert result.ok, result.mismatches
    assert result.figures["balance"] == "114.25" and result.figures["held"] == "0.75"
    assert result.figures["entries"] == {"retained": 6, "trimmed": 0}
    assert (await audit(client, "beta")).ok


async def test_trimmed_ledger_still_adds_up(client: Any) -> None:
    entries = await client.xrange(ACME.ledger)
    removed = await trim_ledger(client, "acme", entries[4][0].decode())
    assert removed == 4
    result = await audit(client)
    assert result.ok, result.mismatches
    assert result.figures["entries"] == {"retained": 2, "trimmed": 4}
    base = await client.hgetall(ledger_base_key("acme"))
    assert base[b"funded"] == b"20000000" and base[b"spec"] == b"100000000"
    assert base[b"charged"] == b"2500000" and base[b"upto"] == entries[3][0]


async def test_balance_edited(client: Any) -> None:
    await client.hincrby(ACME.acct, "balance", 1)
    result = await audit(client)
    assert checks(result) == {"balance"}
    assert "off by 0.000001" in result.mismatches[0].message


async def test_charged_total_edited(client: Any) -> None:
    await client.hincrby(ACME.acct, "charged", -1_250_000)
    result = await audit(client)
    assert checks(result) == {"balance", "ledger"}
    assert any("charged on the ledger 5.75 != account 4.50" in m.message for m in result.mismatches)


async def test_entry_deleted(client: Any) -> None:
    usage = [eid for eid, f in await client.xrange(ACME.ledger) if f[b"type"] == b"usage"]
    await client.xdel(ACME.ledger, usage[0])
    assert checks(await audit(client)) == {"ledger", "ledger_gap"}


async def test_trimmed_without_checkpoint(client: Any) -> None:
    entries = await client.xrange(ACME.ledger)
    await client.xtrim(ACME.ledger, minid=entries[2][0], approximate=False)
    result = await audit(client)
    assert "ledger_gap" in checks(result)
    assert any("6 entries were appended but 4" in m.message for m in result.mismatches)


async def test_usage_settled_twice(client: Any) -> None:
    fields = {"type": "usage", "request_id": "req-llama-1", "key": "prod", "cost": "1250000",
              "estimate": "0", "ts": "1"}  # fmt: skip
    await client.xadd(ACME.ledger, fields)
    await client.hincrby(ACME.acct, "charged", 1_250_000)
    await client.hincrby(ACME.acct, "balance", -1_250_000)
    result = await audit(client)
    assert checks(result) == {"duplicate_usage"}
    assert "req-llama-1 (2x)" in result.mismatches[0].message


async def test_held_edited(client: Any) -> None:
    await client.hincrby(ACME.acct, "held", 5)
    result = await audit(client)
    assert checks(result) == {"held"}
    assert "held 0.750005 != sum of 1 live holds 0.75" in result.mismatches[0].message


async def test_hold_without_deadline(client: Any) -> None:
    await client.zrem(ACME.deadlines, "req-live")
    assert checks(await audit(client)) == {"hold_index"}
    await client.hdel(ACME.holds, "req-live")
    await client.zadd(ACME.deadlines, {"req-live": 1})
    assert checks(await audit(client)) == {"held", "hold_index"}


async def test_malformed_hold(client: Any) -> None:
    await client.hset(ACME.holds, "req-live", "lots|1|dev|1")
    assert "held" in checks(await audit(client))


async def _link(client: Any) -> list[Any]:
    await client.hset(f"{ACME.tag}:stripe", mapping={"customer": "cus_123", "currency": "USD"})
    entries = await client.xrange(ACME.ledger)
    return entries


async def test_stripe_export_matches_up_to_cursor(client: Any) -> None:
    entries = await _link(client)
    cursor = entries[3][0].decode()  # the first two usage entries are exported
    await client.hset(STRIPE_EXPORT_CURSORS, "acme", cursor)
    await client.hset(exported_key("acme"), mapping={"cursor": cursor, "sent": 2_500_000})
    result = await audit(client)
    assert result.ok, result.mismatches
    stripe = result.figures["stripe"]
    assert stripe["exported"] == "2.50" and stripe["settledUpToCursor"] == "2.50"
    assert stripe["lagSeconds"] > 0  # the third usage entry waits
    await trim_ledger(client, "acme", cursor)  # the exporter trims what it sent
    assert (await audit(client)).ok


async def test_stripe_export_mismatch(client: Any) -> None:
    entries = await _link(client)
    cursor = entries[3][0].decode()
    await client.hset(STRIPE_EXPORT_CURSORS, "acme", cursor)
    await client.hset(
        exported_key("acme"), mapping={"cursor": cursor, "sent": 1_250_000, "rejected": 1}
    )
    result = await audit(client)
    assert checks(result) == {"stripe_export"}
    assert "off by 1.249999" in result.mismatches[0].message


async def test_stripe_all_exported_has_no_lag(client: Any) -> None:
    await _link(client)
    cursor = await last_id(client, "acme")
    await client.hset(STRIPE_EXPORT_CURSORS, "acme", cursor)
    await client.hset(exported_key("acme"), mapping={"cursor": cursor, "sent": 5_750_000})
    result = await audit(client)
    assert result.ok and result.figures["stripe"]["lagSeconds"] == 0


async def test_no_false_mismatch_under_concurrent_traffic_and_trimming(client: Any) -> None:
    ledger = Ledger(client)
    stop = asyncio.Event()

    async def traffic(worker: int) -> None:
        n = 0
        while not stop.is_set():
            rid = f"load-{worker}-{n}"
            n += 1
            await ledger.reserve("acme", rid, 1000, key_id="prod", currency="USD", ttl_ms=60_000)
            await ledger.settle("acme", rid, 700, key_id="prod", usage=Usage(model="m"))

    async def trimmer() -> None:
        while not stop.is_set():
            await trim_ledger(client, "acme", await last_id(client, "acme"))
            await asyncio.sleep(0.3)  # the exporter trims once per pass, seconds apart

    tasks = [asyncio.create_task(traffic(w)) for w in range(3)] + [asyncio.create_task(trimmer())]
    try:
        for _ in range(5):
            result = await audit(client)
            assert result.ok, result.mismatches
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert (await audit(client)).ok


async def _absorbed_entry(client: Any) -> None:
    """A usage entry whose model went beyond its bound, as settle records it."""
    fields = {"type": "usage", "request_id": "req-over", "key": "prod", "cost": "1000",
              "estimate": "1000", "absorbed": "250", "ts": "1"}  # fmt: skip
    await client.xadd(ACME.ledger, fields)
    for name, change in (("charged", 1000), ("balance", -1000), ("absorbed", 250)):
        await client.hincrby(ACME.acct, name, change)


async def test_absorbed_adds_up_and_is_checked(client: Any) -> None:
    await _absorbed_entry(client)
    result = await audit(client)
    assert result.ok, result.mismatches
    assert result.figures["absorbed"] == "0.00025"
    await client.hincrby(ACME.acct, "absorbed", 1)
    assert checks(await audit(client)) == {"ledger"}


async def test_trim_counts_absorbed(client: Any) -> None:
    await _absorbed_entry(client)
    ms, seq = (await last_id(client, "acme")).split("-")
    await trim_ledger(client, "acme", f"{ms}-{int(seq) + 1}")  # everything
    assert not await client.xrange(ACME.ledger)
    assert (await client.hget(ledger_base_key("acme"), "absorbed")) == b"250"
    assert (await audit(client)).ok
