"""The per-node pipelined script channel on a real 3-master Redis Cluster."""

from __future__ import annotations

import pytest

from spendgate.ledger import Ledger
from spendgate.models import CustomerBudgetSpec
from spendgate.script_channel import ClusterScriptChannel
from tests.support.redis_servers import RedisTarget

pytestmark = pytest.mark.cluster


def spec(customer: str) -> CustomerBudgetSpec:
    return CustomerBudgetSpec.model_validate(
        {"customerId": customer, "currency": "USD", "balance": "1"}
    )


async def test_calls_go_to_the_node_owning_the_slot(redis_cluster_url: str) -> None:
    target = RedisTarget("cluster", redis_cluster_url)
    client = target.async_client()
    channel = ClusterScriptChannel(redis_cluster_url)
    try:
        ledger = Ledger(client, channel=channel)
        customers = [f"c{i}" for i in range(30)]
        for customer in customers:
            await ledger.configure(spec(customer))
            assert (await ledger.reserve(customer, "r1", 10, key_id="k", currency="USD",
                                         ttl_ms=60_000)).ok  # fmt: skip
            await ledger.settle(customer, "r1", 7)
        assert len(channel._nodes) == 3  # every primary served some customers
        for customer in customers:
            assert (await ledger.account(customer)).balance == 1_000_000 - 7
    finally:
        await channel.close()
        await client.aclose()


async def test_a_stale_slot_map_follows_moved_and_reloads(redis_cluster_url: str) -> None:
    target = RedisTarget("cluster", redis_cluster_url)
    client = target.async_client()
    channel = ClusterScriptChannel(redis_cluster_url)
    try:
        ledger = Ledger(client, channel=channel)
        await ledger.configure(spec("acme"))
        await channel.refresh()
        right = channel._slots[0]
        wrong = next(a for a in set(channel._slots) if a != channel._slots[11304])
        channel._slots = [wrong] * len(channel._slots)  # as if every slot had moved
        reservation = await ledger.reserve(
            "acme", "r1", 10, key_id="k", currency="USD", ttl_ms=60_000
        )
        assert reservation.ok
        assert channel._slots[0] == right  # reloaded from the cluster
    finally:
        await channel.close()
        await client.aclose()
