"""The Helm chart (charts/spendgate), rendered by a real Helm v4 and checked without a cluster.

`make test` installs Helm into .tools/ (scripts/bootstrap.sh). Each value set of
tests/support/helm_chart.py is rendered once; every rendered object is validated against the
Kubernetes schemas of two minor versions, every workload against Pod Security "restricted", and the
webhook, settings and Secrets against what the operator's code actually reads and serves.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.support.helm_chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_SETS,
    WORKLOAD_KINDS,
    KubeSchemas,
    crd_files,
    crd_validators,
    find,
    helm,
    helm_installed,  # noqa: F401 (fixture)
    one,
    parse,
    pod_spec,
    render,
    template,
    validation_errors,
)

FULLNAME = f"{RELEASE}-spendgate"
OPERATOR = f"{FULLNAME}-operator"
WEBHOOK_SERVICE = f"{FULLNAME}-webhook"
SETS = sorted(VALUE_SETS)


pytestmark = pytest.mark.usefixtures("helm_installed")


def values_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", OPERATOR)
    return next(c for c in pod_spec(deployment)["containers"] if c["name"] == "operator")


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------- lint, render


def test_helm_is_v4() -> None:
    result = helm("version", "--template", "{{.Version}}")
    assert result.stdout.startswith("v4."), result.stdout


@pytest.mark.parametrize("name", SETS)
def test_lint(name: str) -> None:
    result = helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, values=VALUE_SETS[name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", SETS)
def test_renders(name: str) -> None:
    objects = render(name)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "MutatingWebhookConfiguration", "ClusterRole", "Service"} <= kinds
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    duplicates = {n for n in names if names.count(n) > 1 and n[0] != "CustomResourceDefinition"}
    assert not duplicates
    for obj in objects:
        if obj["kind"] in ("CustomResourceDefinition", "ClusterKopfPeering"):
            continue
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, obj["kind"]


@pytest.fixture(scope="module")
def schemas() -> dict[str, KubeSchemas]:
    return {version: KubeSchemas(version) for version in KUBE_VERSIONS}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_every_object_is_valid_kubernetes(
    name: str, version: str, schemas: dict[str, KubeSchemas]
) -> None:
    objects = render(name)
    crds = crd_validators(objects)
    problems = {
        f"{o['kind']}/{o['metadata']['name']}": errors
        for o in objects
        if (errors := validation_errors(o, schemas[version], crds))
    }
    assert not problems, json.dumps(problems, indent=2)


def test_the_validator_catches_mistakes(schemas: dict[str, KubeSchemas]) -> None:
    deployment = one(render("default"), "Deployment", OPERATOR)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = 1
    deployment["spec"]["replicas"] = "2"
    errors = validation_errors(deployment, schemas["1.33"], {})
    assert any("runAsNonroot" in e for e in errors), errors
    assert any(e.startswith("spec/replicas") for e in errors), errors
    monitor = one(render("everything"), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert validation_errors(monitor, schemas["1.33"], {})


# ----------------------------------------------------------------------------- values schema


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"bogus": 1}, "at '': additional properties 'bogus' not allowed"),
        (
            {"operator": {"replica": 3}},
            "at '/operator': additional properties 'replica' not allowed",
        ),
        ({"operator": {"replicas": "two"}}, "at '/operator/replicas': got string, want integer"),
        (
            {"webhook": {"timeoutSeconds": 60}},
            "at '/webhook/timeoutSeconds': maximum: got 60, want 30",
        ),
        ({"webhook": {"failurePolicy": "Maybe"}}, "at '/webhook/failurePolicy'"),
        ({"redis": {"mode": "cluster"}}, "at '/redis/mode'"),
        (
            {"redis": {"bundled": {"persistence": {"size": "lots"}}}},
            "at '/redis/bundled/persistence/size'",
        ),
        (
            {"sidecar": {"resources": {"limits": {"cpu": "1", "gpu": "1"}}}},
            "additional properties 'gpu' not allowed",
        ),
        ({"stripe": {"enabled": "yes"}}, "at '/stripe/enabled': got string, want boolean"),
        ({"redis": {"external": {"url": "http://redis:6379"}}}, "at '/redis/external/url'"),
    ],
)
def test_bad_values_are_rejected_readably(values: dict[str, Any], expected: str) -> None:
    result = template(values)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"redis": {"mode": "external"}},
            "redis.external.url is required with redis.mode external",
        ),
        (
            {
                "redis": {
                    "mode": "external",
                    "external": {"url": "redis://r:6379", "tls": {"enabled": True}},
                }
            },
            "redis.external.tls.enabled needs a rediss:// URL",
        ),
        (
            {
                "webhook": {
                    "certificates": {"mode": "existingSecret", "existingSecret": {"name": "x"}}
                }
            },
            "webhook.certificates.existingSecret.caBundle",
        ),
        (
            {"redis": {"mode": "external", "external": {"sentinel": {"enabled": True}}}},
            "redis.external.sentinel.hosts",
        ),
    ],
)
def test_incomplete_values_fail_with_the_missing_setting(
    values: dict[str, Any], expected: str
) -> None:
    result = template(values)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def _object_schemas(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append((path, node))
        for key, value in node.items():
            found += _object_schemas(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _object_schemas(value, f"{path}/{index}")
    return found


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = [
        path
        for path, node in _object_schemas(schema)
        if "additionalProperties" not in node
        and not str(node.get("$comment", "")).startswith("passthrough:")
    ]
    assert not open_objects, f"objects without additionalProperties: {open_objects}"
    passthrough = [p for p, n in _object_schemas(schema) if "$comment" in n]
    # Only Kubernetes objects handed to the API server as they are (validated there).
    assert all(
        re.search(
            r"(affinity|tolerations|topologySpreadConstraints|valueFrom|global"
            r"|stripe/properties/import/properties/template/properties/spec$)",
            p,
        )
        for p in passthrough
    ), passthrough


def test_values_yaml_is_valid_and_every_key_is_in_the_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values_yaml())  # closed: every key is known


# ----------------------------------------------------------------------------- security


def _checked_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("name", SETS)
def test_every_workload_is_restricted(name: str) -> None:
    workloads = [o for o in render(name) if o["kind"] in WORKLOAD_KINDS]
    assert workloads
    for workload in workloads:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert isinstance(pod.get("runAsUser"), int) and pod["runAsUser"] > 0, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for container in _checked_containers(spec):
            here = f"{where} container {container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, here
            assert sc.get("readOnlyRootFilesystem") is True, here
            assert sc.get("allowPrivilegeEscalation") is False, here
            assert sc.get("capabilities") == {"drop": ["ALL"]}, here
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, here
            assert not sc.get("privileged"), here
            assert container.get("resources", {}).get("requests"), f"{here}: no requests"
            assert container.get("resources", {}).get("limits", {}).get("memory"), here
            if workload["kind"] != "Pod":
                assert container.get("livenessProbe") and container.get("readinessProbe"), here


def test_operator_is_highly_available_by_default() -> None:
    objects = render("default")
    deployment = one(objects, "Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    anti = pod_spec(deployment)["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hard = one(render("everything"), "Deployment", OPERATOR)
    assert pod_spec(hard)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]


@pytest.mark.parametrize("name", SETS)
def test_services_reach_named_ports_of_their_pods(name: str) -> None:
    objects = render(name)
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for service in find(objects, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        ports = {
            p["name"] for w in pods for c in pod_spec(w)["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


# ----------------------------------------------------------------------------- CRDs


def test_chart_crds_are_the_repository_crds() -> None:
    """crds/ is the single source: the chart links to it, file for file."""
    repository = sorted((ROOT / "crds").glob("*.yaml"))
    assert repository
    for source in repository:
        link = CHART / "crds" / source.name
        assert link.is_symlink(), f"{link} must be a symlink to {source}"
        assert link.resolve() == source.resolve()
    # Nothing else: kopf's peering CRDs are not shipped (the Lease elects the leader).
    assert [p.name for p in (CHART / "crds").glob("*.yaml") if not p.is_symlink()] == []


def test_default_install_ships_the_crds_and_no_peering_object() -> None:
    objects = render("default")
    names = {c["metadata"]["name"] for c in find(objects, "CustomResourceDefinition")}
    assert names == {"customerbudgets.spendgate.dev", "pricebooks.spendgate.dev"}
    assert find(objects, "ClusterKopfPeering") == []
    assert "peering" not in values_yaml()["operator"]
    assert not find(render("namespaced"), "ClusterKopfPeering")
    assert not find(render("namespaced"), "KopfPeering")


def test_templated_crds_are_the_crd_files_and_are_kept() -> None:
    result = template(VALUE_SETS["everything"])  # without --include-crds: templates only
    templated = {
        c["metadata"]["name"]: c
        for c in find(yaml.safe_load_all(result.stdout), "CustomResourceDefinition")
    }
    files = {c["metadata"]["name"]: c for c in crd_files()}
    assert templated.keys() == files.keys()
    for name, crd in templated.items():
        annotations = crd["metadata"]["annotations"]
        assert annotations.pop("helm.sh/resource-policy") == "keep"
        if not annotations:  # kopf's CRDs carry no schema generation
            del crd["metadata"]["annotations"]
        assert crd == files[name], name  # the schema generation too (operator/kube/api_checks)
    default = template({})
    assert not find(yaml.safe_load_all(default.stdout), "CustomResourceDefinition")


# ----------------------------------------------------------------------------- webhook


def _admission_routes() -> set[tuple[str, str]]:
    from spendgate.operator.admission.server import create_app
    from spendgate.operator.runtime.settings import OperatorSettings

    async def labels(_namespace: str) -> dict[str, str]:
        return {}

    async def version() -> tuple[int, int]:
        return (1, 33)

    app = create_app(OperatorSettings(), labels, version)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


@pytest.mark.parametrize("name", SETS)
def test_webhook_calls_what_the_operator_serves(name: str) -> None:
    from spendgate.operator.admission.injection import INJECT_LABEL, SKIPPED_NAMESPACES

    objects = render(name)
    configuration = one(objects, "MutatingWebhookConfiguration")
    service = one(objects, "Service", WEBHOOK_SERVICE)
    container = operator_container(objects)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    routes = _admission_routes()
    webhooks = configuration["webhooks"]
    assert len({w["name"] for w in webhooks}) == len(webhooks) == 2
    for webhook in webhooks:
        target = webhook["clientConfig"]["service"]
        assert ("POST", target["path"]) in routes, (target["path"], routes)
        assert (target["name"], target["namespace"]) == (WEBHOOK_SERVICE, NAMESPACE)
        port = next(p for p in service["spec"]["ports"] if p["port"] == target["port"])
        assert int(env["SPENDGATE_WEBHOOK_PORT"]["value"]) == container_ports[port["targetPort"]]
        assert webhook["sideEffects"] == "None"
        assert webhook["reinvocationPolicy"] == "IfNeeded"
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["failurePolicy"] == "Fail" and webhook["timeoutSeconds"] == 10
        assert webhook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        excluded = next(
            e["values"]
            for e in webhook["namespaceSelector"]["matchExpressions"]
            if e["key"] == "kubernetes.io/metadata.name"
        )
        assert set(excluded) >= {*SKIPPED_NAMESPACES, NAMESPACE}
    by_pod, by_namespace = webhooks
    assert by_pod["objectSelector"] == {"matchLabels": {INJECT_LABEL: "true"}}
    assert {"key": INJECT_LABEL, "operator": "In", "values": ["true"]} in by_namespace[
        "namespaceSelector"
    ]["matchExpressions"]
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": INJECT_LABEL, "operator": "NotIn", "values": ["true", "false"]}
    ]


def test_webhook_values_reach_the_configuration() -> None:
    result = template(
        {
            "webhook": {
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
                "namespaceOptIn": False,
                "excludeNamespaces": ["batch"],
            },
        }
    )
    configuration = one(yaml.safe_load_all(result.stdout), "MutatingWebhookConfiguration")
    [webhook] = configuration["webhooks"]
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 5)
    assert "batch" in webhook["namespaceSelector"]["matchExpressions"][0]["values"]


def _pem(data: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(data))


def test_generated_ca_signs_the_serving_certificate() -> None:
    from cryptography.hazmat.primitives import serialization

    objects = render("default")
    secret = one(objects, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca, cert = _pem(secret["data"]["ca.crt"]), _pem(secret["data"]["tls.crt"])
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), None)
    cert.verify_directly_issued_by(ca)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    for webhook in one(objects, "MutatingWebhookConfiguration")["webhooks"]:
        _pem(webhook["clientConfig"]["caBundle"]).public_key()  # parses
        assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    mounted = pod_spec(one(objects, "Deployment", OPERATOR))["volumes"]
    assert {
        "name": "webhook-tls",
        "secret": {
            "secretName": secret["metadata"]["name"],
            "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
        },
    } in mounted
    env = env_of(operator_container(objects))
    assert env["SPENDGATE_WEBHOOK_CERT_FILE"]["value"] == "/etc/spendgate/webhook-tls/tls.crt"


def test_cert_manager_issues_the_certificate_and_injects_the_ca() -> None:
    objects = render("cert-manager")
    certificate = one(objects, "Certificate")
    issuer = one(objects, "Issuer")
    assert "selfSigned" in issuer["spec"]
    assert certificate["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    configuration = one(objects, "MutatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    )
    assert all("caBundle" not in w["clientConfig"] for w in configuration["webhooks"])
    assert not find(objects, "Secret", f"{FULLNAME}-webhook-tls")  # cert-manager writes it
    volumes = pod_spec(one(objects, "Deployment", OPERATOR))["volumes"]
    assert {"secretName": certificate["spec"]["secretName"]}.items() <= next(
        v["secret"] for v in volumes if v["name"] == "webhook-tls"
    ).items()
    by_issuer = render("cert-manager-issuer")
    assert not find(by_issuer, "Issuer")
    assert one(by_issuer, "Certificate")["spec"]["issuerRef"] == {
        "name": "internal-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


def test_existing_secret_is_mounted_with_its_ca_bundle() -> None:
    from tests.support.helm_chart import EXISTING_CA

    objects = render("existing-secret")
    assert not find(objects, "Secret")  # neither webhook nor Redis Secret: both are the user's
    volumes = pod_spec(one(objects, "Deployment", OPERATOR))["volumes"]
    assert (
        next(v for v in volumes if v["name"] == "webhook-tls")["secret"]["secretName"]
        == "my-webhook-tls"
    )
    for webhook in one(objects, "MutatingWebhookConfiguration")["webhooks"]:
        assert webhook["clientConfig"]["caBundle"] == EXISTING_CA


# ----------------------------------------------------------------------------- settings


def _resolve_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it from the rendered objects."""
    env = {}
    for name, item in env_of(container).items():
        if "value" in item:
            env[name] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = {"metadata.namespace": NAMESPACE, "metadata.name": f"{OPERATOR}-7d9f-x2"}[
                source["fieldRef"]["fieldPath"]
            ]
        else:
            ref = source["secretKeyRef"]
            secrets = [
                s
                for s in find(objects, "Secret", ref["name"])
                if s["metadata"]["namespace"] == NAMESPACE
            ]
            env[name] = (
                base64.b64decode(secrets[0]["data"][ref["key"]]).decode()
                if secrets
                else f"<{ref['name']}/{ref['key']}>"
            )
    return env


