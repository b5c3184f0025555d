"""`make bench`: what spendgate's metering costs, against a model that costs nothing.

Starts, as separate processes: a throwaway redis-server, the stand-in model (0 latency),
``benchmarks/bare_proxy.py`` (an aiohttp pass-through proxy: the floor for this design) and
the spendgate sidecar with full metering, with 10,000 budgets configured. Then a load
generator -- its own process, a minimal keep-alive HTTP/1.1 client on uvloop -- sends small
non-streaming chat completions (max_tokens 16) to each of

    direct   the stand-in model
    bare     the bare proxy in front of it
    sidecar  the spendgate sidecar in front of it (key lookup, pricing, reserve, settle)

at concurrency 1 and 32, each for ``--duration`` seconds after ``--warmup``. It reports req/s,
p50/p99 latency, the CPU each process used per request, the sidecar's memory (VmRSS) and the
two ratios spendgate aims for: sidecar p50 added latency vs direct at 1 connection (target
<= 0.5 ms) and sidecar / bare proxy throughput at 32 (target >= 0.6). It also checks that every
request the sidecar served was settled on the ledger.

The whole run takes about a minute. Everything shares the machine's cores (2 here): the load
generator, the proxy under test, the model and Redis compete for them, so absolute numbers
are lower than on separate hosts; the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spendgate.local_processes import (
    CLK_TCK,
    HOST,
    Child,
    Processes,
    StartupFailure,
    accepts,
    free_port,
    http_ok,
    sigterm_as_interrupt,
    start_redis,
    wait_until,
)

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SPENDGATE = str(BIN / "spendgate") if (BIN / "spendgate").exists() else "spendgate"
PATH = "/v1/chat/completions"
BENCH_KEY = "sk-bench-0123456789abcdef0123"
BUDGETS = 10_000
CONCURRENCIES = (1, 32)
TARGETS = ("direct", "bare", "sidecar")
ADDED_LATENCY_TARGET_MS = 0.5
THROUGHPUT_RATIO_TARGET = 0.6
RSS_TARGET_MB = 100.0
STARTUP_TIMEOUT_S = 30.0

PRICEBOOK: dict[str, Any] = {
    "apiVersion": "spendgate.dev/v1alpha1",
    "kind": "PriceBook",
    "metadata": {"name": "bench", "namespace": "default"},
    "spec": {
        "currency": "USD",
        "unmatched": "deny",
        "rules": [
            {
                "name": "chat",
                "match": {"methods": ["POST"], "path": PATH},
                "price": {
                    "flat": "0.0001",
                    "perMillionInputTokens": "0.50",
                    "perMillionOutputTokens": "1.50",
                },
                "estimate": {"outputTokens": 256},
                "maximum": "0.50",
                "timeout": "10m",
                "onUpstreamError": "free",
                "onClientDisconnect": "metered",
            }
        ],
    },
}


def budget(customer: str, balance: str, rate_limits: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": customer, "namespace": "default"},
        "spec": {
            "customerId": customer,
            "mode": "prepaid",
            "currency": "USD",
            "balance": balance,
            "rateLimits": rate_limits,
            "apiKeys": [{"name": "main", "secretRef": {"name": f"{customer}-keys"}}],
        },
    }


# The measured customer: an enormous balance, generous limits that are still checked.
BENCH_BUDGET = budget(
    "bench",
    "100000000.00",
    [{"requests": 1_000_000, "per": "second"}, {"cost": "1000000.00", "per": "hour"}],
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# =========================================================================== load generator


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending one request at a time.

    Just enough HTTP for this benchmark: responses framed by Content-Length or chunked
    encoding (no trailers). Far cheaper per request than a full client, so on a 2-core machine
    the servers get as much CPU as possible.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            status = self._parse()
            if status is not None:
                self.waiter.set_result(status)

    def _parse(self) -> int | None:
        """The status of the complete response at the head of the buffer, which is consumed."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[:end]).lower()
        status = int(head[9:12])
        body_start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            total = body_start + int(head[at + 17 : stop if stop >= 0 else None])
        elif b"\r\ntransfer-encoding: chunked" in head:
            chunked_end = self._chunked_end(body_start)
            if chunked_end is None:
                return None
            total = chunked_end
        else:
            total = body_start  # 204/304: no body
        if len(buffer) < total:
            return None
        del buffer[:total]
        return status

    def _chunked_end(self, position: int) -> int | None:
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
            if size == 0:
                return line_end + 4 if len(buffer) >= line_end + 4 else None
            position = line_end + 2 + size + 2
            if position > len(buffer):
                return None

    async def request(self, payload: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter


@dataclass
class LoadResult:
    target: str
    concurrency: int
    client: str
    duration_s: float
    requests: int  # completed inside the measured window
    total_requests: int  # including warm-up
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    statuses: dict[str, int]
    loadgen_cpu_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per server process, in the run
    machine_busy_s: float = 0.0  # every process on the machine, same window

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))


