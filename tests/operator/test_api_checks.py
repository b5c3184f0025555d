"""What keeps a replica from reconciling shows in /readyz (operator/kube/api_checks.py): CRDs
older than the operator (Helm never upgrades crds/) and lists its RBAC forbids."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest

from spendgate import crd
from spendgate.operator.kube.api_checks import API_CHECK_PROBLEMS, ApiChecks, crd_problem
from spendgate.operator.kube.client import KubeClient
from spendgate.operator.kube.retry import KubernetesUnavailable
from tests.support.kube_emulator import CRDS, Kubectl, started_emulator

pytestmark = pytest.mark.timeout(30)
BUDGETS_CRD = "customerbudgets.spendgate.dev"


def test_crd_generations() -> None:
    current = crd.definition(crd.RESOURCES[0])
    assert crd_problem(BUDGETS_CRD, current) is None
    newer = copy.deepcopy(current)
    newer["metadata"]["annotations"][crd.SCHEMA_ANNOTATION] = str(crd.SCHEMA_GENERATION + 1)
    assert crd_problem(BUDGETS_CRD, newer) is None  # upgrades apply the new CRDs first
    older = copy.deepcopy(current)
    del older["metadata"]["annotations"]  # the CRDs of a release before generations
    problem = crd_problem(BUDGETS_CRD, older)
    assert problem == (
        f"the installed CRD {BUDGETS_CRD} is schema generation none, this operator needs"
        f" {crd.SCHEMA_GENERATION}: kubectl apply --server-side -f crds/ (the chart's crds/ of"
        " this version)"
    )
    assert "is not installed" in str(crd_problem(BUDGETS_CRD, None))


async def test_an_old_crd_keeps_the_replica_unready_until_it_is_applied() -> None:
    async with started_emulator() as (emulator, url):
        kubectl = Kubectl(emulator)
        old = kubectl.get(CRDS, None, BUDGETS_CRD)
        assert old is not None
        await kubectl.patch(
            CRDS, None, BUDGETS_CRD, {"metadata": {"annotations": {crd.SCHEMA_ANNOTATION: None}}}
        )
        kube = KubeClient(timeout_s=3)
        kube.configure(kopf.ConnectionInfo(server=url))
        checks = ApiChecks(kube, ["default"], retry_s=0.05)
        assert checks.readiness() == "the API checks (CRDs, RBAC) have not run yet"
        stop = asyncio.Event()
        task = asyncio.create_task(checks.run(stop))
        try:
            await kubectl.wait_for(lambda: checks.problems, what="a problem")
            assert f"the installed CRD {BUDGETS_CRD} is schema generation none" in str(
                checks.readiness()
            )
            assert API_CHECK_PROBLEMS._value.get() == 1
            # kubectl apply -f crds/: ready again, without a restart
            await kubectl.patch(
                CRDS,
                None,
                BUDGETS_CRD,
                {"metadata": {"annotations": {crd.SCHEMA_ANNOTATION: str(crd.SCHEMA_GENERATION)}}},
            )
            await kubectl.wait_for(lambda: checks.problems == [], what="no problem")
            assert checks.readiness() is None and API_CHECK_PROBLEMS._value.get() == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await kube.aclose()


class ForbiddingApi:
    """Lists in one namespace are forbidden, as the RBAC authorizer answers them."""

    async def wait_configured(self) -> None:
        return None

    async def get_crd(self, name: str) -> dict[str, Any]:
        return next(crd.definition(r) for r in crd.RESOURCES if r.name == name)

    async def can_list(self, path: str) -> bool:
        if "/namespaces/team-b/" in path:
            raise KubernetesUnavailable(f"GET {path}: HTTP 403 forbidden")
        return True


async def test_a_forbidden_list_is_a_readiness_problem() -> None:
    checks = ApiChecks(ForbiddingApi(), ["team-a", "team-b"])  # type: ignore[arg-type]
    problems = await checks.check()
    assert problems == [
        "cannot list CustomerBudgets in team-b: GET"
        " /apis/spendgate.dev/v1alpha1/namespaces/team-b/customerbudgets: HTTP 403 forbidden",
        "cannot list PriceBooks in team-b: GET"
        " /apis/spendgate.dev/v1alpha1/namespaces/team-b/pricebooks: HTTP 403 forbidden",
        "cannot list Secrets in team-b: GET /api/v1/namespaces/team-b/secrets: HTTP 403 forbidden",
    ]
