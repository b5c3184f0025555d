"""`make bench`'s money path without HTTP: reserve + settle straight through the Ledger.

    python benchmarks/ledger_load.py --target ledger --redis URL [--cluster]
        --customers bench-00,bench-01 --concurrency 32 --duration 5 --warmup 1

Each of ``--concurrency`` workers loops: reserve a hold for its customer (worker *i* uses
customer *i* mod the number of customers), then settle it -- the two Lua scripts the sidecar
runs per request, over the same transport the sidecar uses: the pipelined
:class:`~spendgate.script_channel.ScriptChannel` for a single Redis, one per primary
(:class:`~spendgate.script_channel.ClusterScriptChannel`) with ``--cluster``. One "request" in
the result is one reserve + settle pair; its latency is the pair's.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict

from loadgen import LoadResult, Sender, common_args, drive, run
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from spendgate import redis_connect
from spendgate.ledger import Ledger, Outcome, Usage
from spendgate.script_channel import ClusterScriptChannel, ScriptChannel

ESTIMATE_MICROS = 200  # what the sidecar holds for the benchmark's chat request, about
COST_MICROS = 124


async def ledger_load(ns: argparse.Namespace) -> LoadResult:
    customers = ns.customers.split(",")
    # The sidecar's client options (sidecar/server.py): one quick retry, a pool per node.
    redis = redis_connect.connect(
        ns.redis,
        cluster=ns.cluster,
        timeout_s=5,
        connect_timeout_s=5,
        retry=Retry(NoBackoff(), 1),
        max_connections=max(ns.concurrency, len(customers)) + 16,
    )
    kind = ClusterScriptChannel if ns.cluster else ScriptChannel
    channel = kind(ns.redis, timeout_s=5)
    ledger = Ledger(redis, channel=channel)
    prefix = f"b{os.getpid()}"
    usage = Usage(model="standin", input_tokens=12, output_tokens=16, rule="chat", pod="bench")
    counter = 0

    def sender(customer: str) -> Sender:
        async def send() -> int:
            nonlocal counter
            counter += 1
            rid = f"{prefix}-{counter}"
            held = await ledger.reserve(
                customer, rid, ESTIMATE_MICROS, key_id="main", currency="USD", ttl_ms=600_000
            )
            if held.outcome is not Outcome.reserved:
                return 402
            await ledger.settle(customer, rid, COST_MICROS, key_id="main", usage=usage)
            return 200

        return send

    senders = [sender(customers[i % len(customers)]) for i in range(ns.concurrency)]
    if ns.cluster:
        # redis-py's async RedisCluster initialises itself on its first command, and many
        # first commands at once race (closed writers: AttributeError/RuntimeError); the
        # sidecar is initialised by loading the scripts before it serves. Since budget trees
        # the Ledger reads each customer's place in sg:tree over redis-py (cached 1 s).
        await redis.initialize()
    try:
        return await drive(ns.target, senders, ns.duration, ns.warmup, "ledger")
    finally:
        await channel.close()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--redis", required=True, help="Redis URL (any node of a Cluster)")
    parser.add_argument("--cluster", action="store_true", help="the URL is a Redis Cluster node")
    parser.add_argument("--customers", required=True, help="comma-separated customer ids")
    ns = parser.parse_args(argv)
    print(json.dumps(asdict(run(ledger_load(ns)))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
