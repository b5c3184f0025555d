"""A namespaced install (``operator.watchNamespaces``) on the real API server, with exactly the
RBAC the chart renders for it: no forbidden list or watch at start, reconciliation at once, and
``/readyz`` false while the operator cannot reconcile (a namespace its Roles do not cover, or
CRDs older than the operator -- the CRD upgrade path of docs/install.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spendgate import crd
from tests.support import e2e_chart
from tests.support.e2e_chart import ChartInstall
from tests.support.e2e_operator import OperatorProcess, condition, eventually, start_operator
from tests.support.kube_control_plane import KUBE_VERSION, ControlPlane, free_port
from tests.support.redis_servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE, WATCHED = "team", "spendgate-team", "team-a"
KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
BUDGETS_CRD = "customerbudgets.spendgate.dev"


def apply(plane: ControlPlane, objects: list[dict[str, Any]]) -> None:
    document = {"apiVersion": "v1", "kind": "List", "items": objects}
    plane.kubectl("apply", "-f", "-", input=json.dumps(document))


@pytest.fixture(scope="module")
def namespaced(
    kube_plane: ControlPlane, chart_install: ChartInstall
) -> tuple[list[dict[str, Any]], ChartInstall]:
    """The chart rendered with watchNamespaces [team-a] as its own release: its ServiceAccount
    and RBAC applied (the CRDs are the session's), and a kubeconfig with that account's token."""
    values = {"operator": {"watchNamespaces": [WATCHED]}}
    objects = e2e_chart.render(KUBE_VERSION, values, release=RELEASE, namespace=NAMESPACE)
    for namespace in (NAMESPACE, WATCHED):
        kube_plane.kubectl("create", "namespace", namespace)
    apply(kube_plane, [o for o in objects if o["kind"] in KINDS])
    account = e2e_chart.find(objects, "ServiceAccount")
    token = kube_plane.service_account_token(NAMESPACE, account["metadata"]["name"])
    install = ChartInstall(
        objects=objects,
        webhook_port=free_port(),  # the session's operator serves the chart's webhook port
        cert_file=chart_install.cert_file,
        key_file=chart_install.key_file,
        ca_pem=chart_install.ca_pem,
        service_account=(NAMESPACE, account["metadata"]["name"]),
        kubeconfig=kube_plane.kubeconfig(token, name="team"),
    )
    return objects, install


@pytest.fixture
def team_operator(
    kube_plane: ControlPlane,
    namespaced: tuple[list[dict[str, Any]], ChartInstall],
    operator_redis: RedisServer,
    tmp_path: Path,
) -> Iterator[Any]:
    objects, install = namespaced
    started: list[OperatorProcess] = []

    def start(**env: str) -> OperatorProcess:
        process = start_operator(
            kube_plane,
            install,
            objects,
            operator_redis.url,
            tmp_path / str(len(started)),
            env={"SPENDGATE_LOG_LEVEL": "DEBUG", **env},
            pod_name=f"team-spendgate-operator-{len(started)}",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def forbidden(process: OperatorProcess) -> list[str]:
    return [line for line in process.text().splitlines() if "forbidden" in line.lower()]


def test_a_namespaced_operator_needs_no_cluster_wide_namespace_access(
    kube_plane: ControlPlane, team_operator: Any
) -> None:
    process = team_operator()
    process.wait_ready()
    manifest = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": "team-budget", "namespace": WATCHED},
        "spec": {"customerId": "team-a-customer", "currency": "USD", "balance": "3.00"},
    }
    kube_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def reconciled() -> bool:
        body = kube_plane.get_json(f"cb/{manifest['metadata']['name']}", "-n", WATCHED)
        return (condition(body, "Ready") or {}).get("status") == "True" and any(
            "team-budget" in str(r.get("k8s_ref")) and "reconcile" in str(r.get("msg"))
            for r in process.lines()
        )

    eventually(reconciled, 30, "reconciled by the namespaced operator")
    assert forbidden(process) == []  # kopf no longer lists or watches Namespaces
    assert process.get("/readyz")[0] == 200


def test_readyz_is_false_while_a_watched_namespace_is_forbidden(team_operator: Any) -> None:
    process = team_operator(SPENDGATE_WATCH_NAMESPACES=f"{WATCHED},team-b")  # no Role there
    eventually(lambda: "team-b" in process.get("/readyz")[1], 30, "the readiness problem")
    status, body = process.get("/readyz")
    assert status == 503
    problems = json.loads(body)["problems"]
    assert any(p.startswith("cannot list CustomerBudgets in team-b:") for p in problems), problems
    assert "forbidden" in " ".join(problems)


def test_an_old_crd_is_refused_clearly_until_the_crds_are_applied(
    kube_plane: ControlPlane, team_operator: Any
) -> None:
    """helm upgrade never upgrades crds/: an operator newer than its CRDs is not ready and says
    which CRD and which command; after `kubectl apply --server-side -f crds/` it is ready."""
    annotation = crd.SCHEMA_ANNOTATION
    kube_plane.kubectl("annotate", "crd", BUDGETS_CRD, f"{annotation}-")  # as an older release
    try:
        process = team_operator()
        eventually(lambda: BUDGETS_CRD in process.get("/readyz")[1], 30, "the CRD problem")
        status, body = process.get("/readyz")
        assert status == 503
        assert (
            f"the installed CRD {BUDGETS_CRD} is schema generation none, this operator needs"
            f" {crd.SCHEMA_GENERATION}: kubectl apply --server-side -f crds/"
        ) in body
        logged = process.wait_for_log(lambda r: r.get("msg") == "this replica cannot reconcile")
        assert BUDGETS_CRD in logged["problem"]
    finally:
        # The documented upgrade step (docs/install.md, "Upgrades"), client-side and without
        # kubectl's validation only because 1.20 predates CEL rules (its server-side apply and
        # its OpenAPI refuse x-kubernetes-validations, which its CRD storage drops).
        kube_plane.kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    eventually(lambda: process.get("/readyz")[0] == 200, 30, "ready after the CRDs are applied")
    applied = kube_plane.get_json(f"crd/{BUDGETS_CRD}")
    assert applied["metadata"]["annotations"][annotation] == str(crd.SCHEMA_GENERATION)
