"""The ``spendgate`` command: apply manifests, fund and inspect customers, run the sidecar.

Exit codes: 0 success · 1 runtime failure (Redis unreachable, unknown customer, a port in
use) · 2 invalid input or usage (bad manifests, bad amounts, bad flags, a refused fund or
adjust) · 3 `audit` found a mismatch · 141 the reader of the output went away (as when killed
by SIGPIPE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from spendgate.sidecar.money_args import MoneyArgError
from spendgate.sidecar.money_args import add_arguments as add_money_path_arguments
from spendgate.sidecar.money_args import overrides as money_path_overrides
from spendgate.sidecar.settings import FailMode, SidecarSettings

from . import redis_connect
from .accounting.balance import balance_view
from .config_store import ConfigStore
from .credits import CreditRefused
from .keys import check_customer_id
from .ledger import Account, Ledger, LedgerError, check_request_id
from .listening import ListenError
from .logs import redact, setup_logging
from .manifests import ApplyError, apply_resources, dry_run_results, load_resources
from .money import AmountError, format_amount, parse_amount

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_PROBE_PORT = 8081
TRUE_WORDS = {"1", "true", "yes", "on"}
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


class UsageError(Exception):
    """Bad input on the command line: exit 2."""


class Failure(Exception):
    """The command could not do its job: exit 1."""


# --------------------------------------------------------------------------- Redis


def redis_settings(ns: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, bool]:
    url = ns.redis or environ.get("SPENDGATE_REDIS_URL") or DEFAULT_REDIS_URL
    cluster = ns.redis_cluster or environ.get("SPENDGATE_REDIS_CLUSTER", "").lower() in TRUE_WORDS
    return url, cluster


@asynccontextmanager
async def connect(ns: argparse.Namespace) -> AsyncIterator[Any]:
    """A pinged client on ``--redis``; any connection failure becomes a one-line Failure."""
    url, cluster = redis_settings(ns, os.environ)
    try:
        client = redis_connect.connect(url, cluster=cluster, timeout_s=10, connect_timeout_s=3)
    except ValueError as error:
        raise UsageError(f"invalid Redis URL {redact(url)}: {error}") from None
    try:
        await client.ping()
        yield client
    except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as error:
        raise Failure(f"cannot reach Redis at {redact(url)}: {redact(str(error))}") from None
    except RedisError as error:
        raise Failure(f"Redis error at {redact(url)}: {redact(str(error))}") from None
    finally:
        with suppress(RedisError, RedisClusterException, OSError):
            await client.aclose()


# --------------------------------------------------------------------------- apply


def _read_inputs(files: Sequence[str]) -> list[tuple[str, str]]:
    inputs = []
    for path in files:
        if path == "-":
            inputs.append(("<stdin>", sys.stdin.read()))
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                inputs.append((path, handle.read()))
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"{path}: cannot read: {error}") from None
    return inputs


async def cmd_apply(ns: argparse.Namespace) -> int:
    resources = load_resources(_read_inputs(ns.files))
    if ns.dry_run:
        lines = dry_run_results(resources)
    else:
        async with connect(ns) as client:
            lines = await apply_resources(ConfigStore(client), resources)
    for line in lines:
        print(line)
    return 0


# --------------------------------------------------------------------------- money


def _amount(text: str, *, signed: bool) -> int:
    try:
        micros = parse_amount(text, allow_negative=True)
    except AmountError as error:
        raise UsageError(f"AMOUNT {error}") from None
    if signed and micros == 0:
        raise UsageError(f"AMOUNT {text!r} is zero: an adjustment adds or removes money")
    if not signed and micros <= 0:
        raise UsageError(
            f"AMOUNT {text!r}: a funding must be more than zero (to take money away, use"
            " adjust with a negative amount)"
        )
    return micros


def _ids(ns: argparse.Namespace) -> None:
    try:
        check_customer_id(ns.customer)
        check_request_id(ns.id)
    except (ValueError, LedgerError) as error:
        raise UsageError(str(error)) from None


async def _configured(ledger: Ledger, customer: str) -> Account:
    account = await ledger.account(customer)
    if not account.configured:
        raise Failure(f"unknown customer {customer!r}: no CustomerBudget configures it")
    return account


async def cmd_credit(ns: argparse.Namespace) -> int:
    signed = ns.command == "adjust"
    amount = _amount(ns.amount, signed=signed)
    _ids(ns)
    async with connect(ns) as client:
        ledger = Ledger(client)
        account = await _configured(ledger, ns.customer)
        try:
            if signed:
                credit = await ledger.adjust(
                    ns.customer,
                    ns.id,
                    amount,
                    source="cli",
                    note=ns.note or "",
                    allow_negative=ns.allow_negative,
                )
            else:
                credit = await ledger.fund(
                    ns.customer, ns.id, amount, source="cli", note=ns.note or ""
                )
        except CreditRefused as error:
            raise UsageError(f"{error}; nothing changed") from None
    currency = account.currency or ""
    balance = f"balance {format_amount(credit.balance)} {currency}".rstrip()
    if credit.duplicate:
        print(
            f"{ns.command} {ns.id} was already applied to {ns.customer}; nothing changed"
            f" ({balance})"
        )
    else:
        sign = "+" if amount > 0 else ""
        print(
            f"{ns.command} {ns.customer} {sign}{format_amount(amount)} {currency} (id {ns.id});"
            f" {balance}"
        )
    return 0


# --------------------------------------------------------------------------- balance


def balance_report(account: Account, now_ms: int) -> dict[str, Any]:
    """What ``spendgate balance`` shows; amounts as decimal strings."""
    return balance_view(account, now_ms)


async def cmd_balance(ns: argparse.Namespace) -> int:
    from .cli_accounting import in_flight_lines, settlement_state

    try:
        check_customer_id(ns.customer)
    except ValueError as error:
        raise UsageError(str(error)) from None
    async with connect(ns) as client:
        account = await _configured(Ledger(client), ns.customer)
        in_flight, settled_in_time = await settlement_state(client, ns)
        if ns.wait_settled:  # the balance after settlement, not before
            account = await _configured(Ledger(client), ns.customer)
    report = balance_report(account, int(datetime.now(UTC).timestamp() * 1000))
    report["inFlight"] = in_flight
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0 if settled_in_time else 1
        print(json.dumps(report, indent=2))
        return 0
    unit = f" {report['currency']}"
    print(f"customer    {report['customerId']} ({report['mode']})")
    state = report["state"] + (f" ({'; '.join(report['reasons'])})" if report["reasons"] else "")
    print(f"state       {state}")
    for name in ("balance", "held", "available"):
        print(f"{name:<11} {report[name]}{unit}")
    spent = f"{report['spentThisPeriod']}{unit}"
    if "limit" in report:
        spent += f" of {report['limit']}{unit} per {report['period'] or 'period'}"
    print(f"spent       {spent}")
    for line in in_flight_lines(in_flight, unit):
        print(line)
    if not settled_in_time:
        print(f"spendgate balance: not settled within {ns.timeout}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- sidecar


def _listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, like 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def money_path_settings(ns: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    try:
        return money_path_overrides(ns, env)
    except MoneyArgError as error:
        raise UsageError(str(error)) from None


def sidecar_settings_from_args(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SidecarSettings:
    """``SidecarSettings`` from flags, falling back to ``SPENDGATE_*`` variables, then defaults."""
    env = os.environ if environ is None else environ
    upstream = ns.upstream or env.get("SPENDGATE_UPSTREAM")
    if not upstream:
        raise UsageError(
            "--upstream (or SPENDGATE_UPSTREAM) is required, e.g. http://127.0.0.1:8000"
        )
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--upstream {upstream!r}: expected an http(s) URL")
    host, port = _listen(ns.listen or env.get("SPENDGATE_LISTEN") or DEFAULT_LISTEN)
    probe_listen = ns.probe_listen or env.get("SPENDGATE_PROBE_LISTEN")
    probe_listen = probe_listen or f"{host}:{DEFAULT_PROBE_PORT}"  # where --listen listens
    probe_host, probe_port = _listen(probe_listen, "--probe-listen")
    if probe_port == port:
        raise UsageError(f"--probe-listen {probe_listen!r}: must differ from the --listen port")
    cors = ns.cors_origin or [o for o in env.get("SPENDGATE_CORS_ORIGINS", "").split(",") if o]
    pricebook = ns.pricebook or env.get("SPENDGATE_PRICEBOOK") or "default/default"
    if pricebook.count("/") != 1 or "" in pricebook.split("/"):
        raise UsageError(f"--pricebook {pricebook!r}: expected NAMESPACE/NAME")
    fail_mode = ns.fail_mode or env.get("SPENDGATE_FAIL_MODE") or FailMode.closed.value
    if fail_mode not in FailMode.__members__:
        raise UsageError(f"--fail-mode {fail_mode!r}: expected closed or open")
    max_body = ns.max_body_bytes
    if max_body is None:
        max_body = env.get("SPENDGATE_MAX_BODY_BYTES")
    if max_body is not None and (not str(max_body).isdigit() or int(max_body) <= 0):
        raise UsageError(f"--max-body-bytes {max_body!r}: expected a positive integer")
    redis_url, cluster = redis_settings(ns, env)
    money_path = money_path_settings(ns, env)
    if fail_mode == FailMode.open.value and not money_path.get("journal_dir"):
        raise UsageError(
            "--fail-mode open needs --journal-dir (or SPENDGATE_JOURNAL_DIR): charges served"
            " without Redis must survive a crash"
        )
    settings = SidecarSettings(
        upstream=upstream.rstrip("/"),
        redis_url=redis_url,
        listen_host=host,
        listen_port=port,
        probe_host=probe_host,
        probe_port=probe_port,
        cors_origins=tuple(o.strip() for o in cors),
        pricebook=pricebook,
        fail_mode=FailMode(fail_mode),
        pod=ns.pod or env.get("SPENDGATE_POD", ""),
        cluster=cluster,
        **money_path,
    )
    return settings if max_body is None else replace(settings, max_body_bytes=int(max_body))


def _setup_logging(ns: argparse.Namespace) -> None:
    """``--log-level``/``--log-format``, else ``SPENDGATE_LOG_LEVEL``/``_FORMAT``: INFO, json."""
    env = os.environ
    level = ns.log_level or env.get("SPENDGATE_LOG_LEVEL") or "INFO"
    setup_logging(level, json=(ns.log_format or env.get("SPENDGATE_LOG_FORMAT")) != "text")


def cmd_sidecar(ns: argparse.Namespace) -> int:
    settings = sidecar_settings_from_args(ns)
    _setup_logging(ns)
    from spendgate.sidecar.journal import JournalError
    from spendgate.sidecar.server import serve  # written separately; imported only when used

    try:
        serve(settings)
    except JournalError as error:
        print(f"spendgate sidecar: {error}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- operator


def cmd_operator(ns: argparse.Namespace) -> int:
    # The operator package (never kopf: that is main's) is imported only for this command.
    from spendgate.operator.runtime.cli_args import operator_settings_from_args

    settings = operator_settings_from_args(ns)
    _setup_logging(ns)
    from spendgate.operator.runtime.main import run  # kopf is imported only when the operator runs

    run(settings)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis",
        metavar="URL",
        help=f"Redis URL (env SPENDGATE_REDIS_URL, default {DEFAULT_REDIS_URL})",
    )
    common.add_argument(
        "--redis-cluster",
        action="store_true",
        help="use Redis Cluster (env SPENDGATE_REDIS_CLUSTER=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    apply = sub.add_parser("apply", parents=[common], help="validate and apply manifests")
    apply.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="YAML file, repeatable; - reads stdin",
    )
    apply.add_argument(
        "--dry-run", action="store_true", help="validate the input only; Redis is not contacted"
    )

    for name, signed in (("fund", False), ("adjust", True)):
        what = "add or remove money (signed)" if signed else "add prepaid money"
        cmd = sub.add_parser(name, parents=[common], help=what)
        cmd.add_argument("customer", metavar="CUSTOMER", help="customerId")
        cmd.add_argument("amount", metavar="AMOUNT", help='decimal string, e.g. "10.00"')
        cmd.add_argument("--id", required=True, help="idempotency id: applied once per id")
        cmd.add_argument("--note", help="kept on the ledger entry")
        if signed:
            cmd.add_argument(
                "--allow-negative",
                action="store_true",
                help="apply even if the balance ends below zero (refused otherwise)",
            )

    balance = sub.add_parser("balance", parents=[common], help="show a customer's account")
    balance.add_argument("customer", metavar="CUSTOMER", help="customerId")
    balance.add_argument("--json", action="store_true", help="machine-readable output")
    balance.add_argument(
        "--wait-settled", action="store_true", help="wait until nothing is in flight, else exit 1"
    )
    balance.add_argument("--timeout", default="60s", help="for --wait-settled (default 60s)")

    side = sub.add_parser("sidecar", parents=[common], help="run the metering proxy")
    side.add_argument("--upstream", metavar="URL", help="model server (env SPENDGATE_UPSTREAM)")
    side.add_argument(
        "--listen", metavar="HOST:PORT", help=f"env SPENDGATE_LISTEN, default {DEFAULT_LISTEN}"
    )
    side.add_argument(
        "--probe-listen",
        metavar="HOST:PORT",
        help="/healthz, /readyz and /metrics (env SPENDGATE_PROBE_LISTEN,"
        f" default: the --listen host, port {DEFAULT_PROBE_PORT})",
    )
    side.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, repeatable, '*' for any"
        " (env SPENDGATE_CORS_ORIGINS, comma-separated; default none)",
    )
    side.add_argument(
        "--pricebook", metavar="NS/NAME", help="env SPENDGATE_PRICEBOOK, default default/default"
    )
    side.add_argument(
        "--fail-mode",
        choices=["closed", "open"],
        help="when Redis is unreachable (env SPENDGATE_FAIL_MODE, default closed)",
    )
    side.add_argument("--pod", help="pod name for the ledger (env SPENDGATE_POD)")
    add_money_path_arguments(side)
    side.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        help="largest request body (env SPENDGATE_MAX_BODY_BYTES)",
    )
    _add_logging_flags(side)

    op = sub.add_parser("operator", parents=[common], help="run the Kubernetes operator (kopf)")
    op.add_argument(
        "--watch-namespace",
        action="append",
        metavar="NS",
        help="watch only this namespace, repeatable (env SPENDGATE_WATCH_NAMESPACES=a,b;"
        " default: cluster-wide)",
    )
    op.add_argument(
        "--operator-namespace",
        metavar="NS",
        help="where the operator runs (env SPENDGATE_OPERATOR_NAMESPACE or POD_NAMESPACE)",
    )
    op.add_argument(
        "--status-interval",
        type=float,
        metavar="SECONDS",
        help="status refresh from Redis (env SPENDGATE_STATUS_INTERVAL, default 30)",
    )
    op.add_argument(
        "--alert-webhook-url",
        metavar="URL",
        help="POST Slack-compatible JSON alerts here (env SPENDGATE_ALERT_WEBHOOK_URL)",
    )
    op.add_argument(
        "--health-port", type=int, help="/healthz and /readyz (env SPENDGATE_HEALTH_PORT, 8081)"
    )
    op.add_argument(
        "--webhook-port", type=int, help="admission webhook (env SPENDGATE_WEBHOOK_PORT, 8443)"
    )
    op.add_argument("--webhook-cert-file", help="env SPENDGATE_WEBHOOK_CERT_FILE")
    op.add_argument("--webhook-key-file", help="env SPENDGATE_WEBHOOK_KEY_FILE")
    op.add_argument("--pod-name", help="leader identity (env POD_NAME)")
    op.add_argument(
        "--lease-name",
        metavar="NAME",
        help="Lease of the leader election, in the operator's namespace (env"
        " SPENDGATE_LEASE_NAME, default spendgate-leader)",
    )
    op.add_argument(
        "--no-leader-election",
        action="store_true",
        help="one replica only: kopf's handlers at once, no Lease and no singleton work (no"
        " Stripe processing or export, no bypass check) (env SPENDGATE_LEADER_ELECTION=false)",
    )
    op.add_argument(
        "--bypass-check-interval",
        type=float,
        metavar="SECONDS",
        help="check Services bypassing the sidecar this often, 0 = never"
        " (env SPENDGATE_BYPASS_CHECK_INTERVAL, default 120)",
    )
    _add_logging_flags(op)

    from .cli_accounting import add_commands  # it imports this module

    add_commands(sub, common)
    sub.add_parser(
        "standin-model",
        add_help=False,
        help="run the stand-in OpenAI-compatible model server (see --help)",
    )
    return parser


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", help="env SPENDGATE_LOG_LEVEL, default INFO")
    parser.add_argument(
        "--log-format", choices=["json", "text"], help="env SPENDGATE_LOG_FORMAT, default json"
    )


_ASYNC_COMMANDS = {
    "apply": cmd_apply,
    "fund": cmd_credit,
    "adjust": cmd_credit,
    "balance": cmd_balance,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _run_command(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
    except BrokenPipeError:
        # The reader went away (`spendgate balance --json | head -1`): stop quietly, as a
        # process killed by SIGPIPE would, and keep Python's exit-time flush from failing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


def _run_command(args: list[str]) -> int:
    command = args[0] if args else ""
    try:
        if command == "standin-model":
            from spendgate.sidecar.standin import main as standin_main

            return standin_main(args[1:])
        return _run_parsed(args)
    except ListenError as error:
        print(f"spendgate {command}: {error}", file=sys.stderr)
        return 1


def _run_parsed(args: list[str]) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if ns.command == "sidecar":
            return cmd_sidecar(ns)
        if ns.command == "operator":
            return cmd_operator(ns)
        from .cli_accounting import COMMANDS as ACCOUNTING_COMMANDS

        return asyncio.run({**_ASYNC_COMMANDS, **ACCOUNTING_COMMANDS}[ns.command](ns))
    except ApplyError as error:
        print(f"spendgate {ns.command}: invalid input:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        applied = "; ".join(error.applied) if error.applied else "nothing"
        print(f"applied: {applied}", file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"spendgate {ns.command}: {error}", file=sys.stderr)
        return 2
    except Failure as error:
        print(f"spendgate {ns.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