def _mounted_files(objects: list[dict[str, Any]], root: Path) -> dict[str, str]:
    """The operator's ConfigMap volumes, written under ``root`` as the kubelet would mount them:
    mount path -> the directory standing in for it."""
    deployment = one(objects, "Deployment", OPERATOR)
    spec = pod_spec(deployment)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounted = {}
    for mount in operator_container(objects)["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        [config_map] = [
            c for c in find(objects, "ConfigMap", source["name"])
            if c["metadata"]["namespace"] == NAMESPACE
        ]  # fmt: skip
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for item in source.get("items") or [{"key": k, "path": k} for k in config_map["data"]]:
            (directory / item["path"]).write_text(config_map["data"][item["key"]])
        mounted[mount["mountPath"]] = str(directory)
    return mounted


def _operator_settings(objects: list[dict[str, Any]]) -> Any:
    """What ``spendgate operator`` makes of the rendered Deployment; files it reads from
    mounted ConfigMaps (the Stripe import template) are written to a temporary directory."""
    from spendgate.cli import build_parser
    from spendgate.operator.runtime.cli_args import operator_settings_from_args

    env = _resolve_env(objects, operator_container(objects))
    with tempfile.TemporaryDirectory() as root:
        for mount_path, directory in _mounted_files(objects, Path(root)).items():
            for name, value in env.items():
                if value.startswith(mount_path + "/"):
                    env[name] = directory + value.removeprefix(mount_path)
        return operator_settings_from_args(build_parser().parse_args(["operator"]), env)


