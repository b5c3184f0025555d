"""The CRDs' CEL rules as a current API server evaluates them: a standalone
apiextensions-apiserver (built by scripts/e2e/build-crd-server.sh) beside the 1.20 server,
which drops ``x-kubernetes-validations``. The files of ``crds/`` are created as they are (by
the API: the standalone server serves no ``/api``, which kubectl's discovery needs); every
example and every valid manifest of
tests/core/test_crds.py's CEL cases is accepted, each invalid one refused with its rule's
message. Objects are sent with ``dryRun=All``: validated, never stored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.core.test_crds import CEL_CASES, example_manifests
from tests.support.e2e_operator import eventually
from tests.support.kube_control_plane import CRD_SERVER, ControlPlane, start_crd_server

ROOT = Path(__file__).resolve().parents[2]
PLURALS = {"CustomerBudget": "customerbudgets", "PriceBook": "pricebooks"}


@pytest.fixture(scope="module")
def crd_server(kube_plane: ControlPlane) -> Iterator[ControlPlane]:
    if not CRD_SERVER.is_file():
        pytest.skip(f"apiextensions-apiserver is not built here: run `make e2e` ({CRD_SERVER})")
    url, process = start_crd_server(kube_plane)
    view = ControlPlane(kube_plane.directory, url, kube_plane.etcd_url)
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        definition = yaml.safe_load(path.read_text())
        status, body = view.request("POST", crds, definition)
        assert status == 201, json.dumps(body)[:3000]

        def established(name: str = definition["metadata"]["name"]) -> bool:
            _, body = view.request("GET", f"{crds}/{name}")
            conditions = (body.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        eventually(established, 30, f"{path.name} established")
    try:
        yield view
    finally:
        process.stop()


def create(server: ControlPlane, manifest: dict[str, Any]) -> tuple[int, Any]:
    namespace = (manifest.get("metadata") or {}).get("namespace") or "default"
    path = f"/apis/spendgate.dev/v1alpha1/namespaces/{namespace}/{PLURALS[manifest['kind']]}"
    return server.request("POST", f"{path}?dryRun=All", manifest)


def test_the_examples_are_accepted(crd_server: ControlPlane) -> None:
    for manifest in example_manifests():
        status, body = create(crd_server, manifest)
        assert status == 201, (manifest["metadata"]["name"], body)


@pytest.mark.parametrize(("message", "valid", "invalid"), CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_each_cel_rule_as_the_server_decides(
    crd_server: ControlPlane, message: str, valid: list[dict[str, Any]], invalid: dict[str, Any]
) -> None:
    for manifest in valid:
        status, body = create(crd_server, manifest)
        assert status == 201, (manifest["spec"], body)
    status, body = create(crd_server, invalid)
    assert status == 422, body
    causes = [c.get("message", "") for c in (body.get("details") or {}).get("causes") or []]
    assert any(message in cause for cause in causes) or message in json.dumps(body), body