def chat_body() -> bytes:
    body = {
        "model": "standin",
        "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly please"}],
        "max_tokens": 16,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def raw_request(host: str, port: int, key: str) -> bytes:
    body = chat_body()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


Sender = Callable[[], Awaitable[int]]


async def raw_senders(url: str, key: str, concurrency: int) -> list[Sender]:
    host, port = url.removeprefix("http://").split(":")
    payload = raw_request(host, int(port), key)
    loop = asyncio.get_running_loop()
    senders: list[Sender] = []
    for _ in range(concurrency):
        _, connection = await loop.create_connection(HttpConnection, host, int(port))

        def send(connection: HttpConnection = connection) -> Awaitable[int]:
            return connection.request(payload)

        senders.append(send)
    return senders


async def aiohttp_senders(
    url: str, key: str, concurrency: int, stack: contextlib.AsyncExitStack
) -> list[Sender]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
    body = chat_body()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def send() -> int:
        async with session.post(url + PATH, data=body, headers=headers) as response:
            await response.read()
            return response.status

    return [send] * concurrency


async def generate_load(
    target: str, url: str, key: str, concurrency: int, duration: float, warmup: float, client: str
) -> LoadResult:
    async with contextlib.AsyncExitStack() as stack:
        if client == "raw":
            senders = await raw_senders(url, key, concurrency)
        else:
            senders = await aiohttp_senders(url, key, concurrency, stack)
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        total = 0
        clock = time.perf_counter
        start = clock()
        measure_from, measure_to = start + warmup, start + warmup + duration
        cpu_before: list[float] = []

        async def worker(send: Sender) -> None:
            nonlocal total
            while True:
                sent = clock()
                if sent >= measure_to:
                    return
                status = await send()
                total += 1
                if sent >= measure_from:
                    latencies.append(clock() - sent)
                    statuses[str(status)] += 1

        async def mark_cpu() -> None:
            await asyncio.sleep(warmup)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_before.append(usage.ru_utime + usage.ru_stime)

        await asyncio.gather(mark_cpu(), *(worker(send) for send in senders))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        loadgen_cpu = usage.ru_utime + usage.ru_stime - cpu_before[0]
    if not latencies:
        raise SystemExit(f"no request to {target} completed in the measured window")
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return LoadResult(
        target=target,
        concurrency=concurrency,
        client=client,
        duration_s=duration,
        requests=len(latencies),
        total_requests=total,
        rps=len(latencies) / duration,
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        mean_ms=statistics.fmean(latencies) * 1000,
        max_ms=latencies[-1] * 1000,
        statuses=dict(statuses),
        loadgen_cpu_s=loadgen_cpu,
    )


def load_main(ns: argparse.Namespace) -> int:
    """``--role load``: one measurement, printed as JSON on stdout."""
    coroutine = generate_load(
        ns.target, ns.url, ns.key, ns.concurrency, ns.duration, ns.warmup, ns.client
    )
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coroutine)
    else:
        result = uvloop.run(coroutine)
    print(json.dumps(asdict(result)))
    return 0


