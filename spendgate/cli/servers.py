"""The long-running commands of ``spendgate``: ``sidecar`` (the metering proxy) and
``operator`` (the Kubernetes operator). Wired into ``spendgate.cli`` by :func:`add_commands`;
each imports its server only when it runs (kopf and aiohttp never load for ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from spendgate.sidecar.money_args import MoneyArgError
from spendgate.sidecar.money_args import add_arguments as add_money_path_arguments
from spendgate.sidecar.money_args import overrides as money_path_overrides
from spendgate.sidecar.settings import FailMode, SidecarSettings

from .. import cli
from ..logs import setup_logging

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_PROBE_PORT = 8081


def _listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise cli.UsageError(f"{flag} {text!r}: expected HOST:PORT, like 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def money_path_settings(ns: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    try:
        return money_path_overrides(ns, env)
    except MoneyArgError as error:
        raise cli.UsageError(str(error)) from None


def sidecar_settings_from_args(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SidecarSettings:
    """``SidecarSettings`` from flags, falling back to ``SPENDGATE_*`` variables, then defaults."""
    env = os.environ if environ is None else environ
    upstream = ns.upstream or env.get("SPENDGATE_UPSTREAM")
    if not upstream:
        raise cli.UsageError(
            "--upstream (or SPENDGATE_UPSTREAM) is required, e.g. http://127.0.0.1:8000"
        )
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise cli.UsageError(f"--upstream {upstream!r}: expected an http(s) URL")
    host, port = _listen(ns.listen or env.get("SPENDGATE_LISTEN") or DEFAULT_LISTEN)
    probe_listen = ns.probe_listen or env.get("SPENDGATE_PROBE_LISTEN")
    probe_listen = probe_listen or f"{host}:{DEFAULT_PROBE_PORT}"  # where --listen listens
    probe_host, probe_port = _listen(probe_listen, "--probe-listen")
    if probe_port == port:
        raise cli.UsageError(f"--probe-listen {probe_listen!r}: must differ from the --listen port")
    cors = ns.cors_origin or [o for o in env.get("SPENDGATE_CORS_ORIGINS", "").split(",") if o]
    pricebook = ns.pricebook or env.get("SPENDGATE_PRICEBOOK") or "default/default"
    if pricebook.count("/") != 1 or "" in pricebook.split("/"):
        raise cli.UsageError(f"--pricebook {pricebook!r}: expected NAMESPACE/NAME")
    fail_mode = ns.fail_mode or env.get("SPENDGATE_FAIL_MODE") or FailMode.closed.value
    if fail_mode not in FailMode.__members__:
        raise cli.UsageError(f"--fail-mode {fail_mode!r}: expected closed or open")
    max_body = ns.max_body_bytes
    if max_body is None:
        max_body = env.get("SPENDGATE_MAX_BODY_BYTES")
    if max_body is not None and (not str(max_body).isdigit() or int(max_body) <= 0):
        raise cli.UsageError(f"--max-body-bytes {max_body!r}: expected a positive integer")
    redis_url, cluster = cli.redis_settings(ns, env)
    money_path = money_path_settings(ns, env)
    if fail_mode == FailMode.open.value and not money_path.get("journal_dir"):
        raise cli.UsageError(
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


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``sidecar`` and ``operator`` subcommands."""
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


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", help="env SPENDGATE_LOG_LEVEL, default INFO")
    parser.add_argument(
        "--log-format", choices=["json", "text"], help="env SPENDGATE_LOG_FORMAT, default json"
    )


COMMANDS = {"sidecar": cmd_sidecar, "operator": cmd_operator}

__all__ = [
    "COMMANDS",
    "DEFAULT_LISTEN",
    "DEFAULT_PROBE_PORT",
    "add_commands",
    "cmd_operator",
    "cmd_sidecar",
    "money_path_settings",
    "sidecar_settings_from_args",
]
