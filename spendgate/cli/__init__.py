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
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import redis_connect
from ..accounting.balance import balance_view
from ..config_store import ConfigStore
from ..credits import CreditRefused
from ..keys import check_customer_id
from ..ledger import Account, Ledger, LedgerError, check_request_id
from ..listening import ListenError
from ..logs import redact
from ..manifests import ApplyError, apply_resources, dry_run_results, load_resources
from ..money import AmountError, format_amount, parse_amount

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
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
    from .accounting import in_flight_lines, settlement_state

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
    if report["ownSpentThisPeriod"] != report["spentThisPeriod"]:
        print(f"own spent   {report['ownSpentThisPeriod']}{unit} (the rest by its descendants)")
    for line in in_flight_lines(in_flight, unit):
        print(line)
    if not settled_in_time:
        print(f"spendgate balance: not settled within {ns.timeout}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- sidecar


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

    from .servers import add_commands as add_server_commands  # it imports this module

    add_server_commands(sub, common)

    from .accounting import add_commands  # it imports this module

    add_commands(sub, common)
    sub.add_parser(
        "standin-model",
        add_help=False,
        help="run the stand-in OpenAI-compatible model server (see --help)",
    )
    return parser


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
        if ns.command in ("sidecar", "operator"):
            from .servers import COMMANDS as SERVER_COMMANDS

            return SERVER_COMMANDS[ns.command](ns)
        from .accounting import COMMANDS as ACCOUNTING_COMMANDS

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