def upstream_main(ns: argparse.Namespace) -> int:
    """``--role upstream``: the stand-in model on uvloop, 0 latency."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from spendgate.sidecar.standin import main as standin_main

    return standin_main(["--host", HOST, "--port", str(ns.port)])


# =========================================================================== processes


class BenchFailure(Exception):
    pass


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# =========================================================================== configuration


async def configure(redis_url: str, budgets: int) -> float:
    """PriceBook, the bench budget and ``budgets`` more, each with one key; returns seconds."""
    import redis.asyncio

    from spendgate.config_store import ConfigStore
    from spendgate.models import parse_resource

    started = time.perf_counter()
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=64)
    try:
        store = ConfigStore(client)
        await store.apply_pricebook(parse_resource(PRICEBOOK))  # type: ignore[arg-type]
        await store.apply_budget(parse_resource(BENCH_BUDGET), {"main": BENCH_KEY})  # type: ignore[arg-type]
        limits = [{"requests": 600, "per": "minute"}]
        semaphore = asyncio.Semaphore(48)

        async def one(index: int) -> None:
            customer = f"customer-{index:05d}"
            manifest = budget(customer, f"{10 + index % 90}.00", limits)
            key = f"sk-bench-{index:05d}-{os.urandom(8).hex()}"
            async with semaphore:
                await store.apply_budget(parse_resource(manifest), {"main": key})  # type: ignore[arg-type]

        await asyncio.gather(*(one(i) for i in range(budgets)))
        configured = await client.hlen("sg:customers")
        if configured < budgets + 1:
            raise BenchFailure(f"only {configured} budgets configured, expected {budgets + 1}")
    finally:
        await client.aclose()
    return time.perf_counter() - started


async def ledger_check(redis_url: str) -> dict[str, Any]:
    """The bench customer's account once every settlement has landed."""
    import redis.asyncio

    from spendgate.keys import for_customer
    from spendgate.ledger import Ledger

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        ledger = Ledger(client)
        deadline = time.monotonic() + 10
        account = await ledger.account("bench")
        while account.held and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            account = await ledger.account("bench")
        entries = await client.xlen(for_customer("bench").ledger)
        return {
            "ledger_entries": entries,
            "charged_micros": account.charged,
            "held_micros": account.held,
            "redis_used_memory_mb": round((await client.info("memory"))["used_memory"] / 2**20, 1),
        }
    finally:
        await client.aclose()


# =========================================================================== the run


@dataclass
class Setup:
    procs: Processes
    redis_url: str
    urls: dict[str, str]
    servers: dict[str, Child]  # name -> process, for CPU accounting
    configure_s: float


def start_everything(procs: Processes, budgets: int) -> Setup:
    redis_child, redis_url = start_redis(procs, timeout=STARTUP_TIMEOUT_S)

    model_port, bare_port, sidecar_port = free_port(), free_port(), free_port()
    probe_port = free_port()
    model = procs.start(
        "upstream", [sys.executable, __file__, "--role", "upstream", "--port", str(model_port)]
    )
    bare = procs.start(
        "bare-proxy",
        [
            sys.executable, str(HERE / "bare_proxy.py"),
            "--upstream", f"http://{HOST}:{model_port}", "--listen", f"{HOST}:{bare_port}",
        ],
    )  # fmt: skip
    log(f"configuring a PriceBook and {budgets + 1} budgets ...")
    try:
        import uvloop

        configure_s = uvloop.run(configure(redis_url, budgets))
    except ImportError:
        configure_s = asyncio.run(configure(redis_url, budgets))
    log(f"  done in {configure_s:.1f} s")
    sidecar = procs.start(
        "sidecar",
        [
            SPENDGATE, "sidecar", "--upstream", f"http://{HOST}:{model_port}",
            "--listen", f"{HOST}:{sidecar_port}", "--probe-listen", f"{HOST}:{probe_port}",
            "--pricebook", "default/bench",
            "--redis", redis_url, "--pod", "bench", "--log-level", "WARNING",
        ],
    )  # fmt: skip
    wait_until(model, "listening", accepts(model_port), timeout=STARTUP_TIMEOUT_S)
    wait_until(bare, "listening", accepts(bare_port), timeout=STARTUP_TIMEOUT_S)
    wait_until(
        sidecar, "ready", http_ok(f"http://{HOST}:{probe_port}/readyz"), timeout=STARTUP_TIMEOUT_S
    )
    return Setup(
        procs=procs,
        redis_url=redis_url,
        urls={
            "direct": f"http://{HOST}:{model_port}",
            "bare": f"http://{HOST}:{bare_port}",
            "sidecar": f"http://{HOST}:{sidecar_port}",
        },
        servers={"upstream": model, "bare": bare, "sidecar": sidecar, "redis": redis_child},
        configure_s=configure_s,
    )


