"""Operator mistakes on the ``spendgate`` command line: each is one clear line, a non-zero exit,
no traceback, and nothing changed in Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from spendgate.cli import main
from spendgate.keys import for_customer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
APPLY_EXAMPLES = [
    "apply",
    "-f",
    str(EXAMPLES / "pricebook.yaml"),
    "-f",
    str(EXAMPLES / "budgets.yaml"),
]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def dump(url: str) -> dict[bytes, bytes | None]:
    """Every key and its serialized value: equal dumps mean Redis is unchanged."""
    client = redis.Redis.from_url(url)
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


@pytest.fixture
def applied(redis_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = run(capsys, *APPLY_EXAMPLES, "--redis", redis_url)
    assert code == 0, err
    return redis_url


def refused(capsys: pytest.CaptureFixture[str], url: str, *args: str, code: int = 2) -> str:
    before = dump(url)
    got, out, err = run(capsys, *args, "--redis", url)
    assert (got, out) == (code, ""), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert dump(url) == before
    return err


# --------------------------------------------------------------------------- fund / adjust


def test_reused_fund_id_with_another_amount(
    applied: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "fund", "acme", "2.50", "--id", "topup-1", "--redis", applied)[0] == 0
    err = refused(capsys, applied, "fund", "acme", "3.00", "--id", "topup-1")
    assert "id 'topup-1' was already used for fund of +2.50" in err
    assert "this fund is +3.00" in err and err.rstrip().endswith("nothing changed")
    code, out, _ = run(capsys, "fund", "acme", "2.50", "--id", "topup-1", "--redis", applied)
    assert code == 0 and "already applied" in out  # the identical call is still a no-op


def test_adjust_with_a_funding_id(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "fund", "acme", "2.50", "--id", "topup-1", "--redis", applied)[0] == 0
    err = refused(capsys, applied, "adjust", "acme", "-1", "--id", "topup-1")
    assert "already used for fund of +2.50" in err and "this adjust is -1.00" in err


def test_funding_a_capped_customer(applied: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command, amount in (("fund", "10"), ("adjust", "5")):
        err = refused(capsys, applied, command, "postpaid", amount, "--id", "p1")
        assert "customer 'postpaid' is capped (post-paid)" in err and "spec.limit" in err


def test_adjust_below_zero_needs_allow_negative(
    applied: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, applied, "adjust", "acme", "-20", "--id", "cb-1")
    assert "from 5.00 to -15.00" in err and "--allow-negative" in err
    code, out, _ = run(
        capsys, "adjust", "acme", "-20", "--id", "cb-1", "--allow-negative", "--redis", applied
    )
    assert (code, out) == (0, "adjust acme -20.00 USD (id cb-1); balance -15.00 USD\n")


@pytest.mark.parametrize(("command", "amount"), [("fund", "0"), ("fund", "-5")])
def test_amount_messages_do_not_contradict(
    applied: str, capsys: pytest.CaptureFixture[str], command: str, amount: str
) -> None:
    err = refused(capsys, applied, command, "acme", amount, "--id", "z1")
    assert "more than zero" in err and "zero or more" not in err
    assert redis.Redis.from_url(applied).exists(for_customer("acme").funding("z1")) == 0


# --------------------------------------------------------------------------- apply


@pytest.mark.parametrize("text", ["", "\n", "---\n---\n", "# only a comment\n"])
def test_apply_of_an_empty_file(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    code, out, err = run(capsys, "apply", "-f", str(empty), "--redis", redis_url)
    assert (code, out) == (2, "")
    assert f"{empty}: no CustomerBudget or PriceBook" in err and "nothing to apply" in err
    assert err.rstrip().endswith("applied: nothing")
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    assert run(capsys, "apply", "--dry-run", "-f", str(empty))[0] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: [unclosed\n", "invalid YAML at line 2 column 1: expected ',' or ']'"),
        ("a: b\n  c: d\n", "invalid YAML at line 2 column 4: mapping values are not allowed"),
        ("kind: PriceBook\nkind: List\n", "key 'kind' is given twice (first on line 1)"),
        ("a: \x00\n", "unacceptable character #x0000"),
        ("[" * 5000, "invalid YAML: nested too deeply"),
    ],
)
def test_yaml_errors_name_the_file(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "apply", "-f", str(path), "--redis", redis_url)
    assert (code, out) == (2, "")
    assert f"  {path}: " in err and expected in err
    assert "<unicode string>" not in err and "Traceback" not in err
    assert redis.Redis.from_url(redis_url).dbsize() == 0


# --------------------------------------------------------------------------- processes


def spendgate(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "spendgate.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": ""},
        **kwargs,
    )


def test_output_to_a_closed_pipe_is_not_a_traceback(applied: str) -> None:
    for args in (["balance", "acme", "--json"], ["balance", "acme"], ["--help"]):
        process = spendgate(*args, "--redis", applied) if args[0] != "--help" else spendgate(*args)
        assert process.stdout is not None
        process.stdout.close()  # the reader is gone before anything is written
        _, err = process.communicate(timeout=60)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
        assert process.returncode == 141


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (
            ["sidecar", "--upstream", "http://127.0.0.1:9", "--redis", "redis://127.0.0.1:9/0"],
            "the sidecar",
        ),
        (["standin-model", "--host", "127.0.0.1"], "the stand-in model"),
    ],
)
def test_a_port_in_use_is_one_line(busy_port: int, command: list[str], what: str) -> None:
    flag = (
        ["--listen", f"127.0.0.1:{busy_port}"]
        if command[0] == "sidecar"
        else ["--port", str(busy_port)]
    )
    process = spendgate(*command, *flag)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (1, b"")
    assert err.decode().splitlines() == [
        f"spendgate {command[0]}: cannot listen on 127.0.0.1:{busy_port} for {what}: the address"
        " is already in use (another process listens on that port)"
    ]
