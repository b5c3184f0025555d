"""`make bench`: what spendgate's metering costs, against a model that costs nothing.

Starts, as separate processes: a throwaway redis-server and a 3-master Redis Cluster (both
from ``spendgate.local_redis``, like the tests), the stand-in model (0 latency),
``benchmarks/bare_proxy.py`` (an aiohttp pass-through proxy: the floor for this design) and
two spendgate sidecars with full metering, one on each Redis, both configured with the same
PriceBook and 32 measured customers, plus 10,000 more budgets (each with a key) on the single
Redis (the memory figure) and 1,000 on the Cluster. Then a load generator -- its own process
(``benchmarks/loadgen.py``) -- sends requests to

    direct          the stand-in model (token-priced chat: non-streaming, max_tokens 16)
    bare            the bare proxy in front of it
    sidecar         the sidecar on the single Redis (key lookup, pricing, reserve, settle)
    cluster         the sidecar on the Cluster, same requests
    images          the sidecar on the single Redis, /v1/images/generations (4 HD images)
                    priced by the CEL rule `images` of examples/pricebook-media.yaml
    ledger          reserve + settle straight through the Ledger (``benchmarks/ledger_load.py``)
    ledger-cluster  the same on the Cluster

at concurrency 1 and 32, each for ``--duration`` seconds after ``--warmup``, all of them
``--rounds`` times in turn (the ratios use the sum of the rounds). Connection *i*
uses the key of measured customer *i*, so 32 connections are 32 customers (spread over the
Cluster's slots). It reports req/s, p50/p99 latency, the CPU each process used per request,
the sidecar's memory (VmRSS), the ratios spendgate aims for, and checks that every request
was settled on the ledger of its Redis. The sidecars' expired-hold sweep is off during the
rows and measured on its own: one pass over every customer of each Redis.

The whole run takes about three minutes. Everything shares the machine's cores (2 here): the
load generator, the proxy under test, the model and Redis compete for them, so absolute
numbers are lower than on separate hosts; the ratios within one run are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench_config import (
    CUSTOMERS,
    MEASURED,
    MEASURED_KEYS,
    configure,
    ledger_totals,
    run_async,
    sweep_cost,
)
from bench_report import print_table, report
from loadgen import LoadResult

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
    wait_until,
)
from spendgate.local_redis import RedisCluster, RedisServer

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SPENDGATE = str(BIN / "spendgate") if (BIN / "spendgate").exists() else "spendgate"
BUDGETS = 10_000
CLUSTER_BUDGETS = 1_000
CONCURRENCIES = (1, 32)
TARGETS = ("direct", "bare", "sidecar", "cluster", "images", "ledger", "ledger-cluster")
STARTUP_TIMEOUT_S = 30.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def upstream_main(port: int) -> int:
    """``--role upstream``: the stand-in model on uvloop, 0 latency."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from spendgate.sidecar.standin import main as standin_main

    return standin_main(["--host", HOST, "--port", str(port)])


class BenchFailure(Exception):
    pass


class Measured(Protocol):
    def cpu_seconds(self) -> float: ...


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# =========================================================================== the run


@dataclass
class Setup:
    redis: RedisServer
    cluster: RedisCluster
    urls: dict[str, str]
    servers: dict[str, Measured]  # name -> process(es), for CPU accounting
    sidecar: Child
    bare: Child
    configure_s: float


def start_sidecar(
    procs: Processes, name: str, model_port: int, redis: list[str]
) -> tuple[Child, str]:
    port, probe = free_port(), free_port()
    child = procs.start(
        name,
        [
            SPENDGATE, "sidecar", "--upstream", f"http://{HOST}:{model_port}",
            "--listen", f"{HOST}:{port}", "--probe-listen", f"{HOST}:{probe}",
            "--pricebook", "default/bench", *redis, "--pod", name, "--log-level", "WARNING",
            "--hold-sweep-interval", "0",  # measured on its own: sweep_cost
        ],
    )  # fmt: skip
    wait_until(child, "ready", http_ok(f"http://{HOST}:{probe}/readyz"), timeout=STARTUP_TIMEOUT_S)
    return child, f"http://{HOST}:{port}"


