"""`make bench`'s report: the table, the ratios (all within one run) and their targets."""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import asdict
from typing import Any

from loadgen import LoadResult

ADDED_LATENCY_TARGET_MS = 0.5
THROUGHPUT_RATIO_TARGET = 0.6
CLUSTER_RATIO_TARGET = 1.0
RSS_TARGET_MB = 100.0

# target -> (the proxy process, the Redis it meters on); None: not in the request's path.
PROCESSES: dict[str, tuple[str | None, str | None]] = {
    "direct": (None, None),
    "bare": ("bare", None),
    "sidecar": ("sidecar", "redis"),
    "cluster": ("sidecar-cluster", "redis-cluster"),
    "images": ("sidecar", "redis"),
    "ledger": (None, "redis"),
    "ledger-cluster": (None, "redis-cluster"),
}
DESCRIPTIONS = {
    "direct": "load generator -> stand-in model",
    "bare": "-> bare aiohttp proxy -> model",
    "sidecar": "-> sidecar on one Redis -> model (token-priced chat)",
    "cluster": "-> sidecar on a 3-master Redis Cluster -> model (same chat)",
    "images": "-> sidecar on one Redis -> model (4 HD images, CEL-priced)",
    "ledger": "Ledger.reserve + settle, no HTTP, one Redis",
    "ledger-cluster": "Ledger.reserve + settle, no HTTP, 3-master Cluster",
}


def cpu_us_per_request(result: LoadResult, process: str | None) -> float:
    if process is None:
        return 0.0
    return result.cpu_s.get(process, 0.0) / max(1, result.requests) * 1e6


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else 0.0


