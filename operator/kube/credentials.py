"""Where the operator's credentials for the API server come from: loaded once, used by all.

:func:`load_connection` returns a ``kopf.ConnectionInfo`` -- the same value kopf's login handler
returns, so kopf and :class:`~spendgate.operator.kube.client.KubeClient` (Secrets, Events,
Leases, admission's reads, Stripe's Secrets) talk to the API server with one set of credentials.
In this order:

1. **in a cluster** (``KUBERNETES_SERVICE_HOST``/``PORT`` set and the service account's token
   mounted): the token, CA and namespace of the pod's service account. The kubelet rotates the
   token file; the client loads the credentials again when the API server answers 401.
2. **a kubeconfig** (``KUBECONFIG``, a list of files as kubectl takes it, else
   ``~/.kube/config``): the current context's server, CA (file or data), client certificate
   and key (files or data), token or ``tokenFile``, basic auth, ``insecure-skip-tls-verify``,
   ``proxy-url``, and ``exec`` credential plugins (``client.authentication.k8s.io``
   ExecCredential: token or client certificate, with its expiry). Relative file names are
   relative to the kubeconfig that names them, as kubectl reads them.

Nothing here logs a token, a key or a password.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import kopf
import yaml

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
EXEC_TIMEOUT_S = 30.0


class CredentialsError(RuntimeError):
    """No usable credentials: the message says where the operator looked and what was wrong."""


@dataclass(frozen=True)
class Connection:
    """Loaded credentials and where they came from (for the start-up log line)."""

    info: kopf.ConnectionInfo
    source: str  # "in-cluster service account" or "kubeconfig PATH (context NAME)"


def load_connection(
    environ: Mapping[str, str] | None = None, service_account: str = SERVICE_ACCOUNT
) -> Connection:
    """In-cluster credentials if the pod has them, else the kubeconfig's current context."""
    environ = os.environ if environ is None else environ
    in_cluster = in_cluster_connection(environ, service_account)
    if in_cluster is not None:
        return in_cluster
    paths = kubeconfig_paths(environ)
    if not paths:
        raise CredentialsError(
            "no Kubernetes credentials: not in a cluster (KUBERNETES_SERVICE_HOST/PORT unset or"
            f" no token in {service_account}) and no kubeconfig (KUBECONFIG unset, no"
            " ~/.kube/config)"
        )
    return kubeconfig_connection(paths, environ)


def in_cluster_connection(
    environ: Mapping[str, str], service_account: str = SERVICE_ACCOUNT
) -> Connection | None:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    token_file = Path(service_account) / "token"
    if not host or not port or not token_file.is_file():
        return None
    host = f"[{host}]" if ":" in host else host
    ca_file = Path(service_account) / "ca.crt"
    ns_file = Path(service_account) / "namespace"
    info = kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(ca_file) if ca_file.is_file() else None,
        token=token_file.read_text(encoding="utf-8").strip() or None,
        default_namespace=ns_file.read_text(encoding="utf-8").strip()
        if ns_file.is_file()
        else None,
    )
    return Connection(info, "in-cluster service account")


def kubeconfig_paths(environ: Mapping[str, str]) -> list[Path]:
    listed = environ.get("KUBECONFIG", "")
    if listed.strip():
        return [Path(p).expanduser() for p in listed.split(os.pathsep) if p.strip()]
    home = environ.get("HOME")
    default = Path(home) / ".kube" / "config" if home else Path("~/.kube/config").expanduser()
    return [default] if default.is_file() else []


def _named(items: Any, what: str, path: Path) -> dict[str, tuple[dict[str, Any], Path]]:
    found: dict[str, tuple[dict[str, Any], Path]] = {}
    for item in items or []:
        if not isinstance(item, Mapping) or "name" not in item:
            raise CredentialsError(f"kubeconfig {path}: a {what} entry without a name")
        found.setdefault(str(item["name"]), (dict(item.get(what) or {}), path))
    return found