def _env_names_read_by_the_cli() -> set[str]:
    return set(
        re.findall(
            r'"(SPENDGATE_[A-Z_]+|POD_NAME|POD_NAMESPACE)"',
            "".join(p.read_text() for p in sorted((ROOT / "spendgate" / "cli").glob("*.py")))
            + (ROOT / "operator" / "runtime" / "cli_args.py").read_text(),
        )
    )


@pytest.mark.parametrize("name", SETS)
def test_every_operator_variable_is_read_by_spendgate(name: str) -> None:
    from dataclasses import fields

    from spendgate.operator.admission.injection import InjectionDefaults
    from spendgate.operator.stripe.settings import StripeSettings

    known = (
        _env_names_read_by_the_cli()
        | {f"SPENDGATE_SIDECAR_{f.name.upper()}" for f in fields(InjectionDefaults)}
        | {f"SPENDGATE_STRIPE_{f.name.upper()}" for f in fields(StripeSettings)}
    )
    names = set(env_of(operator_container(render(name))))
    assert names <= known, f"set by the chart, read by nobody: {sorted(names - known)}"


def test_operator_settings_from_the_rendered_deployment() -> None:
    settings = _operator_settings(render("default"))
    values = values_yaml()
    assert settings.namespace == NAMESPACE
    assert settings.namespaces == ()
    assert settings.webhook_port == values["operator"]["ports"]["webhook"]
    assert settings.health_port == values["operator"]["ports"]["health"]
    assert settings.webhook_cert_file == "/etc/spendgate/webhook-tls/tls.crt"
    assert settings.webhook_key_file == "/etc/spendgate/webhook-tls/tls.key"
    assert settings.pod_name.startswith(OPERATOR)
    assert settings.status_interval_s == 30
    assert settings.audit_interval_s == values["operator"]["auditIntervalSeconds"] == 300
    assert settings.spend_watch_interval_s == values["operator"]["spendWatchIntervalSeconds"] == 60
    assert settings.bypass_check_interval_s == values["operator"]["bypassCheckIntervalSeconds"]
    assert settings.redis_url.startswith("redis://:") and settings.redis_url.endswith(
        f"@{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"
    )
    assert settings.redis_cluster is False
    # Leader election: a Lease per release, in the namespace of the chart's Role for leases.
    assert settings.leader_election and settings.lease_ns == NAMESPACE
    assert settings.lease_name == f"{OPERATOR}-leader"
    [role] = [r for r in find(render("default"), "Role") if r["metadata"]["namespace"] == NAMESPACE]
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "patch"],
        }
    ]
    assert settings.stripe is None  # the default values: no Stripe
    stripe = _operator_settings(render("stripe")).stripe
    assert stripe is not None and stripe.enabled
    namespaced = _operator_settings(render("namespaced"))
    assert namespaced.namespaces == ("models", "team-b")
    assert _operator_settings(render("redis-cluster")).redis_cluster is True


