"""Where the operator's one API client finds its credentials (operator/kube/credentials.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from spendgate.operator.kube.credentials import CredentialsError, load_connection


def kubeconfig(path: Path, user: dict[str, object], **cluster: object) -> Path:
    path.write_text(
        json.dumps(
            {
                "current-context": "dev",
                "contexts": [
                    {"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}}
                ],
                "clusters": [{"name": "c", "cluster": {"server": "https://k:6443", **cluster}}],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_an_exec_plugin_gives_a_token_with_its_expiry(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.sh"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "exec-token-1", "expirationTimestamp": "2030-01-01T00:00:00Z"},
    }
    plugin.write_text(
        f"#!/bin/sh\ntest -n \"$KUBERNETES_EXEC_INFO\" && echo '{json.dumps(credential)}'\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    config = kubeconfig(
        tmp_path / "config",
        {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin.sh"}},
        **{"insecure-skip-tls-verify": True, "proxy-url": "http://proxy:3128"},
    )
    connection = load_connection({"KUBECONFIG": str(config), "PATH": "/usr/bin:/bin"})
    info = connection.info
    assert info.token == "exec-token-1" and info.expiration is not None
    assert info.expiration.year == 2030
    assert info.insecure is True and info.proxy_url == "http://proxy:3128"
    assert info.default_namespace == "ns1"


def test_client_certificates_are_found_beside_the_kubeconfig(tmp_path: Path) -> None:
    config = kubeconfig(
        tmp_path / "config",
        {"client-certificate": "me.crt", "client-key": "/abs/me.key"},
        **{"certificate-authority-data": "Q0E="},
    )
    info = load_connection({"KUBECONFIG": str(config)}).info
    assert info.certificate_path == str(tmp_path / "me.crt")
    assert info.private_key_path == "/abs/me.key" and info.ca_data == "Q0E="


def test_kubeconfig_lists_merge_first_wins_and_home_is_the_default(tmp_path: Path) -> None:
    first = kubeconfig(tmp_path / "a", {"token": "from-a"})
    second = tmp_path / "b"
    second.write_text(
        json.dumps(
            {"current-context": "other", "users": [{"name": "u", "user": {"token": "from-b"}}]}
        )
    )
    info = load_connection({"KUBECONFIG": f"{first}:{second}:{tmp_path / 'missing'}"}).info
    assert info.token == "from-a"
    (tmp_path / ".kube").mkdir()
    kubeconfig(tmp_path / ".kube" / "config", {"token": "home"})
    assert load_connection({"HOME": str(tmp_path)}).info.token == "home"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "no current-context"),
        (json.dumps({"current-context": "x"}), "the current context 'x' is not defined"),
        ("[1, 2", "cannot read the kubeconfig"),
    ],
)
def test_a_broken_kubeconfig_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config").write_text(text)
    with pytest.raises(CredentialsError, match=message):
        load_connection({"KUBECONFIG": str(tmp_path / "config")})
