"""No overspend under concurrency: a balance that pays for exactly k requests serves exactly k."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio
from aiohttp.test_utils import TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.sidecar.standin import StandinConfig
from spendgate.sidecar.standin import create_app as create_standin
from tests.support.sidecar_env import ACME_KEY, PRICEBOOK, budget, data_plane
from tests.support.sidecar_processes import free_port, wait_ready

REQUESTS = 500
SERVABLE = 37  # /echo costs a flat 0.01; the balance pays for exactly this many


async def _fire(session: aiohttp.ClientSession, urls: list[str]) -> Counter[int]:
    async def one(index: int) -> int:
        url = urls[index % len(urls)]
        async with session.post(
            f"{url}/echo", data=b"{}", headers={"Authorization": f"Bearer {ACME_KEY}"}
        ) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return Counter(statuses)


async def _watch_balance(client: redis.asyncio.Redis, stop: asyncio.Event) -> int:
    lowest = 1 << 62
    while not stop.is_set():
        raw = await client.hget("sg:{acme}:acct", "balance")
        lowest = min(lowest, int(raw or 0))
        await asyncio.sleep(0.002)
    return lowest


async def test_500_concurrent_requests_serve_exactly_k(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance=f"0.{SERVABLE:02d}") as plane:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_balance(plane.redis, stop))
        connector = aiohttp.TCPConnector(limit=REQUESTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = await _fire(session, [str(plane.client.make_url("")).rstrip("/")])
        await plane.settled()
        stop.set()
        lowest = await watcher
        assert statuses == {200: SERVABLE, 402: REQUESTS - SERVABLE}
        account = await plane.account()
        assert account.balance == 0
        assert account.held == 0
        assert lowest >= 0
        usage = [e for e in await plane.ledger.ledger_entries("acme", 1000) if e["type"] == "usage"]
        assert len(usage) == SERVABLE


def _decisions(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("spendgate_decisions_total{")
    )


def _start_sidecars(
    upstream_url: str, redis_url: str, ports: list[int], probe_ports: list[int]
) -> list[Any]:
    """`spendgate sidecar` processes sharing one Redis, as separate pods would."""
    spendgate = Path(sys.executable).parent / "spendgate"
    env = {**os.environ, "SPENDGATE_REDIS_URL": redis_url}
    procs = []
    for index, (port, probe_port) in enumerate(zip(ports, probe_ports, strict=True)):
        command = [str(spendgate), "sidecar", "--upstream", upstream_url,
                   "--listen", f"127.0.0.1:{port}", "--probe-listen", f"127.0.0.1:{probe_port}",
                   "--pricebook", "default/default",
                   "--pod", f"sidecar-{index}"]  # fmt: skip
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return procs


async def test_three_sidecar_processes_share_one_balance(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    store = ConfigStore(client)
    await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    await store.apply_budget(
        parse_resource(budget("acme", f"0.{SERVABLE:02d}")),  # type: ignore[arg-type]
        {"main": ACME_KEY},
    )
    upstream = TestServer(create_standin(StandinConfig()), host="127.0.0.1")
    await upstream.start_server()
    ports, probe_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    procs = _start_sidecars(str(upstream.make_url("")).rstrip("/"), redis_url, ports, probe_ports)
    try:
        for probe_port, proc in zip(probe_ports, procs, strict=True):
            await asyncio.to_thread(wait_ready, probe_port, proc, 20.0)
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_balance(client, stop))
        connector = aiohttp.TCPConnector(limit=REQUESTS)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = await _fire(session, [f"http://127.0.0.1:{port}" for port in ports])
        ledger = Ledger(client)
        for _ in range(100):  # settlements run after the responses
            if (await ledger.account("acme")).held == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        lowest = await watcher
        assert statuses == {200: SERVABLE, 402: REQUESTS - SERVABLE}
        account = await ledger.account("acme")
        assert account.balance == 0
        assert account.held == 0
        assert lowest >= 0
        usage = [e for e in await ledger.ledger_entries("acme", 1000) if e["type"] == "usage"]
        assert len(usage) == SERVABLE
        for probe_port in probe_ports:  # every process took part in the race
            assert await asyncio.to_thread(_decisions, probe_port) > 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await upstream.close()
        await client.aclose()
