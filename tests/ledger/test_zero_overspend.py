"""Zero overspend, proved: 1,000 concurrent token-priced requests over 3 sidecar processes.

The prompt is non-ASCII text whose real token count (here: its UTF-8 bytes, the worst a
byte-level tokenizer can do) is far above the old "characters / 4" estimate, and clients ask
for more output than the rule allows. Every answer is 200 or 402, the balance never goes
below zero (sampled throughout), nothing is absorbed, and the ledger adds up to the micro-unit.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import redis.asyncio.cluster
from aiohttp import web
from aiohttp.test_utils import TestServer

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.models import parse_resource
from tests.support.sidecar_env import ACME_KEY, budget, pricebook
from tests.support.sidecar_processes import free_port, wait_ready

REQUESTS = 1_000
FUNDING = 170_000_000  # the budget's 170.00: about 250 requests at the rule's bound
PROMPT = "héllo wörld, ünïcödé 東京 " * 8  # 8 x 33 bytes, but only 8 x 24 characters
PRICEBOOK = pricebook(
    {
        "name": "chat",
        "match": {"path": "/v1/chat/completions"},
        "price": {"perMillionInputTokens": "1000", "perMillionOutputTokens": "2000"},
        "promptOverhead": {"perMessage": 4, "perRequest": 8},
        "maxOutputTokens": 200,
        "minOutputTokens": 10,
        "maximum": "5.00",
        "timeout": "30s",
    }
)


def worst_case_model() -> web.Application:
    """Reports a token per prompt byte and every output token it was allowed."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt = sum(len(m["content"].encode()) for m in body["messages"])
        output = body.get("max_completion_tokens", body.get("max_tokens", 100_000))
        usage = {"prompt_tokens": prompt, "completion_tokens": output}
        return web.json_response({"choices": [{"message": {"content": "x"}}], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _sidecars(
    upstream: str, redis_url: str, cluster: bool, fail_mode: str, journal: Path
) -> list[Any]:
    spendgate = Path(sys.executable).parent / "spendgate"
    env = {**os.environ, "SPENDGATE_REDIS_URL": redis_url, "SPENDGATE_LOG_LEVEL": "ERROR",
           # 1,000 requests on 2 shared cores queue for seconds: they wait, nobody times out.
           "SPENDGATE_REDIS_TIMEOUT": "10s", "SPENDGATE_REDIS_POOL_SIZE": "64"}  # fmt: skip
    if cluster:
        env["SPENDGATE_REDIS_CLUSTER"] = "1"
    procs = []
    for index in range(3):
        port, probe_port = free_port(), free_port()
        command = [str(spendgate), "sidecar", "--upstream", upstream,
                   "--listen", f"127.0.0.1:{port}", "--probe-listen", f"127.0.0.1:{probe_port}",
                   "--fail-mode", fail_mode, "--journal-dir", str(journal / f"sidecar-{index}"),
                   "--pod", f"sidecar-{index}"]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append((port, probe_port, proc))
    return procs


async def _metrics(probe_port: int) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{probe_port}/metrics") as resp,
    ):
        return await resp.text()


async def _lowest_balance(client: Any, stop: asyncio.Event) -> int:
    lowest = 1 << 62
    while not stop.is_set():
        lowest = min(lowest, int(await client.hget("sg:{acme}:acct", "balance") or 0))
        await asyncio.sleep(0.005)
    return lowest


@pytest.mark.parametrize(
    ("target", "fail_mode"),
    [
        ("single", "closed"),
        ("single", "open"),  # Redis healthy: fail-open serves nothing unreserved
        pytest.param("cluster", "closed", marks=pytest.mark.cluster),
    ],
)
async def test_1000_token_priced_requests_never_overspend(
    target: str, fail_mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cluster = target == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    client: Any = (
        redis.asyncio.cluster.RedisCluster.from_url(url)
        if cluster
        else redis.asyncio.Redis.from_url(url)
    )
    store = ConfigStore(client)
    await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
    acme: Any = parse_resource(budget("acme", "170.00"))
    await store.apply_budget(acme, {"main": ACME_KEY})
    ledger = Ledger(client)
    upstream = TestServer(worst_case_model(), host="127.0.0.1")
    await upstream.start_server()
    procs = _sidecars(str(upstream.make_url("")).rstrip("/"), url, cluster, fail_mode, tmp_path)
    try:
        for _, probe_port, proc in procs:
            await asyncio.to_thread(wait_ready, probe_port, proc)
        stop = asyncio.Event()
        watcher = asyncio.create_task(_lowest_balance(client, stop))
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 300}
        )
        headers = {"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=REQUESTS)) as http:

            async def one(index: int) -> int:
                port = procs[index % len(procs)][0]
                url_ = f"http://127.0.0.1:{port}/v1/chat/completions"
                async with http.post(url_, data=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            statuses = Counter(await asyncio.gather(*(one(i) for i in range(REQUESTS))))
        for _ in range(200):  # settlements run after the responses
            if (await ledger.account("acme")).held == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        lowest = await watcher
        account = await ledger.account("acme")
        entries = await ledger.ledger_entries("acme", 10 * REQUESTS)
        usage = [e for e in entries if e["type"] == "usage"]
        assert set(statuses) <= {200, 402}, statuses
        # The bound is tight: about as many are served as the worst case allows (249 here).
        assert statuses[200] >= 0.9 * FUNDING / 682_000
        assert lowest >= 0 and account.balance >= 0
        assert account.held == 0
        assert account.absorbed == 0
        assert sum(int(e["absorbed"]) for e in usage) == 0
        assert len(usage) == statuses[200]
        assert sum(int(e["cost"]) for e in usage) == FUNDING - account.balance
        # Fail-open or not, with Redis healthy every request was reserved: none unreserved.
        assert all(int(e["estimate"]) > 0 for e in usage)
        for _, probe_port, _ in procs:
            metrics = await _metrics(probe_port)
            assert 'spendgate_decisions_total{outcome="fail_open"}' not in metrics
            assert "spendgate_journal_pending 0.0" in metrics
        for index in range(len(procs)):  # nothing was ever journaled
            assert (tmp_path / f"sidecar-{index}" / "journal.jsonl").read_bytes() == b""
    finally:
        for _, _, proc in procs:
            proc.terminate()
        for _, _, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await upstream.close()
        await client.aclose()