def test_probes_use_the_operator_health_endpoints() -> None:
    from aiohttp import web

    from spendgate.operator.runtime.health import Health

    app = Health(None, None, lambda: True).app()  # type: ignore[arg-type]
    served = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}
    container = operator_container(render("default"))
    health = next(p for p in container["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        action = container[probe]["httpGet"]
        assert action["path"] in served and action["port"] == health["name"], probe
    assert isinstance(app, web.Application)
    # The webhook Service routes by readiness: its probe is the one that ignores Redis.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/readyz/full", "/metrics"} <= served


def test_sidecar_defaults_reach_the_injector() -> None:
    objects = render("everything")
    settings = _operator_settings(objects)
    injection = settings.injection
    values = VALUE_SETS["everything"]["sidecar"]
    assert injection.image == "ghcr.io/spendgate/spendgate:0.1.1"
    assert injection.fail_mode == values["failMode"]
    assert injection.native_sidecars is True
    assert injection.redis_secret == "spendgate-redis"
    assert (injection.cpu_request, injection.memory_limit) == ("100m", "256Mi")


def test_sidecar_money_path_values_reach_every_injected_sidecar() -> None:
    from spendgate.cli import build_parser
    from spendgate.cli.servers import sidecar_settings_from_args
    from spendgate.operator.admission.injection import SidecarConfig, sidecar_container

    injection = _operator_settings(render("everything")).injection
    config = SidecarConfig(8000, 8080, "default", "open", {"requests": {}, "limits": {}})
    sidecar = sidecar_container(config, "models", injection, native=True)
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert sidecar["volumeMounts"] == [{"name": "spendgate-journal", "mountPath": "/journal"}]
    assert injection.journal_size_limit == "16Mi"
    # What the sidecar makes of them: the chart's values, parsed by the sidecar itself.
    ns = build_parser().parse_args(["sidecar"])
    settings = sidecar_settings_from_args(ns, env)
    assert settings.fail_open_allowance == 250_000
    assert settings.journal_dir == "/journal"
    assert (settings.redis_pool_size, settings.redis_timeout_s) == (64, 1.0)
    assert (settings.hold_grace_ms, settings.hold_sweep_interval_ms) == (45_000, 0)
    defaults = sidecar_settings_from_args(
        ns, {e["name"]: e["value"] for e in _default_sidecar_env() if "value" in e}
    )
    assert defaults.fail_open_allowance == 1_000_000  # values.yaml: "1.00"
    assert defaults.journal_dir == "/var/lib/spendgate/journal"


def _default_sidecar_env() -> list[dict[str, Any]]:
    from spendgate.operator.admission.injection import SidecarConfig, sidecar_container

    injection = _operator_settings(render("default")).injection
    config = SidecarConfig(8000, 8080, "default", "closed", {"requests": {}, "limits": {}})
    return sidecar_container(config, "models", injection, native=True)["env"]


def test_sidecar_defaults_are_passed_as_injection_fields() -> None:
    from spendgate.operator.admission.injection import InjectionDefaults

    env = _resolve_env(render("default"), operator_container(render("default")))
    defaults = InjectionDefaults()
    sidecar = {
        k.removeprefix("SPENDGATE_SIDECAR_").lower(): v
        for k, v in env.items()
        if k.startswith("SPENDGATE_SIDECAR_")
    }
    assert sidecar["image"] == "ghcr.io/spendgate/spendgate:0.1.0" == defaults.image
    for field in (
        "port",
        "probe_port",
        "fail_mode",
        "pricebook",
        "cpu_request",
        "memory_request",
        "cpu_limit",
        "memory_limit",
        "redis_secret",
        "redis_secret_key",
    ):
        assert sidecar[field] == str(getattr(defaults, field)), field
    assert sidecar["redis_cluster"] == "false"
    assert "native_sidecars" not in sidecar  # auto: detected from the API server


def test_stripe_settings_from_the_rendered_deployment() -> None:
    from spendgate.operator.stripe.settings import SecretRef, StripeSettings

    objects = render("stripe")
    container = operator_container(objects)
    settings = StripeSettings.from_env(_resolve_env(objects, container))
    assert settings.enabled
    assert settings.api_key_secret == SecretRef("spendgate-stripe", "api-key")
    assert settings.webhook_secret == SecretRef("spendgate-stripe", "webhook-secret")
    assert settings.webhook_secret_next == SecretRef("spendgate-stripe", "webhook-secret-next")
    assert settings.reconcile_interval_s == 120
    assert settings.meter_event_name == "spendgate_usage"
    port = next(p for p in container["ports"] if p["name"] == "stripe")
    assert settings.webhook_port == port["containerPort"]
    ingress = one(objects, "Ingress")
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["path"] == settings.webhook_path and path["pathType"] == "Exact"
    service = one(objects, "Service", path["backend"]["service"]["name"])
    assert {"name": "stripe", "targetPort": "stripe"}.items() <= service["spec"]["ports"][0].items()
    assert ingress["spec"]["tls"] == [
        {"secretName": "billing-tls", "hosts": ["billing.example.com"]}
    ]
    no_next = template({"stripe": {"enabled": True, "webhookSecret": {"nextKey": ""}}})
    env = _resolve_env(
        list(yaml.safe_load_all(no_next.stdout)),
        operator_container([o for o in yaml.safe_load_all(no_next.stdout) if o]),
    )
    assert StripeSettings.from_env(env).webhook_secret_next is None


def test_stripe_import_from_the_rendered_chart(tmp_path: Path) -> None:
    """Budgets synced from Stripe: the template in values reaches the operator as a mounted
    file it accepts, with the import settings; the create permission is in the import
    namespace only."""
    from dataclasses import replace

    from spendgate.operator.stripe.budget_import import load_import_template
    from spendgate.operator.stripe.settings import StripeSettings

    objects = render("stripe")
    container = operator_container(objects)
    settings = StripeSettings.from_env(_resolve_env(objects, container))
    assert settings.import_enabled and settings.import_namespace == "billing"
    assert (settings.import_metadata_key, settings.import_metadata_value) == (
        "gpu_access",
        "granted",
    )
    assert settings.import_interval_s == 120
    assert settings.import_template_file == "/etc/spendgate/stripe-import/template.yaml"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "stripe-import"]
    assert mount["mountPath"] == "/etc/spendgate/stripe-import" and "subPath" not in mount
    config_map = one(objects, "ConfigMap", f"{FULLNAME}-stripe-import")
    template_file = tmp_path / "template.yaml"
    template_file.write_text(config_map["data"]["template.yaml"])
    loaded = load_import_template(
        replace(settings, import_template_file=str(template_file)), ()
    ).load()
    assert loaded == VALUE_SETS["stripe"]["stripe"]["import"]["template"]
    assert _operator_settings(objects).stripe.import_enabled  # the CLI's start-up check passes
    [role] = [r for r in find(objects, "Role") if r["metadata"]["name"].endswith("stripe-import")]
    assert role["metadata"]["namespace"] == "billing"
    assert role["rules"] == [
        {"apiGroups": ["spendgate.dev"], "resources": ["customerbudgets"], "verbs": ["create"]}
    ]
    # Your own ConfigMap instead: nothing rendered for it, the operator mounts yours.
    own = parse(
        template(
            {
                "stripe": {
                    "enabled": True,
                    "import": {
                        "enabled": True,
                        "namespace": "billing",
                        "existingConfigMap": "budget-template",
                    },
                }
            }
        ).stdout
    )
    assert not [c for c in find(own, "ConfigMap") if "stripe-import" in c["metadata"]["name"]]
    [volume] = [
        v for v in pod_spec(one(own, "Deployment"))["volumes"] if v["name"] == "stripe-import"
    ]
    assert volume["configMap"]["name"] == "budget-template"
    # Without the import: no template, no create.
    plain = parse(template({"stripe": {"enabled": True}}).stdout)
    assert not [o for o in plain if "stripe-import" in o["metadata"]["name"]]
    assert "SPENDGATE_STRIPE_IMPORT_ENABLED" not in env_of(operator_container(plain))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "stripe.import.namespace is required with stripe.import.enabled"),
        (
            {"namespace": "billing", "template": {"spec": {"currency": "USD"}, "extra": 1}},
            "additional properties 'extra' not allowed",
        ),
    ],
)
def test_stripe_import_values_are_checked(values: dict[str, Any], message: str) -> None:
    result = template({"stripe": {"enabled": True, "import": {"enabled": True, **values}}})
    assert result.returncode != 0 and message in result.stderr, result.stderr
    outside = template(
        {
            "operator": {"watchNamespaces": ["models"]},
            "stripe": {"enabled": True, "import": {"enabled": True, "namespace": "billing"}},
        }
    )
    assert "must be one of operator.watchNamespaces" in outside.stderr


