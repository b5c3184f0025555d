"""``spendgate operator``'s flags and ``SPENDGATE_*`` variables → :class:`OperatorSettings`.

The parser is ``spendgate.cli``'s; ``cmd_operator`` imports this module only when the operator
runs, so the data-plane commands never load the operator package.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from spendgate import redis_connect
from spendgate.cli import TRUE_WORDS, UsageError, redis_settings
from spendgate.logs import redact

from ..stripe.settings import StripeSettings
from .settings import InjectionDefaults, OperatorSettings

FALSE_WORDS = {"0", "false", "no", "off"}
N = TypeVar("N", int, float)


def _flag_or_env(
    kind: Callable[[str], N], ns_value: N | None, env: Mapping[str, str], name: str, flag: str
) -> N | None:
    """The flag's value if given, else the variable ``name`` (unset or empty: None)."""
    if ns_value is not None:
        return ns_value
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise UsageError(f"{flag} ({name}={text!r}): expected {expected}") from None


def injection_defaults_from_env(env: Mapping[str, str]) -> InjectionDefaults:
    """``InjectionDefaults`` with ``SPENDGATE_SIDECAR_<FIELD>`` variables applied (the Helm
    chart passes the sidecar defaults so). Booleans are true/false; ``native_sidecars`` also
    takes ``auto`` (detect from the API server's version)."""
    defaults = InjectionDefaults()
    values: dict[str, Any] = {}
    for item in fields(InjectionDefaults):
        name = f"SPENDGATE_SIDECAR_{item.name.upper()}"
        text = env.get(name)
        if text is None or text.strip() == "":
            continue
        text = text.strip()
        kind = str(item.type)
        if "bool" in kind:
            lowered = text.lower()
            if lowered in TRUE_WORDS or lowered in FALSE_WORDS:
                values[item.name] = lowered in TRUE_WORDS
            elif "None" in kind and lowered == "auto":
                values[item.name] = None
            else:
                raise UsageError(f"{name}={text!r}: expected true or false")
        elif kind == "int":
            try:
                values[item.name] = int(text)
            except ValueError:
                raise UsageError(f"{name}={text!r}: expected an integer") from None
        else:
            values[item.name] = text
    return replace(defaults, **values)


