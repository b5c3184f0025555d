"""spendgate's CRDs on a current apiextensions-apiserver: every CEL rule is evaluated by a real
server (1.20 drops ``x-kubernetes-validations``). The cases are the CRD tests' own
(tests/core/test_crds.py: each invalid manifest breaks exactly one rule, and the models refuse
it too), so the models, cel-python and the real server are held to one verdict."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.core.test_crds import CEL_CASES
from tests.support.kube_control_plane import CRD_SERVER, ControlPlane, start_crd_server

ROOT = Path(__file__).resolve().parents[2]
PLURALS = {"CustomerBudget": "customerbudgets", "PriceBook": "pricebooks"}
NAMESPACE = "team-a"


@pytest.fixture(scope="module")
def crd_server(kube_plane: ControlPlane) -> Iterator[ControlPlane]:
    if not CRD_SERVER.is_file():
        pytest.skip(f"apiextensions-apiserver is not built here: run `make e2e` ({CRD_SERVER})")
    url, process = start_crd_server(kube_plane)
    view = ControlPlane(kube_plane.directory, url, kube_plane.etcd_url)
    try:
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            status, body = view.request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
            )
            assert status == 201, body
        for plural in PLURALS.values():
            view.kubectl(
                "wait", "--for=condition=Established", "--timeout=30s",
                f"crd/{plural}.spendgate.dev", kubeconfig=view.kubeconfig(name="crd-server"),
            )  # fmt: skip
        yield view
    finally:
        process.stop()
        kube_plane.processes.remove(process)


def dry_run_create(server: ControlPlane, manifest: dict[str, Any]) -> tuple[int, Any]:
    body = copy.deepcopy(manifest)
    body["metadata"]["namespace"] = NAMESPACE
    plural = PLURALS[body["kind"]]
    path = f"/apis/spendgate.dev/v1alpha1/namespaces/{NAMESPACE}/{plural}?dryRun=All"
    return server.request("POST", path, body)


def test_the_crd_server_keeps_the_cel_rules(crd_server: ControlPlane) -> None:
    status, crd = crd_server.request(
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/customerbudgets.spendgate.dev",
    )
    assert status == 200, crd
    assert "x-kubernetes-validations" in json.dumps(crd["spec"]["versions"][0]["schema"])


def test_examples_are_accepted(crd_server: ControlPlane) -> None:
    for name in ("budgets.yaml", "pricebook.yaml"):
        for manifest in yaml.safe_load_all((ROOT / "examples" / name).read_text()):
            if manifest and manifest["kind"] in PLURALS:
                status, body = dry_run_create(crd_server, manifest)
                assert status == 201, (manifest["metadata"]["name"], body)


@pytest.mark.parametrize(("message", "valid", "invalid"), CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_each_cel_rule_as_the_server_evaluates_it(
    crd_server: ControlPlane, message: str, valid: list[dict[str, Any]], invalid: dict[str, Any]
) -> None:
    for manifest in valid:
        status, body = dry_run_create(crd_server, manifest)
        assert status == 201, (manifest["spec"], body)
    status, body = dry_run_create(crd_server, invalid)
    assert status == 422, (invalid["spec"], body)
    causes = [c.get("message", "") for c in body["details"]["causes"]]
    assert any(message in cause for cause in causes), causes