def test_without_stripe_nothing_of_stripe_is_rendered() -> None:
    for name in ("default", "external-redis", "cert-manager", "existing-secret"):
        objects = [o for o in render(name) if o["kind"] != "CustomResourceDefinition"]
        text = json.dumps(objects).lower()
        assert "stripe" not in text, name
        assert not find(objects, "Ingress"), name


# ----------------------------------------------------------------------------- Redis


def _secret_urls(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        s["metadata"]["namespace"]: base64.b64decode(s["data"]["url"]).decode()
        for s in find(objects, "Secret", "spendgate-redis")
    }


def test_bundled_redis_persists_and_authenticates() -> None:
    objects = render("default")
    statefulset = one(objects, "StatefulSet", f"{FULLNAME}-redis")
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    config = one(objects, "ConfigMap", f"{FULLNAME}-redis")["data"]["redis.conf"]
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config
    secret = one(objects, "Secret", "spendgate-redis")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32
    assert _secret_urls(objects) == {
        NAMESPACE: f"redis://:{password}@{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"
    }
    redis = pod_spec(statefulset)["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "spendgate-redis",
        "key": "password",
    }
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_redis_secret_is_copied_to_the_model_namespaces() -> None:
    urls = _secret_urls(render("namespaced"))
    assert set(urls) == {NAMESPACE, "models", "team-b"}
    assert len(set(urls.values())) == 1
    copies = [
        s
        for s in find(render("namespaced"), "Secret", "spendgate-redis")
        if s["metadata"]["namespace"] != NAMESPACE
    ]
    assert all("password" not in s["data"] for s in copies)  # only the URL leaves


