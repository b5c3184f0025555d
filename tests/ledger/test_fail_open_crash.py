"""Fail-open survives a crash: Redis down, the sidecar killed with SIGKILL and restarted.

A real ``spendgate sidecar`` process serves two customers fail-open while Redis is down (each
up to its allowance), is killed with ``kill -9`` (its journal then gets a torn last line, as a
kill in the middle of a write leaves it), and is restarted with Redis still down: the
allowance used before the crash is still used. Once Redis is back, every charge served
unreserved is on the ledger exactly once and each balance is its funding less those charges.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp.test_utils import TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from spendgate.sidecar.standin import StandinConfig
from spendgate.sidecar.standin import create_app as create_standin
from tests.support.redis_servers import RedisServer
from tests.support.sidecar_env import ACME_KEY, OTHER_KEY, PRICEBOOK, budget
from tests.support.sidecar_processes import free_port

CENT = 10_000
FUNDING = 10_000_000
KEYS = {"acme": ACME_KEY, "other": OTHER_KEY}


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    yield server
    server.close()


def _alive(probe_port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """``/healthz`` answers (``/readyz`` needs Redis, which is down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode()[-2000:] if proc.stdout else ""
            raise AssertionError(f"sidecar exited early: {out}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("sidecar not alive")


async def _metrics(probe_port: int) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{probe_port}/metrics") as resp,
    ):
        return await resp.text()


def _start(upstream: str, redis_url: str, journal: Path) -> tuple[int, int, Any]:
    port, probe_port = free_port(), free_port()
    command = [
        str(Path(sys.executable).parent / "spendgate"), "sidecar", "--upstream", upstream,
        "--listen", f"127.0.0.1:{port}", "--probe-listen", f"127.0.0.1:{probe_port}",
        "--redis", redis_url, "--fail-mode", "open", "--journal-dir", str(journal),
        "--fail-open-allowance", "0.05", "--redis-timeout", "300ms", "--pod", "model-0",
    ]  # fmt: skip
    env = {**os.environ, "SPENDGATE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _alive(probe_port, proc)
    return port, probe_port, proc


async def _send(port: int, customer: str, count: int) -> list[tuple[int, str]]:
    headers = {"Authorization": f"Bearer {KEYS[customer]}"}
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[int, str]:
            async with http.post(f"http://127.0.0.1:{port}/echo", data=b"{}", headers=headers) as r:
                await r.read()
                return r.status, r.headers.get("X-Spendgate-Request-Id", "")

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def test_fail_open_charges_survive_kill_9_and_land_exactly_once(
    durable_redis: RedisServer, tmp_path: Path
) -> None:
    client: Any = redis.asyncio.Redis.from_url(durable_redis.url)
    store = ConfigStore(client)
    await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    for customer, key in KEYS.items():
        await store.apply_budget(parse_resource(budget(customer, "10.00")), {"main": key})  # type: ignore[arg-type]
    await client.aclose()
    upstream = TestServer(create_standin(StandinConfig()), host="127.0.0.1")
    await upstream.start_server()
    model = str(upstream.make_url("")).rstrip("/")
    journal = tmp_path / "journal"
    procs: list[Any] = []
    try:
        port, _, first = _start(model, durable_redis.url, journal)
        procs.append(first)
        durable_redis.stop()  # Redis goes away: connections refused
        served: dict[str, list[str]] = {}
        for customer in KEYS:
            answers = await _send(port, customer, 8)
            assert Counter(status for status, _ in answers) == {200: 5, 503: 3}
            served[customer] = [rid for status, rid in answers if status == 200]

        first.kill()  # kill -9: no shutdown, no flush beyond what was fsync'd
        first.wait(timeout=10)
        with (journal / "journal.jsonl").open("ab") as file:
            file.write(b'{"v":1,"op":"charge","id":"torn-')  # a write cut by the kill
        port, probe_port, second = _start(model, durable_redis.url, journal)
        procs.append(second)
        # Still down: what was served before the crash still counts against the allowances.
        metrics = await _metrics(probe_port)
        assert "spendgate_fail_open_used_micros 100000.0" in metrics  # 2 x 0.05
        assert "spendgate_journal_pending 10.0" in metrics
        for customer in KEYS:
            assert {status for status, _ in await _send(port, customer, 2)} == {503}

        durable_redis.start()
        client = redis.asyncio.Redis.from_url(durable_redis.url)
        ledger = Ledger(client)
        try:
            deadline = time.monotonic() + 20
            while True:
                usage = {
                    c: [e for e in await ledger.ledger_entries(c, 100) if e["type"] == "usage"]
                    for c in KEYS
                }
                if all(len(entries) >= 5 for entries in usage.values()):
                    break
                assert time.monotonic() < deadline, f"not reconciled: {usage}"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # a second settle, if there were one, would show by now
            for customer in KEYS:
                entries = [e for e in await ledger.ledger_entries(customer, 100)]
                ids = Counter(e["request_id"] for e in entries if e["type"] == "usage")
                assert ids == Counter(served[customer])  # every charge, exactly once
                charged = sum(int(e["cost"]) for e in entries if e["type"] == "usage")
                assert charged == 5 * CENT
                account = await ledger.account(customer)
                assert account.balance == FUNDING - charged
                assert account.held == 0
            deadline = time.monotonic() + 10
            while (journal / "journal.jsonl").stat().st_size:  # all acknowledged: compacted
                assert time.monotonic() < deadline, "journal not compacted"
                await asyncio.sleep(0.1)
            assert {status for status, _ in await _send(port, "acme", 2)} == {200}
        finally:
            await client.aclose()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await upstream.close()
