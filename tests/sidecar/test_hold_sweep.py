"""The periodic sweep: a quiet customer's expired holds are released without any traffic."""

from __future__ import annotations

from typing import Any

from spendgate.config_store import ConfigStore
from spendgate.keys import TREE
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.sidecar.hold_sweep import HoldSweep
from tests.support.sidecar_env import budget


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def _customers(client: Any, *names: str) -> None:
    store = ConfigStore(client)
    for name in names:
        manifest: Any = parse_resource(budget(name, "5.00"))
        await store.apply_budget(manifest, {"main": f"sk-{name}-0123456789"})


async def test_sweep_releases_expired_holds_of_quiet_customers(ledger_redis: Any) -> None:
    client = ledger_redis
    await _customers(client, "quiet", "busy")
    clock = Clock(1_700_000_000_000)
    ledger = Ledger(client, clock=clock)
    await ledger.load_scripts()
    for i in range(3):
        reservation = await ledger.reserve(
            "quiet", f"crashed-{i}", 1_000_000, key_id="main", currency="USD", ttl_ms=1_000
        )
        assert reservation.ok
    await ledger.reserve("busy", "live", 1_000_000, key_id="main", currency="USD", ttl_ms=60_000)
    assert (await ledger.account("quiet")).held == 3_000_000
    clock.now += 5_000  # the crashed sidecar's holds are past their deadline
    sweep = HoldSweep(client, ledger, interval_ms=1_000)
    assert await sweep.sweep_once() == 3
    quiet = await ledger.account("quiet")
    assert (quiet.held, quiet.balance, quiet.expired_holds) == (0, 5_000_000, 3)
    assert (await ledger.account("busy")).held == 1_000_000  # not expired: kept
    assert await sweep.sweep_once() == 0


async def test_a_pass_reads_where_the_budgets_sit_once_per_batch(
    ledger_redis: Any, monkeypatch: Any
) -> None:
    client = ledger_redis
    names = [f"c{i:02d}" for i in range(30)]
    await _customers(client, *names)
    ledger = Ledger(client)
    await ledger.load_scripts()
    reads: list[tuple[str, Any]] = []
    hget, hmget = client.hget, client.hmget

    async def counting_hget(key: Any, *args: Any) -> Any:
        reads.append(("hget", key))
        return await hget(key, *args)

    async def counting_hmget(key: Any, *args: Any) -> Any:
        reads.append(("hmget", key))
        return await hmget(key, *args)

    monkeypatch.setattr(client, "hget", counting_hget)
    monkeypatch.setattr(client, "hmget", counting_hmget)
    assert await HoldSweep(client, ledger, interval_ms=1_000).sweep_once() == 0
    tree_reads = [op for op, key in reads if key in (TREE, TREE.encode())]
    assert tree_reads == ["hmget"], tree_reads  # not one read per customer