def start_everything(
    procs: Processes, stack: contextlib.ExitStack, budgets: int, cluster_budgets: int
) -> Setup:
    redis, cluster = RedisServer(), RedisCluster(masters=3)
    stack.callback(redis.close)
    stack.callback(cluster.close)
    redis.start(timeout=STARTUP_TIMEOUT_S)
    cluster.start()

    model_port, bare_port = free_port(), free_port()
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
    log(
        f"configuring a PriceBook and {budgets + CUSTOMERS} budgets on the single Redis,"
        f" {cluster_budgets + CUSTOMERS} on the Cluster ..."
    )
    started = time.perf_counter()

    async def both() -> None:
        await asyncio.gather(
            configure(redis.url, False, budgets), configure(cluster.url, True, cluster_budgets)
        )

    run_async(both())
    configure_s = time.perf_counter() - started
    log(f"  done in {configure_s:.1f} s")
    wait_until(model, "listening", accepts(model_port), timeout=STARTUP_TIMEOUT_S)
    wait_until(bare, "listening", accepts(bare_port), timeout=STARTUP_TIMEOUT_S)
    sidecar, sidecar_url = start_sidecar(procs, "sidecar", model_port, ["--redis", redis.url])
    clustered, cluster_url = start_sidecar(
        procs, "sidecar-cluster", model_port, ["--redis", cluster.url, "--redis-cluster"]
    )
    return Setup(
        redis=redis,
        cluster=cluster,
        urls={
            "direct": f"http://{HOST}:{model_port}",
            "bare": f"http://{HOST}:{bare_port}",
            "sidecar": sidecar_url,
            "cluster": cluster_url,
            "images": sidecar_url,
        },
        servers={
            "upstream": model,
            "bare": bare,
            "sidecar": sidecar,
            "sidecar-cluster": clustered,
            "redis": redis,
            "redis-cluster": cluster,
        },
        sidecar=sidecar,
        bare=bare,
        configure_s=configure_s,
    )


def loadgen_argv(setup: Setup, target: str, concurrency: int, ns: argparse.Namespace) -> list[str]:
    timing = ["--concurrency", str(concurrency), "--duration", str(ns.duration)]
    timing += ["--warmup", str(ns.warmup), "--target", target]
    if target.startswith("ledger"):
        cluster = target == "ledger-cluster"
        url = setup.cluster.url if cluster else setup.redis.url
        return [
            sys.executable, str(HERE / "ledger_load.py"), *timing, "--redis", url,
            *(["--cluster"] if cluster else []), "--customers", ",".join(MEASURED),
        ]  # fmt: skip
    return [
        sys.executable, str(HERE / "loadgen.py"), *timing, "--url", setup.urls[target],
        "--keys", ",".join(MEASURED_KEYS), "--client", ns.client,
        "--kind", "images" if target == "images" else "chat",
    ]  # fmt: skip


def measure(setup: Setup, target: str, concurrency: int, ns: argparse.Namespace) -> LoadResult:
    argv = loadgen_argv(setup, target, concurrency, ns)
    loadgen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # CPU of each server during the measured window only (the load generator starts in ~0.3 s).
    time.sleep(ns.warmup + 0.3)
    before = {name: server.cpu_seconds() for name, server in setup.servers.items()}
    busy_before = machine_busy_seconds()
    marked = time.monotonic()
    try:
        stdout, stderr = loadgen.communicate(timeout=ns.duration + ns.warmup + 30)
    except subprocess.TimeoutExpired:
        loadgen.kill()
        raise BenchFailure(f"load generator for {target} c={concurrency} hung") from None
    elapsed = time.monotonic() - marked
    after = {name: server.cpu_seconds() for name, server in setup.servers.items()}
    busy = machine_busy_seconds() - busy_before
    if loadgen.returncode != 0:
        raise BenchFailure(f"load generator failed ({loadgen.returncode}):\n{stderr}")
    result = LoadResult(**json.loads(stdout))
    # Scale to the measured window: the sampling window is a little off the generator's.
    scale = ns.duration / elapsed if elapsed > 0 else 1.0
    result.cpu_s = {name: (after[name] - before[name]) * scale for name in setup.servers}
    result.machine_busy_s = busy * scale
    return result