def measure(setup: Setup, target: str, concurrency: int, ns: argparse.Namespace) -> LoadResult:
    argv = [
        sys.executable, __file__, "--role", "load", "--target", target,
        "--url", setup.urls[target], "--key", BENCH_KEY, "--concurrency", str(concurrency),
        "--duration", str(ns.duration), "--warmup", str(ns.warmup), "--client", ns.client,
    ]  # fmt: skip
    loadgen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # CPU of each server during the measured window only (the load generator starts in ~0.3 s).
    time.sleep(ns.warmup + 0.3)
    before = {name: child.cpu_seconds() for name, child in setup.servers.items()}
    busy_before = machine_busy_seconds()
    marked = time.monotonic()
    try:
        stdout, stderr = loadgen.communicate(timeout=ns.duration + ns.warmup + 30)
    except subprocess.TimeoutExpired:
        loadgen.kill()
        raise BenchFailure(f"load generator for {target} c={concurrency} hung") from None
    elapsed = time.monotonic() - marked
    after = {name: child.cpu_seconds() for name, child in setup.servers.items()}
    busy = machine_busy_seconds() - busy_before
    if loadgen.returncode != 0:
        raise BenchFailure(f"load generator failed ({loadgen.returncode}):\n{stderr}")
    data = json.loads(stdout)
    result = LoadResult(**data)
    # Scale to the measured window: the sampling window is a little off the generator's.
    scale = ns.duration / elapsed if elapsed > 0 else 1.0
    result.cpu_s = {name: (after[name] - before[name]) * scale for name in setup.servers}
    result.machine_busy_s = busy * scale
    return result


def cpu_us_per_request(result: LoadResult, process: str) -> float:
    return result.cpu_s.get(process, 0.0) / max(1, result.requests) * 1e6


def report(
    results: list[LoadResult], memory: dict[str, Any], ledger: dict[str, Any], setup_s: float
) -> dict[str, Any]:
    by = {(r.target, r.concurrency): r for r in results}
    direct1, sidecar1 = by.get(("direct", 1)), by.get(("sidecar", 1))
    bare1 = by.get(("bare", 1))
    bare32, sidecar32 = by.get(("bare", 32)), by.get(("sidecar", 32))
    ratios: dict[str, Any] = {}
    if direct1 and sidecar1:
        added = sidecar1.p50_ms - direct1.p50_ms
        ratios["sidecar_added_p50_ms_c1"] = round(added, 3)
        ratios["sidecar_added_p50_ms_c1_ok"] = added <= ADDED_LATENCY_TARGET_MS
    if direct1 and bare1:
        ratios["bare_added_p50_ms_c1"] = round(bare1.p50_ms - direct1.p50_ms, 3)
    if bare32 and sidecar32:
        ratio = sidecar32.rps / bare32.rps if bare32.rps else 0.0
        ratios["sidecar_vs_bare_rps_c32"] = round(ratio, 3)
        ratios["sidecar_vs_bare_rps_c32_ok"] = ratio >= THROUGHPUT_RATIO_TARGET
    served = sum(r.total_requests for r in results if r.target == "sidecar")
    ledger["sidecar_requests_sent"] = served
    ledger["all_settled"] = ledger["usage_entries"] == served and ledger["held_micros"] == 0
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "setup_s": round(setup_s, 1),
        "results": [
            {
                **asdict(r),
                "cpu_us_per_request": {
                    name: round(cpu_us_per_request(r, name), 1) for name in r.cpu_s
                },
            }
            for r in results
        ],
        "ratios": ratios,
        "memory": memory,
        "ledger": ledger,
    }


