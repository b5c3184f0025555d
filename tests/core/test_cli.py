"""The ``spendgate`` command line, against a real Redis; and the redacting JSON logs."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import redis

from spendgate import cli
from spendgate.cli import UsageError, build_parser, main
from spendgate.cli import servers as cli_servers
from spendgate.cli.servers import sidecar_settings_from_args
from spendgate.keys import for_customer
from spendgate.logs import JsonFormatter, RedactingFilter
from spendgate.sidecar.settings import FailMode, SidecarSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
APPLY_EXAMPLES = [
    "apply",
    "-f",
    str(EXAMPLES / "pricebook.yaml"),
    "-f",
    str(EXAMPLES / "budgets.yaml"),
]
PLAINTEXT_KEYS = ["sk-demo-acme-prod-7Qm2vX9c", "sk-demo-tinyco-Hb3kW8sQ"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def applied(redis_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = run(capsys, *APPLY_EXAMPLES, "--redis", redis_url)
    assert code == 0, err
    return redis_url


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


# --------------------------------------------------------------------------- apply


def test_apply_examples(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *APPLY_EXAMPLES, "--redis", redis_url)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "pricebook default/default configured (5 rules)",
        "customerbudget default/acme configured (+5.00 opening balance, 2 keys)",
        "customerbudget default/tinyco configured (+0.001 opening balance, 1 key)",
        "customerbudget default/burstco configured (+10.00 opening balance, 1 key)",
        "customerbudget default/postpaid configured (limit 100.00 USD per month, 1 key)",
    ]
    code, out, _ = run(capsys, *APPLY_EXAMPLES, "--redis", redis_url)
    assert code == 0 and "acme configured (opening balance unchanged, 2 keys)" in out
    assert not any(key in out + err for key in PLAINTEXT_KEYS)


def test_apply_invalid_exits_2_and_writes_nothing(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = (EXAMPLES / "budgets.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("mode: prepaid", "mode: prepay", 1))
    code, out, err = run(
        capsys,
        "apply",
        "-f",
        str(EXAMPLES / "pricebook.yaml"),
        "-f",
        str(bad),
        "--redis",
        redis_url,
    )
    assert (code, out) == (2, "")
    assert f"{bad} document 2 (CustomerBudget default/acme): spec.mode: must be one of" in err
    assert err.rstrip().endswith("applied: nothing")
    assert sync_client(redis_url).dbsize() == 0


def test_apply_missing_file(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "apply", "-f", "/nonexistent.yaml", "--redis", redis_url)
    assert code == 2 and "/nonexistent.yaml: cannot read" in err


def test_apply_stdin(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO((EXAMPLES / "pricebook.yaml").read_text()))
    code, out, _ = run(capsys, "apply", "-f", "-", "--redis", redis_url)
    assert (code, out) == (0, "pricebook default/default configured (5 rules)\n")


def test_apply_conflict_with_redis(
    applied: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(
        (EXAMPLES / "budgets.yaml").read_text().replace("name: acme\n", "name: acme2\n")
    )
    code, _, err = run(capsys, "apply", "-f", str(other), "--redis", applied)
    assert code == 2
    assert "'acme' is already claimed by CustomerBudget default/acme" in err
    assert sync_client(applied).hget("sg:customers", "acme") == b"default/acme"


def test_dry_run_does_not_contact_redis(
    closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, *APPLY_EXAMPLES, "--dry-run", "--redis", closed_port_url)
    assert code == 0 and out.splitlines()[1] == "customerbudget default/acme valid (dry run)"


# --------------------------------------------------------------------------- money


def test_fund_adjust_balance(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "fund", "acme", "2.50", "--id", "topup-1", "--note", "wire", "--redis", applied
    )
    assert (code, out) == (0, "fund acme +2.50 USD (id topup-1); balance 7.50 USD\n")
    code, out, _ = run(capsys, "fund", "acme", "2.50", "--id", "topup-1", "--redis", applied)
    assert code == 0 and "already applied" in out and "balance 7.50 USD" in out
    code, out, _ = run(capsys, "adjust", "acme", "-1.25", "--id", "refund-1", "--redis", applied)
    assert (code, out) == (0, "adjust acme -1.25 USD (id refund-1); balance 6.25 USD\n")

    code, out, _ = run(capsys, "balance", "acme", "--json", "--redis", applied)
    assert code == 0
    assert json.loads(out) == {
        "customerId": "acme",
        "state": "Active",
        "reasons": [],
        "currency": "USD",
        "mode": "prepaid",
        "balance": "6.25",
        "held": "0.00",
        "available": "6.25",
        "spentThisPeriod": "0.00",
        "ownSpentThisPeriod": "0.00",
        "inFlight": {
            "pendingSettlements": 0,
            "pendingHeld": "0.00",
            "expiredHolds": 0,
            "unreconciledCharges": 0,
            "unreconciledAmount": "0.00",
            "unreconciledBy": [],
            "settled": True,
        },
    }
    code, out, _ = run(capsys, "balance", "acme", "--redis", applied)
    assert code == 0
    assert "state       Active" in out and "available   6.25 USD" in out


@pytest.mark.parametrize(
    ("command", "amount", "message"),
    [
        ("fund", "-5", "AMOUNT '-5': a funding must be more than zero"),
        ("fund", "abc", "AMOUNT 'abc' is not a decimal amount"),
        ("fund", "1e3", "AMOUNT '1e3' is not a decimal amount"),
        ("fund", "0", "AMOUNT '0': a funding must be more than zero"),
        ("fund", "1" + "0" * 22, "is too large (at most 9007199254.740991)"),
        ("fund", "1.1234567", "AMOUNT '1.1234567' has 7 decimals; amounts have at most 6"),
        ("adjust", "0.00", "AMOUNT '0.00' is zero: an adjustment adds or removes money"),
        ("adjust", "ten", "AMOUNT 'ten' is not a decimal amount"),
        ("adjust", "-" + "9" * 23, "is too large"),
    ],
)
def test_bad_amounts_exit_2(
    applied: str, capsys: pytest.CaptureFixture[str], command: str, amount: str, message: str
) -> None:
    code, out, err = run(capsys, command, "acme", amount, "--id", "x1", "--redis", applied)
    assert (code, out) == (2, "")
    assert message in err
    assert sync_client(applied).exists(for_customer("acme").funding("x1")) == 0


def test_fund_needs_id(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "fund", "acme", "1.00", "--redis", applied)
    assert code == 2 and "--id" in err


def test_unknown_customer_exits_1(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["balance", "nobody"], ["fund", "nobody", "1.00", "--id", "f1"]):
        code, _, err = run(capsys, *args, "--redis", applied)
        assert code == 1 and "unknown customer 'nobody'" in err
    assert sync_client(applied).exists(for_customer("nobody").acct) == 0


def test_exhausted_and_suspended(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "adjust", "tinyco", "-0.001", "--id", "a1", "--redis", applied)[0] == 0
    report = json.loads(run(capsys, "balance", "tinyco", "--json", "--redis", applied)[1])
    assert (report["state"], report["available"]) == ("Exhausted", "0.00")
    sync_client(applied).hset(for_customer("burstco").suspensions, "stripe", "payment failed")
    code, out, _ = run(capsys, "balance", "burstco", "--redis", applied)
    assert code == 0 and "state       Suspended (stripe: payment failed)" in out
    report = json.loads(run(capsys, "balance", "postpaid", "--json", "--redis", applied)[1])
    assert (report["mode"], report["limit"], report["period"]) == ("capped", "100.00", "month")


def test_redis_url_from_environment(
    applied: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPENDGATE_REDIS_URL", applied)
    assert run(capsys, "balance", "acme")[0] == 0


def test_unreachable_redis_exits_1(
    closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (APPLY_EXAMPLES, ["balance", "acme"], ["fund", "acme", "1", "--id", "f"]):
        code, out, err = run(capsys, *args, "--redis", closed_port_url)
        assert (code, out) == (1, "")
        assert f"cannot reach Redis at {closed_port_url}:" in err
        assert "Traceback" not in err


def test_redis_password_is_not_printed(
    closed_port_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = closed_port_url.replace("redis://", "redis://:hunter2@")
    code, _, err = run(capsys, "balance", "acme", "--redis", url)
    assert code == 1 and "hunter2" not in err and "cannot reach Redis" in err


@pytest.mark.cluster
def test_redis_cluster(redis_cluster_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    opts = ["--redis", redis_cluster_url, "--redis-cluster"]
    assert run(capsys, *APPLY_EXAMPLES, *opts)[0] == 0
    assert run(capsys, "fund", "acme", "1", "--id", "c1", *opts)[0] == 0
    report = json.loads(run(capsys, "balance", "acme", "--json", *opts)[1])
    assert report["balance"] == "6.00"


# --------------------------------------------------------------------------- sidecar


def sidecar(args: list[str], environ: dict[str, str] | None = None) -> SidecarSettings:
    return sidecar_settings_from_args(build_parser().parse_args(["sidecar", *args]), environ or {})


def test_sidecar_settings_from_flags() -> None:
    flags = (
        "--upstream http://127.0.0.1:8000/ --listen 127.0.0.1:9090 --pricebook models/llama"
        " --fail-mode open --pod web-0 --max-body-bytes 1024 --redis redis://r:6379/1"
        " --redis-cluster --journal-dir /var/lib/spendgate --fail-open-allowance 2.50"
    )
    settings = sidecar(flags.split())
    assert settings == SidecarSettings(
        upstream="http://127.0.0.1:8000",
        redis_url="redis://r:6379/1",
        listen_host="127.0.0.1",
        listen_port=9090,
        probe_host="127.0.0.1",  # the --listen host by default
        pricebook="models/llama",
        fail_mode=FailMode.open,
        pod="web-0",
        max_body_bytes=1024,
        cluster=True,
        journal_dir="/var/lib/spendgate",
        fail_open_allowance=2_500_000,
    )


def test_sidecar_settings_from_environment() -> None:
    environ = {
        "SPENDGATE_UPSTREAM": "http://model:8000",
        "SPENDGATE_LISTEN": "[::]:8081",
        "SPENDGATE_PRICEBOOK": "ns/pb",
        "SPENDGATE_FAIL_MODE": "open",
        "SPENDGATE_JOURNAL_DIR": "/tmp/journal",
        "SPENDGATE_POD": "pod-1",
        "SPENDGATE_REDIS_URL": "redis://redis:6379/0",
        "SPENDGATE_REDIS_CLUSTER": "1",
        "SPENDGATE_PROBE_LISTEN": "[::]:9091",
        "SPENDGATE_CORS_ORIGINS": "https://a.example,https://b.example",
    }
    settings = sidecar([], environ)
    assert (settings.probe_host, settings.probe_port) == ("::", 9091)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert (settings.upstream, settings.listen_host, settings.listen_port) == (
        "http://model:8000",
        "::",
        8081,
    )
    assert (settings.pricebook, settings.fail_mode, settings.pod) == (
        "ns/pb",
        FailMode.open,
        "pod-1",
    )
    assert (settings.redis_url, settings.cluster) == ("redis://redis:6379/0", True)
    # Flags win over the environment.
    assert sidecar(["--fail-mode", "closed"], environ).fail_mode is FailMode.closed
    defaults = sidecar(["--upstream", "http://m:1"])
    assert (defaults.listen_host, defaults.listen_port, defaults.pricebook) == (
        "0.0.0.0",
        8080,
        "default/default",
    )
    assert (defaults.fail_mode, defaults.cluster) == (FailMode.closed, False)
    assert (defaults.probe_host, defaults.probe_port, defaults.cors_origins) == (
        "0.0.0.0",
        8081,
        (),
    )


def test_sidecar_probe_port_and_cors_flags() -> None:
    flags = ["--upstream", "http://m:1", "--probe-listen", "127.0.0.1:9100"]
    settings = sidecar([*flags, "--cors-origin", "https://a.example", "--cors-origin", "*"])
    assert (settings.probe_host, settings.probe_port) == ("127.0.0.1", 9100)
    assert settings.cors_origins == ("https://a.example", "*")
    with pytest.raises(UsageError, match=r"--probe-listen '127\.0\.0\.1:8080': must differ"):
        sidecar(["--upstream", "http://m:1", "--probe-listen", "127.0.0.1:8080"])
    with pytest.raises(UsageError, match="--probe-listen 'nope'"):
        sidecar(["--upstream", "http://m:1", "--probe-listen", "nope"])


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        ([], {}, "--upstream (or SPENDGATE_UPSTREAM) is required"),
        (["--upstream", "model:8000"], {}, "expected an http(s) URL"),
        (["--upstream", "http://m", "--listen", "8080"], {}, "expected HOST:PORT"),
        (["--upstream", "http://m", "--listen", "h:99999"], {}, "expected HOST:PORT"),
        (["--upstream", "http://m", "--pricebook", "nonamespace"], {}, "NAMESPACE/NAME"),
        (["--upstream", "http://m"], {"SPENDGATE_FAIL_MODE": "sometimes"}, "closed or open"),
        (["--upstream", "http://m", "--max-body-bytes", "0"], {}, "positive integer"),
    ],
)
def test_sidecar_settings_errors(args: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sidecar(args, environ)


def test_sidecar_command_calls_serve_lazily(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[SidecarSettings] = []
    fake = types.ModuleType("spendgate.sidecar.server")
    fake.serve = served.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spendgate.sidecar.server", fake)
    monkeypatch.setattr(cli_servers, "setup_logging", lambda *a, **k: None)
    assert run(capsys, "sidecar", "--upstream", "http://127.0.0.1:8000")[0] == 0
    assert served == [SidecarSettings(upstream="http://127.0.0.1:8000")]
    code, _, err = run(capsys, "sidecar")
    assert code == 2 and "--upstream" in err


def test_standin_model_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    import spendgate.sidecar.standin as standin

    seen: list[Any] = []
    monkeypatch.setattr(standin, "main", lambda argv: seen.append(argv) or 7)
    assert main(["standin-model", "--port", "9", "--redis", "x"]) == 7
    assert seen == [["--port", "9", "--redis", "x"]]


def test_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--help")[0] == 0
    assert (
        run(
            capsys,
        )[0]
        == 2
    )
    assert run(capsys, "frobnicate")[0] == 2


# --------------------------------------------------------------------------- logs


def log_line(message: str, *args: Any, **extra: Any) -> dict[str, Any]:
    record = logging.LogRecord("spendgate.test", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    assert RedactingFilter().filter(record)
    return json.loads(JsonFormatter().format(record))


def test_json_log_lines_are_redacted() -> None:
    entry = log_line(
        "key %s from %s",
        "sk-demo-acme-prod-7Qm2vX9c",
        "Bearer abc.def",
        customer="acme",
        input_tokens=12,
        headers={"Authorization": "Bearer xyz", "X-API-Key": "k-123"},
        stripe="sk_live_51Habc rk_test_9 whsec_abc",
        redis="redis://:hunter2@redis:6379/0",
    )
    assert entry["level"] == "info" and entry["logger"] == "spendgate.test" and "ts" in entry
    assert entry["msg"] == "key sk-[REDACTED] from Bearer [REDACTED]"
    assert (entry["customer"], entry["input_tokens"]) == ("acme", 12)
    assert entry["headers"] == {"Authorization": "[REDACTED]", "X-API-Key": "[REDACTED]"}
    assert entry["stripe"] == "sk_live_[REDACTED] rk_test_[REDACTED] whsec_[REDACTED]"
    assert entry["redis"] == "redis://:[REDACTED]@redis:6379/0"
    assert "hunter2" not in json.dumps(entry)
