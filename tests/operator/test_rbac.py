"""The chart's RBAC is sufficient and minimal for what the operator really does.

The calls come from the operator's end-to-end tests (tests/operator/test_operator_e2e.py and
tests/operator/test_operator_wiring.py against the recording API emulator of
tests/support/kube_emulator.py):
the ones recorded earlier in this pytest session (this file sorts after them), or, when they
are not part of the session, from a run of them in a subprocess (the venv's own ``pytest``).
Calls that those tests cannot show (they hand the admission webhook its
cluster reads) are listed below with the code that makes them. Every call must be allowed by
the rendered ClusterRole/Roles, and every (apiGroup, resource, verb) the chart grants must be
used by some call.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.helm_chart import (
    NAMESPACE,
    RELEASE,
    ROOT,
    ApiCall,
    allowed,
    find,
    granted,
    helm_installed,  # noqa: F401 (fixture)
    one,
    pod_spec,
    rbac_allows,
    render,
)

pytestmark = pytest.mark.usefixtures("helm_installed")

E2E = tuple(
    ROOT / "tests" / "operator" / name
    for name in ("test_operator_e2e.py", "test_operator_wiring.py")
)
SERVICE_ACCOUNT = f"{RELEASE}-spendgate-operator"
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions"}
DISCOVERY_PREFIXES = ("/api", "/apis", "/version", "/openapi")

# Calls of production runs that the end-to-end tests cannot record.
PRODUCTION_ONLY = [
    # The admission webhook reads a pod's namespace labels (KubeClient.namespace_labels);
    # its tests pass their own callable.
    ApiCall("get", "", "namespaces", name="models"),
]
# With Stripe: the operator reads the API key and signing secrets in its own namespace.
STRIPE_ONLY = [
    ApiCall("get", "", "secrets", namespace=NAMESPACE, name="spendgate-stripe"),
]
# With stripe.import (budgets synced from Stripe) the leader creates CustomerBudgets, in
# stripe.import.namespace only: granted there, and nowhere without the import.
IMPORT_NAMESPACE = "billing"  # the "stripe" value set's stripe.import.namespace


def _imports(call: ApiCall) -> bool:
    return (call.api_group, call.resource, call.verb) == (
        "spendgate.dev",
        "customerbudgets",
        "create",
    )


def _run_e2e(tmp: Path) -> list[dict[str, Any]]:
    plugin = tmp / "spendgate_record_calls.py"
    plugin.write_text(
        "import os\n"
        "def pytest_sessionfinish(session, exitstatus):\n"
        "    from tests.support.kube_emulator import write_calls\n"
        "    write_calls(os.environ['SPENDGATE_KUBE_CALLS_OUT'])\n"
    )
    out = tmp / "calls.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp),
        "SPENDGATE_KUBE_CALLS_OUT": str(out),
    }
    # The console script next to the interpreter: `python -m pytest` from the checkout root
    # would put the root on sys.path, where operator/ shadows the standard library.
    pytest_script = Path(sys.executable).with_name("pytest")
    result = subprocess.run(
        [str(pytest_script), *map(str, E2E), "-q", "-p", "no:cacheprovider",
         "-p", "spendgate_record_calls"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(
            "the operator's end-to-end tests failed, so their API calls cannot judge RBAC:\n"
            + result.stdout[-3000:],
            pytrace=False,
        )
    return json.loads(out.read_text())["calls"]


@pytest.fixture(scope="module")
def recorded_raw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """Every call of the operator in the e2e tests, as tests/support/kube_emulator.py records
    them."""
    from dataclasses import asdict

    from tests.support import kube_emulator

    ran = {Path(str(item.fspath)) for item in request.session.items}
    in_session = all(path in ran for path in E2E)
    if in_session and kube_emulator.API_CALLS:
        return [asdict(call) for call in kube_emulator.API_CALLS]
    return _run_e2e(tmp_path_factory.mktemp("kube-calls"))


@pytest.fixture(scope="module")
def recorded(recorded_raw: list[dict[str, Any]]) -> list[ApiCall]:
    """The resource requests among them (discovery URLs are checked apart)."""
    calls = [
        ApiCall(
            c["verb"], c["api_group"], c["resource"], c["subresource"], c["namespace"], c["name"]
        )
        for c in recorded_raw
        if c["api_group"] is not None and c["resource"] is not None
    ]
    assert calls, "the e2e tests recorded no API calls"
    return calls


def _pairs(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return granted(render(name), NAMESPACE, SERVICE_ACCOUNT)


def _namespaced(calls: Iterable[ApiCall], namespaces: list[str]) -> list[ApiCall]:
    """The same calls by an operator that watches only ``namespaces``: cluster-wide list/watch
    of namespaced resources become one per namespace, and objects live in those namespaces."""
    mapped = []
    for call in calls:
        if call.resource in CLUSTER_SCOPED or call.namespace == NAMESPACE:
            mapped.append(call)
        elif call.namespace is None:
            mapped += [
                ApiCall(call.verb, call.api_group, call.resource, call.subresource, ns)
                for ns in namespaces
            ]
        else:
            mapped.append(
                ApiCall(
                    call.verb,
                    call.api_group,
                    call.resource,
                    call.subresource,
                    namespaces[0],
                    call.name,
                )
            )
    return mapped


# ----------------------------------------------------------------------------- the checker


RULES = [
    {
        "apiGroups": ["spendgate.dev"],
        "resources": ["customerbudgets"],
        "verbs": ["list", "watch", "patch"],
    },
    {"apiGroups": ["spendgate.dev"], "resources": ["customerbudgets/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["stripe"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
]


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("list", "spendgate.dev", "customerbudgets"), {}, True),
        (("patch", "spendgate.dev", "customerbudgets", "status"), {}, True),
        (("update", "spendgate.dev", "customerbudgets", "status"), {}, False),
        (("delete", "spendgate.dev", "customerbudgets"), {}, False),
        (("list", "spendgate.dev", "pricebooks"), {}, False),
        (("list", "", "customerbudgets"), {}, False),  # the group matters
        (("patch", "spendgate.dev", "customerbudgets", "scale"), {}, False),
        (("get", "", "secrets"), {"name": "stripe"}, True),
        (("get", "", "secrets"), {"name": "acme-keys"}, False),
        (("list", "", "secrets"), {}, False),  # resourceNames never allow list
        (("get", "", "namespaces"), {"namespaced": False, "name": "models"}, True),
        (("get", "", "namespaces"), {"namespaced": False, "cluster_role": False}, False),
        (("get", "", "metrics"), {}, False),  # nonResourceURLs are no resources
    ],
)
def test_rbac_allows(args: tuple[str, ...], kwargs: dict[str, Any], expected: bool) -> None:
    assert rbac_allows(RULES, *args, **kwargs) is expected


def test_rbac_allows_wildcards_like_kubernetes() -> None:
    rules = [{"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}]
    assert rbac_allows(rules, "patch", "spendgate.dev", "pricebooks", "status")
    assert not rbac_allows(rules, "patch", "spendgate.dev", "pricebooks")


# Hand-written: the calls kopf makes for a cluster-wide operator serving CustomerBudgets
# (kopf's documented RBAC needs), independent of the e2e recorder.
KOPF_CALLS = [
    ApiCall("list", "apiextensions.k8s.io", "customresourcedefinitions"),
    ApiCall("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    ApiCall("list", "spendgate.dev", "customerbudgets"),
    ApiCall("watch", "spendgate.dev", "customerbudgets"),
    ApiCall("patch", "spendgate.dev", "customerbudgets", namespace="team-a", name="acme"),
    ApiCall("patch", "spendgate.dev", "customerbudgets", "status", "team-a", "acme"),
    ApiCall("list", "", "secrets"),
    ApiCall("watch", "", "secrets"),
    ApiCall("get", "", "secrets", namespace="team-a", name="acme-keys"),
    ApiCall("create", "", "events", namespace="team-a"),
    *PRODUCTION_ONLY,
]


def test_hand_written_kopf_calls_are_allowed() -> None:
    pairs = _pairs("default")
    assert [c for c in KOPF_CALLS if not allowed(pairs, c)] == []
    refused = [
        ApiCall("delete", "spendgate.dev", "customerbudgets", namespace="a", name="x"),
        ApiCall("create", "", "secrets", namespace="a"),
        ApiCall("watch", "", "pods"),
        ApiCall("get", "", "pods", namespace="a", name="x"),
        ApiCall("list", "coordination.k8s.io", "leases"),
        ApiCall("create", "coordination.k8s.io", "leases", namespace="a"),
        ApiCall("update", "", "events", namespace="a", name="x"),
        ApiCall("patch", "kopf.dev", "kopfpeerings", namespace="a", name="spendgate"),
        # No kopf peering (kopf runs standalone on the Lease's holder): nothing of it granted.
        ApiCall("list", "kopf.dev", "clusterkopfpeerings"),
        ApiCall("patch", "kopf.dev", "clusterkopfpeerings", name="spendgate"),
    ]
    assert [c for c in refused if allowed(pairs, c)] == []


# ----------------------------------------------------------------------------- the chart


@pytest.mark.parametrize("name", ["default", "namespaced", "stripe", "everything"])
def test_rbac_has_no_wildcards_and_binds_only_the_operator(name: str) -> None:
    objects = render(name)
    for role in find(objects, "ClusterRole") + find(objects, "Role"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key] and not any("*" in v for v in rule[key]), rule
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
        ]
    # Nothing else talks to the API server: the sidecar needs no Kubernetes access.
    for workload in objects:
        if workload["kind"] in ("StatefulSet", "Pod"):
            assert pod_spec(workload)["automountServiceAccountToken"] is False, workload["kind"]
    deployment = one(objects, "Deployment")
    assert pod_spec(deployment)["serviceAccountName"] == SERVICE_ACCOUNT


def test_every_operator_call_is_allowed(recorded: list[ApiCall]) -> None:
    calls = [*[c for c in recorded if not _imports(c)], *PRODUCTION_ONLY]
    refused = sorted({c for c in calls if not allowed(_pairs("default"), c)}, key=str)
    assert not refused, "the chart's RBAC refuses calls the operator makes:\n" + "\n".join(
        map(str, refused)
    )


def test_every_operator_call_is_allowed_when_watching_some_namespaces(
    recorded: list[ApiCall],
) -> None:
    namespaces = ["models", "team-b"]
    calls = _namespaced([*recorded, *PRODUCTION_ONLY, *STRIPE_ONLY], namespaces)
    pairs = _pairs("namespaced")
    refused = sorted({c for c in calls if not allowed(pairs, c)}, key=str)
    assert not refused, "\n".join(map(str, refused))
    # ... and nothing in the namespaces it does not watch.
    elsewhere = _namespaced(recorded, ["other"])
    assert not [c for c in elsewhere if c.namespace == "other" and allowed(pairs, c)]


def test_budgets_from_stripe_are_created_only_in_the_import_namespace(
    recorded: list[ApiCall],
) -> None:
    creates = [c for c in recorded if _imports(c)]
    assert creates, "the e2e tests recorded no budget imported from Stripe"
    assert all(c.namespace is not None and c.name is None for c in creates)
    there = [replace(c, namespace=IMPORT_NAMESPACE) for c in creates]
    assert all(allowed(_pairs("stripe"), c) for c in there)
    elsewhere = [replace(c, namespace=NAMESPACE) for c in creates]
    assert not any(allowed(_pairs("stripe"), c) for c in elsewhere)
    for name in ("default", "everything"):  # no import: no create
        assert not any(allowed(_pairs(name), c) for c in there), name


def test_stripe_secrets_are_readable() -> None:
    assert all(allowed(_pairs("stripe"), c) for c in STRIPE_ONLY)


def _granted_triples(name: str) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for role, _ in _pairs(name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_chart_grants_nothing_the_operator_never_uses(recorded: list[ApiCall]) -> None:
    used = {
        (c.api_group, f"{c.resource}/{c.subresource}" if c.subresource else c.resource, c.verb)
        for c in [*recorded, *PRODUCTION_ONLY, *STRIPE_ONLY]
    }
    for name in ("default", "namespaced"):
        unused = _granted_triples(name) - used
        assert not unused, f"{name}: granted but never used: {sorted(unused)}"


def test_operator_calls_outside_resources_are_discovery(recorded_raw: list[dict[str, Any]]) -> None:
    """Discovery is open to every authenticated client (system:discovery): no rule needed."""
    paths = {c["path"] for c in recorded_raw if c["api_group"] is None}
    assert all(p.startswith(DISCOVERY_PREFIXES) for p in paths), paths


def test_production_only_calls_are_still_made_by_the_code() -> None:
    """The reasons given for PRODUCTION_ONLY hold in the operator's code."""
    from spendgate.operator.kube.client import KubeClient
    from spendgate.operator.runtime import kopf_settings

    assert "/api/v1/namespaces/" in inspect.getsource(KubeClient.namespace_labels)
    source = inspect.getsource(kopf_settings)
    assert "ks.peering.standalone = True" in source  # kopf never peers: nothing to grant