@pytest.mark.parametrize(
    ("name", "url", "cluster"),
    [
        ("external-redis", "redis://redis.data.svc:6379/0", "false"),
        ("external-redis-tls", "rediss://:s3cret@redis.example.com:6380/0", "false"),
        ("redis-cluster", "redis://redis-cluster.data.svc:6379/0", "true"),
        (
            "redis-sentinel",
            "redis+sentinel://:s3cret@sentinel-0.redis:26379,sentinel-1.redis:26379/billing/0",
            "false",
        ),
    ],
)
def test_external_redis(name: str, url: str, cluster: str) -> None:
    objects = render(name)
    assert not find(objects, "StatefulSet") and not find(objects, "NetworkPolicy")
    assert _secret_urls(objects) == {NAMESPACE: url}
    env = env_of(operator_container(objects))
    assert env["SPENDGATE_REDIS_CLUSTER"]["value"] == cluster
    assert env["SPENDGATE_SIDECAR_REDIS_CLUSTER"]["value"] == cluster
    test_pod = one(objects, "Pod")
    assert env_of(test_pod["spec"]["containers"][0])["SPENDGATE_REDIS_CLUSTER"]["value"] == cluster


def test_sentinel_url_parses_in_the_test_pod_script() -> None:
    """The helm test pod's Sentinel URL parsing, run here on the rendered URL."""
    from urllib.parse import unquote, urlsplit

    url = _secret_urls(render("redis-sentinel"))[NAMESPACE]
    script = one(render("redis-sentinel"), "Pod")["spec"]["containers"][0]["args"][0]
    assert "redis+sentinel://" in script
    parts = urlsplit(url)
    hosts = [
        (h.rpartition(":")[0], int(h.rpartition(":")[2]))
        for h in parts.netloc.rpartition("@")[2].split(",")
    ]
    master, _, db = parts.path.strip("/").partition("/")
    assert hosts == [("sentinel-0.redis", 26379), ("sentinel-1.redis", 26379)]
    assert (master, db, unquote(parts.password or "")) == ("billing", "0", "s3cret")


