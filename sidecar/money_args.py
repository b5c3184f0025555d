"""The sidecar's money-path flags: Redis pool size, hold grace, the expired-hold sweep, the
fail-open allowance and the journal."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from spendgate.durations import parse_duration
from spendgate.money import AmountError, parse_amount

# flag, environment variable, SidecarSettings field, kind ("count" or "duration"), help
_FLAGS = (
    ("--redis-pool-size", "SPENDGATE_REDIS_POOL_SIZE", "redis_pool_size", "count",
     "Redis calls in flight at once (per node on a Cluster); more wait up to the Redis"
     " timeout, then get 503 (default 256)"),
    ("--redis-timeout", "SPENDGATE_REDIS_TIMEOUT", "redis_timeout_s", "seconds",
     "a Redis call that takes longer counts as Redis unreachable; also the longest wait for"
     " a free slot (default 500ms)"),
    ("--hold-grace", "SPENDGATE_HOLD_GRACE", "hold_grace_ms", "duration",
     "a hold outlives its rule's timeout by this much (default 30s)"),
    ("--hold-sweep-interval", "SPENDGATE_HOLD_SWEEP_INTERVAL", "hold_sweep_interval_ms",
     "duration", "release expired holds of every customer this often, 0 = never (default 10s)"),
    ("--fail-open-allowance", "SPENDGATE_FAIL_OPEN_ALLOWANCE", "fail_open_allowance", "amount",
     "with --fail-mode open: the most each customer may be served unreserved while Redis is"
     " unreachable, in the budget's own currency; 0 = nothing (default 1.00)"),
    ("--journal-dir", "SPENDGATE_JOURNAL_DIR", "journal_dir", "path",
     "keep charges not on the ledger yet in DIR/journal.jsonl, replayed at start (required"
     " with --fail-mode open)"),
)  # fmt: skip


class MoneyArgError(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    metavars = {"amount": "AMOUNT", "path": "DIR"}
    for flag, env, _, kind, help_text in _FLAGS:
        parser.add_argument(flag, metavar=metavars.get(kind), help=f"{help_text} (env {env})")


def overrides(ns: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """SidecarSettings fields given by flags or environment; absent ones keep their defaults."""
    values: dict[str, Any] = {}
    for flag, env, name, kind, _ in _FLAGS:
        raw = getattr(ns, flag.lstrip("-").replace("-", "_"), None)
        if raw is None:
            raw = environ.get(env)
        if raw is None or raw == "":
            continue
        if kind == "path":
            values[name] = str(raw)
        elif kind == "amount":
            try:
                values[name] = parse_amount(str(raw))
            except AmountError as error:
                raise MoneyArgError(f"{flag}: {error}") from None
        elif kind == "count":
            if not str(raw).isdigit() or int(raw) <= 0:
                raise MoneyArgError(f"{flag} {raw!r}: expected a positive integer")
            values[name] = int(raw)
        else:
            try:
                milliseconds = parse_duration(int(raw) if str(raw).isdigit() else raw)
            except ValueError as error:
                raise MoneyArgError(f"{flag} {raw!r}: {error}") from None
            if kind == "seconds":
                if milliseconds <= 0:
                    raise MoneyArgError(f"{flag} {raw!r}: must be longer than 0")
                values[name] = milliseconds / 1000
            else:
                values[name] = milliseconds
    return values
