"""``spendgate ledger / usage / audit / resume / balance --wait-settled`` against real Redis,
single and Cluster."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spendgate.accounting.abnormal import SUSPENSION_SOURCE
from spendgate.accounting.settlement import report_unreconciled
from spendgate.budget_tree import TreeIndex
from spendgate.cli import main
from spendgate.keys import for_customer
from spendgate.ledger import Ledger
from tests.support.accounting_data import DAY, T0, Clock, Known, client_for, populate

SINCE = ["--since", "4d"]


@pytest.fixture(params=["single", pytest.param("cluster", marks=pytest.mark.cluster)])
def target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False


def redis_args(target: tuple[str, bool]) -> list[str]:
    url, cluster = target
    return ["--redis", url, *(["--redis-cluster"] if cluster else [])]


def on_redis(target: tuple[str, bool], work: Any) -> Any:
    async def go() -> Any:
        client = client_for(*target)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def known(target: tuple[str, bool]) -> Known:
    return on_redis(target, lambda client: populate(client, Clock()))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- ledger


def test_ledger_json_entries_in_order_with_exact_decimals(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "ledger", "acme", "--json", *redis_args(target))
    assert code == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in entries] == ["adjust", "fund", "usage", "usage", "usage", "usage"]
    assert all(e["v"] == 1 and e["customer"] == "acme" and e["currency"] == "USD" for e in entries)
    opening, fund, first = entries[0], entries[1], entries[2]
    assert (opening["amount"], opening["source"]) == ("100.00", "spec")
    assert (fund["amount"], fund["balance"], fund["note"]) == ("20.00", "120.00", "first top-up")
    assert first["cost"] == "1.25" and first["estimate"] == "2.00"
    assert (first["key"], first["model"], first["input_tokens"], first["output_tokens"]) == (
        "prod", "llama-3", 100, 50,
    )  # fmt: skip
    assert first["ts"] == T0 + 60_000
    assert sum(int(e["cost"].replace(".", "")) for e in entries if e["kind"] == "usage") == (
        known.acme_cost // 10_000
    )


def test_ledger_full_precision_amounts(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    async def tiny(client: Any) -> None:
        ledger = Ledger(client)
        await ledger.settle("acme", "req-tiny", 1, key_id="prod")  # one micro-unit

    on_redis(target, tiny)
    code, out, _ = run(capsys, "ledger", "acme", "--kind", "usage", "--json", *redis_args(target))
    assert code == 0
    assert json.loads(out.splitlines()[-1])["cost"] == "0.000001"
    code, out, _ = run(capsys, "ledger", "acme", "--limit", "1", *redis_args(target))
    assert code == 0 and "-0.000001 USD" in out and len(out.splitlines()) == 1


def test_ledger_filters(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    args = redis_args(target)

    def kinds(*flags: str) -> list[str]:
        code, out, err = run(capsys, "ledger", "acme", "--json", *flags, *args)
        assert code == 0, err
        objects = [json.loads(line) for line in out.splitlines()]
        return [entry.get("request_id", entry["kind"]) for entry in objects]

    assert kinds("--kind", "fund", "--kind", "adjust") == ["adjust", "fund"]
    assert kinds("--key", "dev") == ["req-mistral-0"]
    assert kinds("--model", "llama-3") == ["req-llama-0", "req-llama-1", "req-llama-2"]
    # time range: [since, until), in UTC
    assert kinds("--since", f"{DAY}T09:02Z", "--until", f"{DAY}T10:00Z") == [
        "req-llama-1", "req-llama-2",
    ]  # fmt: skip
    assert kinds("--since", f"{DAY}T10:00:00+00:00") == ["req-mistral-0"]


def test_ledger_text_lines(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "ledger", "acme", *redis_args(target))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 6
    assert lines[1].startswith(f"{DAY}T09:00:00.000Z  fund     +20.00 USD  id=topup-1")
    assert "-1.25 USD  request=req-llama-0  key=prod  model=llama-3  tokens=100/50" in lines[2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kind", "bogus"], "invalid choice"),
        (["--since", "yesterday"], "expected an ISO 8601 time"),
        (["--since", "2026-03-03", "--until", "2026-03-02"], "--since must be before --until"),
        (["--limit", "0"], "--limit must be positive"),
        (["--follow", "--until", "now"], "--follow cannot be combined"),
    ],
)
def test_ledger_bad_flags_exit_2(
    redis_url: str, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, _, err = run(capsys, "ledger", "acme", *flags, "--redis", redis_url)
    assert code == 2 and message in err


def test_ledger_unknown_customer_exits_1(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "ledger", "nobody", "--redis", redis_url)
    assert code == 1 and "unknown customer 'nobody'" in err
    code, _, err = run(capsys, "ledger", "no/slash", "--redis", redis_url)
    assert code == 2 and "not a valid customer id" in err


def test_ledger_follow_prints_new_entries(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = (redis_url, False)
    on_redis(target, lambda client: populate(client, Clock()))
    printed: list[str] = []
    done = threading.Event()

    def capture(*parts: Any, **kwargs: Any) -> None:
        printed.append(" ".join(str(p) for p in parts))
        if any("req-late" in line for line in printed):
            done.set()
            raise KeyboardInterrupt  # how a person stops --follow

    monkeypatch.setattr("builtins.print", capture)

    def late_settle() -> None:
        time.sleep(0.5)
        on_redis(target, lambda c: Ledger(c).settle("acme", "req-late", 42, key_id="prod"))

    writer = threading.Thread(target=late_settle)
    writer.start()
    code = main(["ledger", "acme", "--follow", "--kind", "usage", "--json", "--redis", redis_url])
    writer.join()
    assert code == 130 and done.is_set()
    assert json.loads(printed[-1])["request_id"] == "req-late"
    assert json.loads(printed[-1])["cost"] == "0.000042"
    assert len(printed) == 5  # the four earlier usage entries, then the new one


# --------------------------------------------------------------------------- usage


def test_usage_by_customer(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "usage", "--format", "json", *SINCE, *redis_args(target))
    assert code == 0, err
    rows = {row["customer"]: row for row in map(json.loads, out.splitlines())}
    acme = rows["acme"]
    assert acme["requests"] == 4
    assert acme["cost"] == "5.75"
    assert (acme["inputTokens"], acme["outputTokens"]) == (known.acme_input, known.acme_output)
    assert acme["refusals"] == {"insufficient": 2, "rate_limited": 5} and acme["refused"] == 7
    assert rows["beta"]["cost"] == "0.50" and rows["beta"]["refused"] == 0


def test_usage_by_key_model_hour_csv(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "usage", "acme", "--by", "key,model,hour", "--format", "csv", *SINCE,
        *redis_args(target),
    )  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["key"], r["model"], r["hour"]) for r in rows] == [
        ("dev", "mistral", f"{DAY}T09:00Z"),  # its refusals
        ("dev", "mistral", f"{DAY}T10:00Z"),
        ("prod", "llama-3", f"{DAY}T09:00Z"),
    ]
    assert rows[0]["refused_rate_limited"] == "5" and rows[0]["requests"] == "0"
    assert (rows[1]["requests"], rows[1]["cost"]) == ("1", "2.00")
    assert (rows[2]["requests"], rows[2]["cost"], rows[2]["refused_insufficient"]) == (
        "3", "3.75", "2",
    )  # fmt: skip


def test_usage_table_and_filters(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "usage", "acme", "--by", "day", "--model", "llama-3", *SINCE, *redis_args(target)
    )
    assert code == 0
    header, row = out.splitlines()[1:3]
    assert header.split()[:4] == ["day", "currency", "requests", "input_tokens"]
    assert row.split()[:6] == [DAY, "USD", "3", "300", "150", "3.75"]
    code, out, _ = run(capsys, "usage", "acme", "--since", "2h", *redis_args(target))
    assert code == 0 and "no usage in this range" in out  # the data is three days old


def test_absorbed_usage_is_shown_and_selected(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = {"type": "usage", "request_id": "req-over", "key": "prod", "model": "llama-3",
              "cost": "1000", "absorbed": "250", "ts": str(T0 + 120_000)}  # fmt: skip
    on_redis(target, lambda c: c.xadd(for_customer("acme").ledger, fields))
    code, out, _ = run(
        capsys, "ledger", "acme", "--kind", "absorbed", "--json", *redis_args(target)
    )
    assert code == 0 and [json.loads(line)["absorbed"] for line in out.splitlines()] == ["0.00025"]
    code, out, _ = run(capsys, "usage", "acme", "--format", "json", *SINCE, *redis_args(target))
    row = json.loads(out)
    assert (row["requests"], row["cost"], row["absorbed"]) == (5, "5.751", "0.00025")


def test_usage_bad_groups_exit_2(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "usage", "--by", "planet", "--redis", redis_url)
    assert code == 2 and "cannot group by planet" in err
    code, _, err = run(capsys, "usage", "--by", "day,hour", "--redis", redis_url)
    assert code == 2 and "not both" in err


# --------------------------------------------------------------------------- audit


def test_audit_clean_ledger_passes(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "audit", *redis_args(target))
    assert (code, err) == (0, "")
    assert out.startswith("acme: ok  balance 114.25 USD  held 0.75 USD in 1 holds")
    code, out, _ = run(capsys, "audit", "beta", "--json", *redis_args(target))
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["balance"] == "9.50"


def test_audit_names_a_mismatch_and_exits_3(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    on_redis(target, lambda c: c.hincrby(for_customer("acme").acct, "balance", 1))
    code, out, err = run(capsys, "audit", *redis_args(target))
    assert code == 3 and "mismatch for acme" in err
    assert "  balance: balance 114.250001 != funded" in out
    assert "(off by 0.000001)" in out
    assert "beta: ok" in out


# --------------------------------------------------------------------------- resume


def test_resume_lifts_only_the_abnormal_spend_suspension(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    susp = for_customer("acme").suspensions

    async def suspend(client: Any) -> None:
        await client.hset(susp, SUSPENSION_SOURCE, "spent 50.00 in an hour")
        await client.hset(susp, "payment", "invoice failed")

    on_redis(target, suspend)
    code, out, _ = run(capsys, "resume", "acme", *redis_args(target))
    assert code == 0 and "abnormal-spend suspension lifted" in out
    assert "still suspended (payment: invoice failed)" in out
    remaining = on_redis(target, lambda c: c.hgetall(susp))
    assert remaining == {b"payment": b"invoice failed"}
    code, out, _ = run(capsys, "resume", "acme", *redis_args(target))
    assert code == 0 and "was not suspended for abnormal spend" in out


# --------------------------------------------------------------------------- balance


def test_balance_shows_in_flight_and_unreconciled(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    on_redis(
        target,
        lambda c: report_unreconciled(
            c, "model-0", {"acme": (3, 1_500_000, T0)}, T0 + 1, TreeIndex(c)
        ),
    )
    code, out, _ = run(capsys, "balance", "acme", "--json", *redis_args(target))
    flight = json.loads(out)["inFlight"]
    assert code == 0
    assert (flight["pendingSettlements"], flight["pendingHeld"]) == (1, "0.75")
    assert (flight["unreconciledCharges"], flight["unreconciledAmount"]) == (3, "1.50")
    assert flight["unreconciledBy"][0]["pod"] == "model-0" and not flight["settled"]
    code, out, _ = run(capsys, "balance", "acme", *redis_args(target))
    assert "in flight   1 requests holding 0.75 USD" in out
    assert "unreconciled 3 charges, 1.50 USD" in out


def test_balance_wait_settled_times_out_then_succeeds(
    target: tuple[str, bool], known: Known, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code, _, err = run(
        capsys, "balance", "acme", "--wait-settled", "--timeout", "300ms", *redis_args(target)
    )
    assert code == 1 and "not settled within 300ms" in err
    assert time.monotonic() - started < 5

    def settle_later() -> None:
        time.sleep(0.4)
        on_redis(target, lambda c: Ledger(c).settle("acme", "req-live", 500_000, key_id="dev"))

    settler = threading.Thread(target=settle_later)
    settler.start()
    code, out, err = run(
        capsys, "balance", "acme", "--wait-settled", "--timeout", "10s", "--json",
        *redis_args(target),
    )  # fmt: skip
    settler.join()
    report = json.loads(out)
    assert code == 0, err
    assert report["inFlight"]["settled"] and report["held"] == "0.00"
    assert report["balance"] == "113.75"  # read after the settlement it waited for


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before