def test_redis_network_policy_admits_only_spendgate_clients() -> None:
    from spendgate.operator.admission.injection import INJECT_LABEL

    objects = render("everything")
    policy = one(objects, "NetworkPolicy")
    redis_pod = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_pod.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    peers = rule["from"]
    operator_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_pod = one(objects, "Pod")["metadata"]["labels"]

    def admitted(
        pod: dict[str, str], namespace_labels: dict[str, str], same_namespace: bool
    ) -> bool:
        for peer in peers:
            pods = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" in peer:
                namespaces = peer["namespaceSelector"].get("matchLabels", {})
                if namespaces.items() <= namespace_labels.items() and pods.items() <= pod.items():
                    return True
            elif same_namespace and pods.items() <= pod.items():
                return True
        return False

    assert admitted(operator_pod, {}, True)
    assert not admitted(operator_pod, {}, False)
    assert admitted(test_pod, {}, True)
    assert admitted({INJECT_LABEL: "true", "app": "vllm"}, {}, False)
    assert admitted({"app": "vllm"}, {INJECT_LABEL: "true"}, False)
    assert not admitted({"app": "vllm"}, {}, False)
    assert not admitted({"app": "vllm"}, {}, True)
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


# ----------------------------------------------------------------------------- monitoring, tests


def test_dashboard_queries_metrics_spendgate_exports() -> None:
    import prometheus_client

    import spendgate.operator.runtime.metrics  # noqa: F401 (registers the operator's metrics)
    from spendgate.sidecar.metrics import SidecarMetrics

    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    registries = [SidecarMetrics().registry, prometheus_client.REGISTRY]
    exported = {
        f"{metric.name}{suffix}"
        for registry in registries
        for metric in registry.collect()
        for suffix in suffixes
    }
    configmap = one(render("everything"), "ConfigMap", f"{FULLNAME}-dashboard")
    dashboard = json.loads(configmap["data"]["spendgate.json"])
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    used = set()
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"].lower())
        for target in panel["targets"]:
            used |= set(re.findall(r"\bspendgate_[a-z_]+", target["expr"]))
    assert used <= exported, used - exported
    for topic in ("spend", "refusals", "latency", "export lag"):
        assert any(topic in title for title in titles), topic