def operator_settings_from_args(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> OperatorSettings:
    """``OperatorSettings`` from flags, falling back to ``SPENDGATE_*`` variables, then defaults."""
    env = os.environ if environ is None else environ
    defaults = OperatorSettings()
    redis_url, cluster = redis_settings(ns, env)
    watched = list(ns.watch_namespace or [])
    if not watched and env.get("SPENDGATE_WATCH_NAMESPACES"):
        watched = [n.strip() for n in env["SPENDGATE_WATCH_NAMESPACES"].split(",") if n.strip()]
    interval = _flag_or_env(
        float, ns.status_interval, env, "SPENDGATE_STATUS_INTERVAL", "--status-interval"
    )
    if interval is not None and interval <= 0:
        raise UsageError("--status-interval must be positive (seconds)")
    health_port = _flag_or_env(int, ns.health_port, env, "SPENDGATE_HEALTH_PORT", "--health-port")
    webhook_port = _flag_or_env(
        int, ns.webhook_port, env, "SPENDGATE_WEBHOOK_PORT", "--webhook-port"
    )
    for flag, port in (("--health-port", health_port), ("--webhook-port", webhook_port)):
        if port is not None and not 0 <= port < 65536:
            raise UsageError(f"{flag} {port}: expected a TCP port")
    alert_url = ns.alert_webhook_url or env.get("SPENDGATE_ALERT_WEBHOOK_URL") or None
    if alert_url is not None and urlsplit(alert_url).scheme not in ("http", "https"):
        raise UsageError("--alert-webhook-url: expected an http(s) URL")
    try:
        redis_connect.parse_redis_url(redis_url, cluster=cluster)
    except ValueError as error:
        raise UsageError(f"invalid Redis URL {redact(redis_url)}: {error}") from None
    bypass = _flag_or_env(
        float,
        ns.bypass_check_interval,
        env,
        "SPENDGATE_BYPASS_CHECK_INTERVAL",
        "--bypass-check-interval",
    )
    if bypass is not None and bypass < 0:
        raise UsageError("--bypass-check-interval must be 0 (off) or positive (seconds)")
    audit = _flag_or_env(float, None, env, "SPENDGATE_AUDIT_INTERVAL", "SPENDGATE_AUDIT_INTERVAL")
    if audit is not None and audit < 0:
        raise UsageError("SPENDGATE_AUDIT_INTERVAL must be 0 (off) or positive (seconds)")
    watch = _flag_or_env(
        float, None, env, "SPENDGATE_SPEND_WATCH_INTERVAL", "SPENDGATE_SPEND_WATCH_INTERVAL"
    )
    if watch is not None and watch < 0:
        raise UsageError("SPENDGATE_SPEND_WATCH_INTERVAL must be 0 (off) or positive (seconds)")
    election = (env.get("SPENDGATE_LEADER_ELECTION") or "true").strip().lower()
    if election not in TRUE_WORDS | FALSE_WORDS:
        raise UsageError(f"SPENDGATE_LEADER_ELECTION={election!r}: expected true or false")
    leader_election = not ns.no_leader_election and election in TRUE_WORDS
    stripe = stripe_settings_from_env(env, watched=tuple(watched))
    if stripe is not None and not leader_election:
        # Stripe's events, funding and usage export are singleton work: without the Lease
        # nothing would process them, and a failed payment would suspend nobody.
        raise UsageError(
            "Stripe (SPENDGATE_STRIPE_ENABLED) needs leader election: Stripe events and the"
            " usage export run on the Lease holder only; drop --no-leader-election /"
            " SPENDGATE_LEADER_ELECTION=false (one replica simply holds the Lease)"
        )
    return replace(
        defaults,
        redis_url=redis_url,
        redis_cluster=cluster,
        namespace=ns.operator_namespace
        or env.get("SPENDGATE_OPERATOR_NAMESPACE")
        or env.get("POD_NAMESPACE")
        or defaults.namespace,
        namespaces=tuple(watched),
        status_interval_s=interval if interval is not None else defaults.status_interval_s,
        alert_webhook_url=alert_url,
        health_port=health_port if health_port is not None else defaults.health_port,
        webhook_port=webhook_port if webhook_port is not None else defaults.webhook_port,
        webhook_cert_file=ns.webhook_cert_file
        or env.get("SPENDGATE_WEBHOOK_CERT_FILE")
        or defaults.webhook_cert_file,
        webhook_key_file=ns.webhook_key_file
        or env.get("SPENDGATE_WEBHOOK_KEY_FILE")
        or defaults.webhook_key_file,
        pod_name=ns.pod_name or env.get("POD_NAME") or env.get("SPENDGATE_POD") or "",
        injection=injection_defaults_from_env(env),
        leader_election=leader_election,
        lease_name=ns.lease_name or env.get("SPENDGATE_LEASE_NAME") or defaults.lease_name,
        bypass_check_interval_s=bypass if bypass is not None else defaults.bypass_check_interval_s,
        audit_interval_s=audit if audit is not None else defaults.audit_interval_s,
        spend_watch_interval_s=watch if watch is not None else defaults.spend_watch_interval_s,
        stripe=stripe,
    )


def stripe_settings_from_env(
    env: Mapping[str, str], *, watched: tuple[str, ...] = ()
) -> StripeSettings | None:
    """``StripeSettings`` from ``SPENDGATE_STRIPE_*`` when ``SPENDGATE_STRIPE_ENABLED`` is
    true (the chart sets it with ``stripe.enabled``); else None: Stripe stays off.

    With ``SPENDGATE_STRIPE_IMPORT_ENABLED`` the import template is read and validated now
    (rendered for a sample customer), so a broken one stops the operator with what to fix."""
    if env.get("SPENDGATE_STRIPE_ENABLED", "").strip().lower() not in TRUE_WORDS:
        return None
    try:
        settings = StripeSettings.from_env(env)
    except ValueError as error:  # int("x") included
        raise UsageError(f"SPENDGATE_STRIPE_*: {error}") from None
    if settings.import_enabled:
        from ..stripe.sync import load_import_template  # never kopf: that is main's

        try:
            load_import_template(settings, watched)
        except ValueError as error:  # TemplateError
            raise UsageError(f"SPENDGATE_STRIPE_IMPORT_TEMPLATE_FILE: {error}") from None
    return settings


__all__ = ["injection_defaults_from_env", "operator_settings_from_args", "stripe_settings_from_env"]
