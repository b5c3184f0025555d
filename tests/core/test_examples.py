"""The files in examples/ are what the docs tell people to apply: they must be valid and work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from spendgate.manifests import load_files
from spendgate.operator.admission.injection import Injection, InjectionDefaults, plan_injection
from spendgate.operator.admission.service_check import bypassing_services

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def test_budgets_and_pricebook_load_without_problems() -> None:
    resources = load_files([str(EXAMPLES / "pricebook.yaml"), str(EXAMPLES / "budgets.yaml")])
    assert len(resources.pricebooks) == 1
    assert len(resources.budgets) == 4


def test_model_deployment_gets_the_sidecar_and_its_service_does_not_bypass_it() -> None:
    deployment, service = _documents("model-deployment.yaml")
    pod = {"apiVersion": "v1", "kind": "Pod", **deployment["spec"]["template"]}
    plan = plan_injection(
        pod,
        "default",
        {},
        InjectionDefaults(),
        native_sidecars=True,
        operator_namespace="spendgate-system",
    )
    assert isinstance(plan, Injection), plan
    injected = jsonpatch.apply_patch(pod, plan.patch)
    sidecar = injected["spec"]["initContainers"][-1]
    assert sidecar["restartPolicy"] == "Always"
    env = {item["name"]: item.get("value") for item in sidecar["env"]}
    assert env["SPENDGATE_UPSTREAM"] == "http://127.0.0.1:8000"
    assert env["SPENDGATE_PRICEBOOK"] == "default/default"
    injected["metadata"]["namespace"] = "default"
    assert bypassing_services([service], [injected]) == []