def ratios_of(by: dict[tuple[str, int], LoadResult]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    direct1, sidecar1, bare1 = by.get(("direct", 1)), by.get(("sidecar", 1)), by.get(("bare", 1))
    bare32, sidecar32 = by.get(("bare", 32)), by.get(("sidecar", 32))
    if direct1 and sidecar1:
        added = sidecar1.p50_ms - direct1.p50_ms
        ratios["sidecar_added_p50_ms_c1"] = round(added, 3)
        ratios["sidecar_added_p50_ms_c1_ok"] = added <= ADDED_LATENCY_TARGET_MS
    if direct1 and bare1:
        ratios["bare_added_p50_ms_c1"] = round(bare1.p50_ms - direct1.p50_ms, 3)
    if bare32 and sidecar32:
        ratio = _ratio(sidecar32.rps, bare32.rps)
        ratios["sidecar_vs_bare_rps_c32"] = ratio
        ratios["sidecar_vs_bare_rps_c32_ok"] = ratio >= THROUGHPUT_RATIO_TARGET
    concurrencies = sorted({c for _, c in by})
    for c in concurrencies:
        for single, cluster, name in (
            ("sidecar", "cluster", "cluster_vs_single_rps"),
            ("ledger", "ledger-cluster", "ledger_cluster_vs_single_rps"),
        ):
            one, many = by.get((single, c)), by.get((cluster, c))
            if one and many:
                ratio = _ratio(many.rps, one.rps)
                ratios[f"{name}_c{c}"] = ratio
                ratios[f"{name}_c{c}_ok"] = ratio >= CLUSTER_RATIO_TARGET
        chat, images = by.get(("sidecar", c)), by.get(("images", c))
        if chat and images:
            ratios[f"images_vs_chat_rps_c{c}"] = _ratio(images.rps, chat.rps)
            ratios[f"images_minus_chat_p50_ms_c{c}"] = round(images.p50_ms - chat.p50_ms, 3)
            ratios[f"images_minus_chat_sidecar_cpu_us_c{c}"] = round(
                cpu_us_per_request(images, "sidecar") - cpu_us_per_request(chat, "sidecar"), 1
            )
    return ratios


def combined(rows: list[LoadResult]) -> LoadResult:
    """The rounds of one target at one concurrency as one measurement (medians of the
    rounds' percentiles)."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]
    duration = sum(r.duration_s for r in rows)
    requests = sum(r.requests for r in rows)
    statuses: dict[str, int] = {}
    for r in rows:
        for status, n in r.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    return LoadResult(
        target=first.target,
        concurrency=first.concurrency,
        client=first.client,
        duration_s=duration,
        requests=requests,
        total_requests=sum(r.total_requests for r in rows),
        rps=requests / duration,
        p50_ms=statistics.median(r.p50_ms for r in rows),
        p90_ms=statistics.median(r.p90_ms for r in rows),
        p99_ms=statistics.median(r.p99_ms for r in rows),
        mean_ms=sum(r.mean_ms * r.requests for r in rows) / max(1, requests),
        max_ms=max(r.max_ms for r in rows),
        statuses=statuses,
        loadgen_cpu_s=sum(r.loadgen_cpu_s for r in rows),
        cpu_s={name: sum(r.cpu_s.get(name, 0.0) for r in rows) for name in first.cpu_s},
        machine_busy_s=sum(r.machine_busy_s for r in rows),
    )


def report(
    results: list[LoadResult],
    memory: dict[str, Any],
    metering: dict[str, dict[str, Any]],
    sweeps: dict[str, dict[str, Any]],
    setup_s: float,
) -> dict[str, Any]:
    groups: dict[tuple[str, int], list[LoadResult]] = {}
    for r in results:
        groups.setdefault((r.target, r.concurrency), []).append(r)
    by = {key: combined(rows) for key, rows in groups.items()}
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
        "ratios": ratios_of(by),
        "memory": memory,
        "metering": metering,
        "hold_sweep": sweeps,
    }


def _verdict(ok: bool | None) -> str:
    return "ok" if ok else "MISSED"


def print_table(doc: dict[str, Any]) -> None:
    print(f"\nspendgate benchmark  ({doc['machine']['cpus']} CPUs shared by load generator,")
    print("proxies, stand-in model and Redis; non-streaming requests, 0 ms model)\n")
    for target, text in DESCRIPTIONS.items():
        if any(row["target"] == target for row in doc["results"]):
            print(f"  {target:<15} {text}")
    header = (
        f"\n{'target':<15} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
        f"   {'CPU us/req: proxy':>17} {'model':>6} {'redis':>6} {'loadgen':>7}"
        f"  {'others':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in doc["results"]:
        proxy_name, redis_name = PROCESSES[row["target"]]
        cpu = row["cpu_us_per_request"]
        proxy = cpu.get(proxy_name, 0.0) if proxy_name else "-"
        redis_cpu = cpu.get(redis_name, 0.0) if redis_name else 0.0
        model = cpu.get("upstream", 0.0) if not row["target"].startswith("ledger") else 0.0
        loadgen = row["loadgen_cpu_s"] / max(1, row["requests"]) * 1e6
        errors = sum(n for s, n in row["statuses"].items() if not s.startswith("2"))
        ours = sum(row["cpu_s"].values()) + row["loadgen_cpu_s"]
        others = max(0.0, row["machine_busy_s"] - ours) / row["duration_s"]
        print(
            f"{row['target']:<15} {row['concurrency']:>5} {row['rps']:>8.0f}"
            f" {row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} {errors:>6}"
            f"   {proxy:>17} {model:>6.0f} {redis_cpu:>6.0f} {loadgen:>7.0f}  {others:>6.2f}"
        )
    print(
        "\nCPU us/req: CPU time each process used per measured request (redis: all three nodes"
        "\nfor the Cluster; ledger rows: one request = one reserve + settle); others: cores"
        "\nbusy with processes outside this benchmark during the run (noise when > 0)."
    )
    _print_ratios(doc)


def _print_ratios(doc: dict[str, Any]) -> None:
    ratios, memory = doc["ratios"], doc["memory"]
    print()
    if "sidecar_added_p50_ms_c1" in ratios:
        print(
            f"sidecar p50 added latency vs direct, 1 conn : {ratios['sidecar_added_p50_ms_c1']:.3f}"
            f" ms   (target <= {ADDED_LATENCY_TARGET_MS} ms: "
            f"{_verdict(ratios['sidecar_added_p50_ms_c1_ok'])}; bare proxy adds"
            f" {ratios.get('bare_added_p50_ms_c1', float('nan')):.3f} ms)"
        )
    if "sidecar_vs_bare_rps_c32" in ratios:
        print(
            f"sidecar / bare proxy throughput, 32 conns   : {ratios['sidecar_vs_bare_rps_c32']:.2f}"
            f"       (target >= {THROUGHPUT_RATIO_TARGET}:"
            f" {_verdict(ratios['sidecar_vs_bare_rps_c32_ok'])})"
        )
    for key, value in ratios.items():
        if key.endswith("_ok") or not key.startswith(("cluster_vs", "ledger_cluster_vs")):
            continue
        conns = key.rsplit("_c", 1)[1]
        what = "sidecar" if key.startswith("cluster") else "ledger "
        print(
            f"Cluster / single Redis, {what}, {conns:>2} conns : {value:.2f}"
            f"       (target >= {CLUSTER_RATIO_TARGET}: {_verdict(ratios[key + '_ok'])})"
        )
    for key, value in ratios.items():
        if key.startswith("images_vs_chat_rps_c"):
            conns = key.rsplit("_c", 1)[1]
            print(
                f"images (CEL) vs chat (tokens), {conns:>2} conns  : throughput {value:.2f},"
                f" p50 {ratios[f'images_minus_chat_p50_ms_c{conns}']:+.3f} ms, sidecar CPU"
                f" {ratios[f'images_minus_chat_sidecar_cpu_us_c{conns}']:+.0f} us/req"
            )
    print(
        f"sidecar memory, {memory['budgets']} budgets configured  : VmRSS"
        f" {memory['rss_idle_mb']:.1f} MB idle, {memory['rss_after_mb']:.1f} MB after load,"
        f" peak {memory['hwm_mb']:.1f} MB (target < {RSS_TARGET_MB:.0f} MB: "
        f"{_verdict(memory['ok'])}); bare proxy {memory['bare_rss_mb']:.1f} MB"
    )
    for name, check in doc["metering"].items():
        print(
            f"metering check, {name:<13}: {check['requests_sent']} requests, "
            f"{check['usage_entries']} usage entries on the ledgers, held now"
            f" {check['held_micros']} -> "
            + ("every request settled" if check["all_settled"] else "MISMATCH")
        )
    for name, sweep in doc["hold_sweep"].items():
        print(
            f"hold sweep, {name:<13}: one pass over {sweep['customers']} customers took"
            f" {sweep['wall_s']:.2f} s, {sweep['client_cpu_s']:.2f} s of the sweeping process's"
            f" CPU and {sweep['redis_cpu_s']:.2f} s of Redis' (every 10 s by default: about"
            f" {sweep['client_cpu_s'] / 10:.3f} + {sweep['redis_cpu_s'] / 10:.3f} cores)"
        )