def kubeconfig_connection(paths: list[Path], environ: Mapping[str, str]) -> Connection:
    """The current context of the merged kubeconfigs (the first file to set a value wins)."""
    current: str | None = None
    contexts: dict[str, tuple[dict[str, Any], Path]] = {}
    clusters: dict[str, tuple[dict[str, Any], Path]] = {}
    users: dict[str, tuple[dict[str, Any], Path]] = {}
    for path in paths:
        if not path.is_file():
            continue  # kubectl skips missing files of the list too
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CredentialsError(f"cannot read the kubeconfig {path}: {error}") from None
        if not isinstance(config, Mapping):
            raise CredentialsError(f"kubeconfig {path}: not a mapping")
        current = current or config.get("current-context") or None
        for name, value in _named(config.get("contexts"), "context", path).items():
            contexts.setdefault(name, value)
        for name, value in _named(config.get("clusters"), "cluster", path).items():
            clusters.setdefault(name, value)
        for name, value in _named(config.get("users"), "user", path).items():
            users.setdefault(name, value)
    where = os.pathsep.join(str(p) for p in paths)
    if current is None:
        raise CredentialsError(f"kubeconfig {where}: no current-context")
    if current not in contexts:
        raise CredentialsError(
            f"kubeconfig {where}: the current context {current!r} is not defined"
        )
    context = contexts[current][0]
    cluster_name, user_name = context.get("cluster"), context.get("user")
    if cluster_name not in clusters:
        raise CredentialsError(f"kubeconfig {where}: context {current!r} names no known cluster")
    cluster, cluster_file = clusters[cluster_name]
    user, user_file = users.get(user_name, ({}, paths[0])) if user_name else ({}, paths[0])
    if not cluster.get("server"):
        raise CredentialsError(f"kubeconfig {where}: cluster {cluster_name!r} has no server")

    def file(value: Any, base: Path) -> str | None:
        return None if not value else str(base.parent / Path(str(value)).expanduser())

    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(file(user["tokenFile"], user_file) or "").read_text(encoding="utf-8").strip()
    fields: dict[str, Any] = {
        "certificate_path": file(user.get("client-certificate"), user_file),
        "certificate_data": user.get("client-certificate-data"),
        "private_key_path": file(user.get("client-key"), user_file),
        "private_key_data": user.get("client-key-data"),
        "token": token or None,
        "username": user.get("username"),
        "password": user.get("password"),
    }
    if user.get("exec"):
        fields.update(run_exec_plugin(user["exec"], environ, user_file))
    elif user.get("auth-provider"):
        fields["token"] = (user["auth-provider"].get("config") or {}).get("access-token")
    info = kopf.ConnectionInfo(
        server=str(cluster["server"]),
        ca_path=file(cluster.get("certificate-authority"), cluster_file),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")) or None,
        proxy_url=cluster.get("proxy-url"),
        default_namespace=context.get("namespace"),
        **fields,
    )
    return Connection(info, f"kubeconfig {where} (context {current})")


def run_exec_plugin(
    spec: Mapping[str, Any], environ: Mapping[str, str], base: Path
) -> dict[str, Any]:
    """Run an ``exec`` credential plugin; its ExecCredential's token or client certificate."""
    command = str(spec.get("command") or "")
    if not command:
        raise CredentialsError("kubeconfig exec plugin: no command")
    if "/" in command and not Path(command).is_absolute():
        command = str(base.parent / command)
    env = {**environ, **{str(e["name"]): str(e["value"]) for e in spec.get("env") or []}}
    api_version = spec.get("apiVersion") or "client.authentication.k8s.io/v1"
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    try:
        done = subprocess.run(
            [command, *map(str, spec.get("args") or [])],
            env=env,
            capture_output=True,
            text=True,
            timeout=EXEC_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CredentialsError(f"kubeconfig exec plugin {command}: {error}") from None
    if done.returncode != 0:
        raise CredentialsError(
            f"kubeconfig exec plugin {command} exited {done.returncode}:"
            f" {done.stderr.strip()[:300]}"
        )
    try:
        status = json.loads(done.stdout).get("status") or {}
    except (ValueError, AttributeError):
        raise CredentialsError(f"kubeconfig exec plugin {command}: no ExecCredential") from None
    expiry = status.get("expirationTimestamp")
    fields: dict[str, Any] = {
        "token": status.get("token"),
        "certificate_data": _b64(status.get("clientCertificateData")),
        "private_key_data": _b64(status.get("clientKeyData")),
        "expiration": datetime.fromisoformat(expiry.replace("Z", "+00:00")) if expiry else None,
    }
    if not fields["token"] and not fields["certificate_data"]:
        raise CredentialsError(f"kubeconfig exec plugin {command}: neither token nor certificate")
    return {k: v for k, v in fields.items() if v is not None}


def _b64(pem: str | None) -> str | None:
    """kopf takes ``*_data`` base64-encoded, as kubeconfigs hold them; ExecCredential holds PEM."""
    return base64.b64encode(pem.encode()).decode() if pem else None


__all__ = [
    "SERVICE_ACCOUNT",
    "Connection",
    "CredentialsError",
    "in_cluster_connection",
    "kubeconfig_connection",
    "kubeconfig_paths",
    "load_connection",
    "run_exec_plugin",
]