def metering(setup: Setup, results: list[LoadResult], before: dict[str, int]) -> dict[str, Any]:
    """Per Redis: every request sent through its sidecar (or its ledger loader) settled."""
    checks: dict[str, Any] = {}
    for name, url, cluster, targets in (
        ("single Redis", setup.redis.url, False, ("sidecar", "images", "ledger")),
        ("Redis Cluster", setup.cluster.url, True, ("cluster", "ledger-cluster")),
    ):
        totals = run_async(ledger_totals(url, cluster))
        sent = sum(r.total_requests for r in results if r.target in targets)
        entries = totals["ledger_entries"] - before[name]
        checks[name] = {
            "requests_sent": sent,
            "usage_entries": entries,
            "held_micros": totals["held_micros"],
            "all_settled": entries == sent and totals["held_micros"] == 0,
        }
    return checks


def bench_main(ns: argparse.Namespace) -> int:
    started = time.monotonic()
    procs = Processes(Path(tempfile.mkdtemp(prefix="spendgate-bench-")))
    stack = contextlib.ExitStack()
    try:
        with sigterm_as_interrupt(), stack:
            setup = start_everything(procs, stack, ns.budgets, ns.cluster_budgets)
            time.sleep(0.5)
            idle = setup.sidecar.memory_kb()
            before = {
                "single Redis": run_async(ledger_totals(setup.redis.url, False))["ledger_entries"],
                "Redis Cluster": run_async(ledger_totals(setup.cluster.url, True))[
                    "ledger_entries"
                ],
            }
            results: list[LoadResult] = []
            for concurrency in ns.concurrency:
                for target in [t for _ in range(ns.rounds) for t in ns.targets]:
                    log(f"measuring {target:<14} at {concurrency:>2} connections ...")
                    result = measure(setup, target, concurrency, ns)
                    log(
                        f"  {result.rps:8.0f} req/s  p50 {result.p50_ms:.3f} ms"
                        f"  p99 {result.p99_ms:.3f} ms  errors {result.errors}"
                    )
                    results.append(result)
            after = setup.sidecar.memory_kb()
            bare = setup.bare.memory_kb()
            checks = metering(setup, results, before)
            log("one pass of the expired-hold sweep on each Redis ...")
            sweeps = {
                "single Redis": run_async(
                    sweep_cost(setup.redis.url, False, setup.redis.cpu_seconds)
                ),
                "Redis Cluster": run_async(
                    sweep_cost(setup.cluster.url, True, setup.cluster.cpu_seconds)
                ),
            }
            for child in procs.children:
                if not child.alive():
                    raise BenchFailure(f"{child.name} died during the benchmark")
    except (BenchFailure, StartupFailure, RuntimeError, TimeoutError) as failure:
        log(f"\nBENCHMARK FAILED: {failure}\n{procs.tails()}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted; stopping everything")
        return 130
    finally:
        procs.close()
    memory = {
        "budgets": ns.budgets + CUSTOMERS,
        "rss_idle_mb": idle["VmRSS"] / 1024,
        "rss_after_mb": after["VmRSS"] / 1024,
        "hwm_mb": after["VmHWM"] / 1024,
        "bare_rss_mb": bare["VmRSS"] / 1024,
        "ok": after["VmHWM"] / 1024 < 100.0,
    }
    doc = report(results, memory, checks, sweeps, setup.configure_s)
    doc["total_s"] = round(time.monotonic() - started, 1)
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
        print(f"\n(total {doc['total_s']:.0f} s)")
    errors = sum(r.errors for r in results)
    if errors or not all(check["all_settled"] for check in checks.values()):
        log(f"\n{errors} requests failed or metering did not add up; see above")
        return 1
    return 0


def _list(kind: type) -> Any:
    return lambda text: [kind(item) for item in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
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
        "--cluster-budgets",
        type=int,
        default=CLUSTER_BUDGETS,
        help=f"extra budgets configured on the Cluster (default {CLUSTER_BUDGETS})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure the targets this many times, in turn (default 2); ratios use the sum",
    )
    parser.add_argument(
        "--concurrency",
        type=_list(int),
        default=list(CONCURRENCIES),
        help="comma-separated connection counts (default 1,32)",
    )
    parser.add_argument(
        "--targets",
        type=_list(str),
        default=list(TARGETS),
        help=f"comma-separated rows to measure (default {','.join(TARGETS)})",
    )
    # Internal: this file also runs as the upstream model.
    parser.add_argument("--role", choices=["bench", "upstream"], default="bench",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    unknown = set(ns.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.role == "upstream":
        return upstream_main(ns.port)
    return bench_main(ns)


if __name__ == "__main__":
    raise SystemExit(main())