def print_table(doc: dict[str, Any]) -> None:
    print(f"\nspendgate benchmark  ({doc['machine']['cpus']} CPUs shared by load generator,")
    print("proxy, stand-in model and Redis; non-streaming chat, max_tokens 16, 0 ms model)\n")
    header = (
        f"{'target':<8} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
        f"   {'CPU us/req: proxy':>17} {'model':>6} {'redis':>6} {'loadgen':>7}"
        f"  {'others':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in doc["results"]:
        cpu = row["cpu_us_per_request"]
        proxy = cpu.get(row["target"], 0.0) if row["target"] != "direct" else 0.0
        loadgen = row["loadgen_cpu_s"] / max(1, row["requests"]) * 1e6
        errors = sum(n for s, n in row["statuses"].items() if not s.startswith("2"))
        ours = sum(row["cpu_s"].values()) + row["loadgen_cpu_s"]
        others = max(0.0, row["machine_busy_s"] - ours) / row["duration_s"]
        print(
            f"{row['target']:<8} {row['concurrency']:>5} {row['rps']:>8.0f}"
            f" {row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} {errors:>6}"
            f"   {proxy if proxy else '-':>17} {cpu.get('upstream', 0):>6.0f}"
            f" {cpu.get('redis', 0):>6.0f} {loadgen:>7.0f}  {others:>6.2f}"
        )
    print(
        "\nCPU us/req: CPU time each process used per measured request; others: cores busy"
        "\nwith processes outside this benchmark during the run (noise when > 0)."
    )
    ratios, memory, ledger = doc["ratios"], doc["memory"], doc["ledger"]

    def verdict(ok: bool | None) -> str:
        return "ok" if ok else "MISSED"

    print()
    if "sidecar_added_p50_ms_c1" in ratios:
        print(
            f"sidecar p50 added latency vs direct, 1 conn : {ratios['sidecar_added_p50_ms_c1']:.3f}"
            f" ms   (target <= {ADDED_LATENCY_TARGET_MS} ms: "
            f"{verdict(ratios['sidecar_added_p50_ms_c1_ok'])}; bare proxy adds"
            f" {ratios.get('bare_added_p50_ms_c1', float('nan')):.3f} ms)"
        )
    if "sidecar_vs_bare_rps_c32" in ratios:
        print(
            f"sidecar / bare proxy throughput, 32 conns   : {ratios['sidecar_vs_bare_rps_c32']:.2f}"
            f"       (target >= {THROUGHPUT_RATIO_TARGET}:"
            f" {verdict(ratios['sidecar_vs_bare_rps_c32_ok'])})"
        )
    print(
        f"sidecar memory, {memory['budgets']} budgets configured  : VmRSS"
        f" {memory['rss_idle_mb']:.1f} MB idle, {memory['rss_after_mb']:.1f} MB after load,"
        f" peak {memory['hwm_mb']:.1f} MB (target < {RSS_TARGET_MB:.0f} MB: "
        f"{verdict(memory['ok'])}); bare proxy {memory['bare_rss_mb']:.1f} MB"
    )
    print(
        f"metering check: {ledger['sidecar_requests_sent']} requests through the sidecar,"
        f" {ledger['usage_entries']} usage entries on the ledger, held now"
        f" {ledger['held_micros']} -> "
        + ("every request settled" if ledger["all_settled"] else "MISMATCH")
    )


def bench_main(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    procs = Processes(Path(tempfile.mkdtemp(prefix="spendgate-bench-")))
    try:
        with sigterm_as_interrupt():
            setup = start_everything(procs, ns.budgets)
            sidecar = setup.servers["sidecar"]
            time.sleep(0.5)
            idle = sidecar.memory_kb()
            entries_before = asyncio.run(ledger_check(setup.redis_url))["ledger_entries"]
            results: list[LoadResult] = []
            for concurrency in ns.concurrency:
                for target in TARGETS:
                    log(f"measuring {target:<7} at {concurrency:>2} connections ...")
                    result = measure(setup, target, concurrency, ns)
                    log(
                        f"  {result.rps:8.0f} req/s  p50 {result.p50_ms:.3f} ms"
                        f"  p99 {result.p99_ms:.3f} ms  errors {result.errors}"
                    )
                    results.append(result)
            after = sidecar.memory_kb()
            bare = setup.servers["bare"].memory_kb()
            ledger = asyncio.run(ledger_check(setup.redis_url))
            ledger["usage_entries"] = ledger.pop("ledger_entries") - entries_before
            for child in procs.children:
                if not child.alive():
                    raise BenchFailure(f"{child.name} died during the benchmark")
    except (BenchFailure, StartupFailure) as failure:
        log(f"\nBENCHMARK FAILED: {failure}\n{procs.tails()}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted; stopping everything")
        return 130
    finally:
        procs.close()
    memory = {
        "budgets": ns.budgets + 1,
        "rss_idle_mb": idle["VmRSS"] / 1024,
        "rss_after_mb": after["VmRSS"] / 1024,
        "hwm_mb": after["VmHWM"] / 1024,
        "bare_rss_mb": bare["VmRSS"] / 1024,
        "ok": after["VmHWM"] / 1024 < RSS_TARGET_MB,
    }
    doc = report(results, memory, ledger, setup.configure_s)
    doc["total_s"] = round(time.monotonic() - started, 1)
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
        print(f"\n(total {doc['total_s']:.0f} s)")
    errors = sum(r.errors for r in results)
    if errors or not ledger["all_settled"]:
        log(f"\n{errors} requests failed or metering did not add up; see above")
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="load generator: minimal keep-alive HTTP/1.1 client (default) or aiohttp",
    )
    parser.add_argument(
        "--budgets", type=int, default=BUDGETS, help=f"extra budgets configured (default {BUDGETS})"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(CONCURRENCIES),
        help="comma-separated connection counts (default 1,32)",
    )
    # Internal: this file also runs as the load generator and the upstream model.
    parser.add_argument("--role", choices=["bench", "load", "upstream"], default="bench",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.role == "load":
        ns.concurrency = ns.concurrency[0]
        return load_main(ns)
    if ns.role == "upstream":
        return upstream_main(ns)
    return bench_main(ns)


if __name__ == "__main__":
    raise SystemExit(main())
