"""The chart's CRDs and RBAC on a real kube-apiserver, and the examples applied with kubectl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e_chart import ChartInstall
from tests.support.kube_control_plane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def can_i(plane: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = plane.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    return result.stdout.strip() == "yes"


def test_the_server_is_the_version_the_tier_claims(kube_plane: ControlPlane) -> None:
    status, version = kube_plane.request("GET", "/version")
    assert status == 200
    assert (version["major"], version["minor"]) == ("1", "20")


def test_chart_crds_are_established_and_served(
    kube_plane: ControlPlane, chart_install: ChartInstall
) -> None:
    names = {
        crd["metadata"]["name"]
        for crd in chart_install.objects
        if crd["kind"] == "CustomResourceDefinition"
    }
    assert {"customerbudgets.spendgate.dev", "pricebooks.spendgate.dev"} <= names
    for name in names:
        crd = kube_plane.get_json(f"crd/{name}")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NonStructuralSchema") is None, (name, conditions)
    # the short name a user types
    assert kube_plane.kubectl("get", "cb", "-A").returncode == 0


def test_examples_apply_and_show_their_printer_columns(
    kube_plane: ControlPlane, chart_install: ChartInstall
) -> None:
    out = kube_plane.kubectl(
        "apply", "-f", str(EXAMPLES / "pricebook.yaml"), "-f", str(EXAMPLES / "budgets.yaml")
    ).stdout
    assert "customerbudget.spendgate.dev/acme" in out
    table = kube_plane.kubectl("get", "cb", "-n", "default").stdout.splitlines()
    header = table[0].split()
    assert header[:2] == ["NAME", "CUSTOMER"], table[0]
    assert {line.split()[0] for line in table[1:]} == {"acme", "tinyco", "burstco", "postpaid"}
    # defaults from the schema were applied by the server (structural schema + defaulting)
    acme = kube_plane.get_json("cb/acme", "-n", "default")
    keys = acme["spec"]["apiKeys"]
    assert all(k.get("disabled") is False for k in keys), keys


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"spec": {"mode": "free-for-all"}}, "spec.mode"),
        ({"spec": {"balance": "lots"}}, "spec.balance"),
        ({"spec": {"rateLimits": [{"requests": 1, "per": "fortnight"}]}}, "spec.rateLimits.per"),
        ({"spec": {"unknownField": 1}}, None),  # pruned, not stored
    ],
)
def test_the_server_validates_budgets_by_the_crd_schema(
    kube_plane: ControlPlane,
    chart_install: ChartInstall,
    patch: dict[str, Any],
    message: str | None,
) -> None:
    budget = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": "schema-check", "namespace": "default"},
        "spec": {
            "customerId": "schema-check",
            "mode": "prepaid",
            "currency": "USD",
            "balance": "1",
        },
    }
    budget["spec"].update(patch["spec"])
    status, body = kube_plane.request(
        "POST", "/apis/spendgate.dev/v1alpha1/namespaces/default/customerbudgets", budget
    )
    try:
        if message is None:
            assert status == 201, body
            assert "unknownField" not in body["spec"]
        else:
            assert status == 422, body
            assert message in json.dumps(body), body
    finally:
        kube_plane.request(
            "DELETE", "/apis/spendgate.dev/v1alpha1/namespaces/default/customerbudgets/schema-check"
        )


def test_service_account_has_what_the_chart_grants_and_no_more(
    kube_plane: ControlPlane, chart_install: ChartInstall
) -> None:
    config = chart_install.kubeconfig
    namespace = chart_install.service_account[0]
    allowed = [
        ("list", "customerbudgets.spendgate.dev", "-A"),
        ("watch", "customerbudgets.spendgate.dev", "-A"),
        ("patch", "customerbudgets.spendgate.dev/status", "-n", "default"),
        ("get", "secrets", "-n", "default"),
        ("create", "events", "-n", "default"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
        ("get", "namespaces"),
        ("create", "leases.coordination.k8s.io", "-n", namespace),
    ]
    for check in allowed:
        assert can_i(kube_plane, config, *check), check
    denied = [
        ("delete", "customerbudgets.spendgate.dev", "-n", "default"),
        ("create", "customerbudgets.spendgate.dev", "-n", "default"),
        ("update", "secrets", "-n", "default"),
        ("create", "pods", "-n", "default"),
        ("create", "leases.coordination.k8s.io", "-n", "default"),
    ]
    for check in denied:
        assert not can_i(kube_plane, config, *check), check