def test_monitors_scrape_the_named_metrics_ports() -> None:
    from spendgate.operator.admission.injection import PROBE_PORT_NAME

    objects = render("everything")
    service_monitor = one(objects, "ServiceMonitor")
    metrics_service = one(objects, "Service", f"{OPERATOR}-metrics")
    assert (
        service_monitor["spec"]["selector"]["matchLabels"].items()
        <= metrics_service["metadata"]["labels"].items()
    )
    assert (
        service_monitor["spec"]["endpoints"][0]["port"]
        == metrics_service["spec"]["ports"][0]["name"]
    )
    pod_monitor = one(objects, "PodMonitor")
    # The sidecars' metrics are on their probe port, never the customer-facing one.
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == PROBE_PORT_NAME
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert not find(render("default"), "ServiceMonitor") and not find(
        render("default"), "PodMonitor"
    )


def test_helm_test_pod_calls_the_webhook_and_redis() -> None:
    objects = render("default")
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    script = container["args"][0]
    assert f"https://{WEBHOOK_SERVICE}.{NAMESPACE}.svc:443/mutate-pods" in script
    compile(script, "helm-test", "exec")  # valid Python
    assert (
        env_of(container)["SPENDGATE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"]
        == "spendgate-redis"
    )
    [volume] = pod["spec"]["volumes"]
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # not the key
    existing = one(render("existing-secret"), "Pod")
    assert "volumes" not in existing["spec"]
    pem = env_of(existing["spec"]["containers"][0])["WEBHOOK_CA_PEM"]["value"]
    assert pem.startswith("-----BEGIN CERTIFICATE-----")


def test_notes_tell_the_next_steps() -> None:
    result = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for step in (
        "spendgate.dev/inject",
        "spendgate.dev/upstream-port",
        "helm test",
        "kubectl get customerbudgets",
        "spendgate-redis",
    ):
        assert step in notes, step


def test_images_follow_the_values() -> None:
    default = operator_container(render("default"))
    assert default["image"] == "ghcr.io/spendgate/spendgate:0.1.0"
    assert default["command"] == ["spendgate", "operator"]
    pinned = operator_container(render("everything"))
    assert pinned["image"] == "ghcr.io/spendgate/spendgate@sha256:" + "a" * 64
    for obj in render("default"):
        for container in pod_spec(obj)["containers"] if obj["kind"] in WORKLOAD_KINDS else []:
            assert not container["image"].endswith(":latest") and ":" in container["image"]


# ----------------------------------------------------------------------------- Dockerfile


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    instructions = _instructions()
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", base), base
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS build")
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users[-1] == "65532:65532"
    assert dict(instructions)["ENTRYPOINT"] == '["spendgate"]'
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    assert ("COPY", "--from=build /opt/spendgate /opt/spendgate") in final
    assert not any(op == "RUN" for op, _ in final), "the runtime stage installs nothing"


def test_dockerfile_copies_every_package_folder_and_dockerignore_lets_them_in() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {arg.split()[0] for op, arg in _instructions() if op == "COPY" and "--from" not in arg}
    assert folders <= copied, folders - copied
    assert "'.[operator]'" in DOCKERFILE  # kopf, kubernetes, stripe for `spendgate operator`
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    assert folders | {"pyproject.toml", "README.md"} <= allowed


def test_chart_runs_the_image_entry_points() -> None:
    from spendgate.operator.admission.injection import (
        InjectionDefaults,
        SidecarConfig,
        sidecar_container,
    )

    assert operator_container(render("default"))["command"][0] == "spendgate"
    config = SidecarConfig(8000, 8080, "default", "closed", {"requests": {}, "limits": {}})
    sidecar = sidecar_container(config, "models", InjectionDefaults(), native=True)
    assert sidecar["command"] == ["spendgate", "sidecar"]
    assert sidecar["securityContext"]["runAsUser"] == 65532  # the image's USER


def test_helm_package_includes_the_crd_files(tmp_path: Path) -> None:
    import tarfile

    result = helm("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    [archive] = tmp_path.glob("spendgate-*.tgz")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for source in (ROOT / "crds").glob("*.yaml"):
            member = members[f"spendgate/crds/{source.name}"]
            assert member.isfile()  # the content, not a link
            assert tar.extractfile(member).read() == source.read_bytes()  # type: ignore[union-attr]
