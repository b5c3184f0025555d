"""spendgate.crd: CRDs generated from the models, structural, and as strict as the models.

What a user gets from ``kubectl apply`` is emulated here: API-server defaulting, the OpenAPI
schema (``jsonschema``, with unknown fields refused like kubectl's strict field validation) and
every CEL rule evaluated with a real CEL implementation (``cel-python``) at its schema location.
"""

from __future__ import annotations

import copy
import functools
import random
import re
from pathlib import Path
from typing import Any

import celpy
import pytest
import re2  # google-re2, installed with cel-python: the regex dialect of the API server
import yaml
from celpy.evaluation import CELEvalError
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from spendgate import crd
from spendgate.durations import parse_duration
from spendgate.models import (
    AMOUNT_PATTERN,
    API_VERSION,
    DURATION_PATTERN,
    POSITIVE_DURATION_PATTERN,
    Condition,
    CustomerBudgetStatus,
    ManifestError,
    parse_resource,
)
from spendgate.money import MAX_MICROS, AmountError, parse_amount

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
Schema = dict[str, Any]


@functools.cache
def committed(kind: str) -> dict[str, Any]:
    resource = next(r for r in crd.RESOURCES if r.kind == kind)
    return yaml.safe_load((CRDS / resource.filename).read_text())


def schema_of(kind: str) -> Schema:
    return committed(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------- the API server


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting: absent properties with a default are filled where the parent is."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def strict(schema: Schema) -> Schema:
    """Refuse unknown fields, as the API server does under kubectl's default --validate=strict."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        stack += node.get("properties", {}).values()
        stack += [node["items"]] if "items" in node else []
    return schema


def schema_errors(schema: Schema, value: Any) -> list[str]:
    validator = Draft202012Validator(
        strict(schema), format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(value)
    ]


_CEL = celpy.Environment()


@functools.cache
def _program(rule: str) -> celpy.Runner:
    return _CEL.program(_CEL.compile(rule))


def cel_holds(rule: str, value: Any, old: Any = None) -> bool:
    """A rule holds when it evaluates to true; an evaluation error fails it, as in Kubernetes.
    A transition rule (one reading ``oldSelf``) runs only on an update, given ``old``."""
    if "oldSelf" in rule and old is None:
        return True
    bindings = {"self": celpy.json_to_cel(value)}
    if old is not None:
        bindings["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule).evaluate(bindings)
    except CELEvalError:
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def cel_failures(schema: Schema, value: Any, path: str = "") -> list[str]:
    """The messages of the CEL rules that fail, each evaluated with ``self`` at its location."""
    failures = [
        f"{path}: {rule['message']}"
        for rule in schema.get("x-kubernetes-validations", [])
        if not cel_holds(rule["rule"], value)
    ]
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                failures += cel_failures(sub, value[name], f"{path}.{name}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{index}]")
    return failures


def api_server_errors(manifest: dict[str, Any]) -> list[str]:
    """Defaulting, then the OpenAPI schema; CEL rules when the schema passes (to keep it quick)."""
    schema = schema_of(manifest["kind"])
    defaulted = apply_defaults(schema, manifest)
    return schema_errors(schema, defaulted) or cel_failures(schema, defaulted)


def model_accepts(manifest: dict[str, Any]) -> bool:
    try:
        parse_resource(manifest)
    except ManifestError:
        return False
    return True


def budget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "CustomerBudget",
        "metadata": {"name": "acme", "namespace": "team-a"},
        "spec": {"customerId": "acme", "currency": "USD", **spec},
    }


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "chat", "price": {"flat": "0.01"}, **fields}


def priced_by(**expression: Any) -> dict[str, Any]:
    """A rule priced by expressions (docs/pricing.md)."""
    return {"name": "chat", "expression": expression}


def pricebook(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "PriceBook",
        "metadata": {"name": "llm"},
        "spec": {"currency": "USD", "rules": list(rules) or [rule()], **spec},
    }


def example_manifests() -> list[dict[str, Any]]:
    return [
        document
        for name in ("budgets.yaml", "pricebook.yaml")
        for document in yaml.safe_load_all((EXAMPLES / name).read_text())
        if document and document.get("apiVersion") == API_VERSION
    ]


# --------------------------------------------------------------------------- drift


def test_committed_crds_match_the_models() -> None:
    stale = crd.check(CRDS)
    assert not stale, (
        f"{stale} drifted from spendgate/models/: python -m spendgate.crd --write crds/"
    )


# The schema digests of each CRD schema generation (spendgate/crd.py SCHEMA_GENERATION). A
# model change that alters a CRD fails here until the generation is bumped and its digests
# pinned: the operator then refuses (not ready, naming the CRD) an installed CRD of an older
# generation instead of meeting the API server's 422s (docs/install.md, "Upgrades").
SCHEMA_DIGESTS = {
    1: {
        "customerbudgets.spendgate.dev": "b8b6237755787b9a",
        "pricebooks.spendgate.dev": "565ae987fb30dedf",
    },
    2: {  # spec.parent may change (a move); status.ownSpentThisPeriod (own vs subtree spend)
        "customerbudgets.spendgate.dev": "476e2f54eedb3ae6",
        "pricebooks.spendgate.dev": "565ae987fb30dedf",
    },
    3: {  # policy.softLimits, status.softLimitsReached; PriceBook rules' downgradeTo
        "customerbudgets.spendgate.dev": "a1ee6e7d9c7f9126",
        "pricebooks.spendgate.dev": "c1935f96a101fab1",
    },
}


def test_a_schema_change_bumps_the_schema_generation() -> None:
    digests = {resource.name: crd.schema_digest(resource) for resource in crd.RESOURCES}
    pinned = SCHEMA_DIGESTS.get(crd.SCHEMA_GENERATION)
    assert digests == pinned, (
        f"the CRD schema changed ({digests}): bump SCHEMA_GENERATION in spendgate/crd.py to"
        f" {max(SCHEMA_DIGESTS) + 1}, pin these digests for it here, and regenerate crds/"
    )
    for resource in crd.RESOURCES:
        annotations = crd.definition(resource)["metadata"]["annotations"]
        assert annotations[crd.SCHEMA_ANNOTATION] == str(crd.SCHEMA_GENERATION)


def test_check_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main(["--write", str(tmp_path)]) == 0
    assert crd.main(["--check", str(tmp_path)]) == 0
    path = tmp_path / "pricebooks.spendgate.dev.yaml"
    path.write_text(path.read_text().replace("maxItems: 200", "maxItems: 300"))
    assert crd.main(["--check", str(tmp_path)]) == 1
    assert "pricebooks.spendgate.dev.yaml is out of date" in capsys.readouterr().err
    path.unlink()
    assert crd.check(tmp_path) == [path]


def test_stdout_holds_both_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main([]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in documents] == [
        "customerbudgets.spendgate.dev",
        "pricebooks.spendgate.dev",
    ]


def test_names_versions_and_columns() -> None:
    budgets, books = committed("CustomerBudget"), committed("PriceBook")
    assert budgets["spec"]["names"] == {
        "kind": "CustomerBudget",
        "listKind": "CustomerBudgetList",
        "plural": "customerbudgets",
        "singular": "customerbudget",
        "shortNames": ["cb"],
        "categories": ["spendgate"],
    }
    assert books["spec"]["names"]["shortNames"] == ["pb"]
    assert books["spec"]["names"]["categories"] == ["spendgate"]
    for document in (budgets, books):
        assert document["apiVersion"] == "apiextensions.k8s.io/v1"
        assert document["spec"]["scope"] == "Namespaced"
        (version,) = document["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in budgets["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {name: c["jsonPath"] for name, c in columns.items() if not c.get("priority")} == {
        "Customer": ".spec.customerId",
        "Parent": ".spec.parent",
        "State": ".status.state",
        "Balance": ".status.balance",
        "Spent": ".status.spentThisPeriod",
        "Age": ".metadata.creationTimestamp",
    }
    assert columns["Age"]["type"] == "date"


@pytest.mark.parametrize("kind", ["CustomerBudget", "PriceBook"])
def test_printer_columns_name_described_fields(kind: str) -> None:
    version = committed(kind)["spec"]["versions"][0]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = version["schema"]["openAPIV3Schema"]
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == "string", column


# --------------------------------------------------------------------------- structural


_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# fmt: off
_NOT_STRUCTURAL = {
    "$ref", "$defs", "definitions", "title", "const", "nullable", "patternProperties",
    "dependencies", "additionalItems", "uniqueItems", "exclusiveMinimum", "exclusiveMaximum",
}
_FORMATS = {
    "date", "date-time", "duration", "byte", "int32", "int64", "float", "double", "uuid",
    "email", "hostname", "ipv4", "ipv6", "cidr", "uri", "password", "mac",
}
# fmt: on
# Python's re and jsonschema read these as Unicode classes, Go's RE2 as ASCII ones.
_UNICODE_CLASSES = re.compile(r"\\[dws]")
_TYPES = {"string": str, "integer": int, "boolean": bool, "number": (int, float)}


def structural_problems(node: Schema, where: str = "openAPIV3Schema") -> list[str]:
    """What the API server (or its CEL and regex engines) would refuse in a CRD schema."""
    problems = [f"{where}: {key} is not structural" for key in _NOT_STRUCTURAL & node.keys()]
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if int_or_string:
        if "type" in node:
            problems.append(f"{where}: type must be empty with x-kubernetes-int-or-string")
        if node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) != [
            {"type": "integer"},
            {"type": "string"},
        ]:
            problems.append(f"{where}: anyOf may only spell out integer-or-string")
    elif "type" not in node:
        problems.append(f"{where}: no type")
    problems += [
        f"{where}: {key} is only allowed for int-or-string"
        for key in _JUNCTORS
        if key in node and not (key == "anyOf" and int_or_string)
    ]
    kind = node.get("type")
    if kind == "object":
        properties = node.get("properties", {})
        if "additionalProperties" in node and (
            properties or not isinstance(node["additionalProperties"], dict)
        ):
            problems.append(f"{where}: additionalProperties must be a schema, without properties")
        problems += [
            f"{where}: required {name!r} is not a property"
            for name in node.get("required", [])
            if name not in properties
        ]
        for name, sub in properties.items():
            problems += structural_problems(sub, f"{where}.properties[{name}]")
        if "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            problems += structural_problems(
                node["additionalProperties"], f"{where}.additionalProperties"
            )
    elif kind == "array":
        if not isinstance(node.get("items"), dict):
            problems.append(f"{where}: an array needs one items schema")
        else:
            problems += structural_problems(node["items"], f"{where}.items")
            problems += _list_map_problems(node, where)
    elif "properties" in node or "items" in node:
        problems.append(f"{where}: properties/items on a {kind or 'int-or-string'}")
    if kind in _TYPES and "enum" in node:
        problems += [
            f"{where}: enum value {value!r} is not a {kind}"
            for value in node["enum"]
            if not isinstance(value, _TYPES[kind]) or isinstance(value, bool) != (kind == "boolean")
        ]
    if "pattern" in node:
        try:
            re2.compile(node["pattern"])
        except re2.error:
            problems.append(f"{where}: pattern is not RE2 syntax")
        if _UNICODE_CLASSES.search(node["pattern"]):
            problems.append(f"{where}: pattern uses \\d, \\w or \\s (ASCII in RE2 only)")
    if "format" in node and node["format"] not in _FORMATS:
        problems.append(f"{where}: unknown format {node['format']!r}")
    if "default" in node:
        if node["default"] is None:
            problems.append(f"{where}: null default")
        without = {key: value for key, value in node.items() if key != "default"}
        problems += [f"{where}: default {e}" for e in schema_errors(without, node["default"])]
        problems += [f"{where}: default {e}" for e in cel_failures(without, node["default"])]
    for rule in node.get("x-kubernetes-validations", []):
        if set(rule) != {"rule", "message"} or not rule["message"].strip():
            problems.append(f"{where}: a CEL rule needs a rule and a human message: {rule}")
        _program(rule["rule"])  # compiles
    return problems


def _list_map_problems(node: Schema, where: str) -> list[str]:
    if node.get("x-kubernetes-list-type") != "map":
        return []
    items, keys = node["items"], node.get("x-kubernetes-list-map-keys", [])
    problems = [] if keys else [f"{where}: a map list needs x-kubernetes-list-map-keys"]
    for key in keys:
        sub = items.get("properties", {}).get(key, {})
        if sub.get("type") not in ("string", "integer", "boolean"):
            problems.append(f"{where}: map key {key!r} must be a scalar property")
        if key not in items.get("required", []) and "default" not in sub:
            problems.append(f"{where}: map key {key!r} must be required or defaulted")
    return problems


@pytest.mark.parametrize("kind", ["CustomerBudget", "PriceBook"])
def test_schema_is_structural(kind: str) -> None:
    schema = schema_of(kind)
    assert structural_problems(schema) == []
    assert schema["type"] == "object"
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["required"] == ["spec"]
    assert schema["properties"]["apiVersion"]["type"] == "string"
    Draft202012Validator.check_schema(schema)


def test_structural_checker_finds_problems() -> None:
    bad = {
        "type": "object",
        "properties": {
            "ref": {"$ref": "#/$defs/X"},
            "untyped": {"description": "no type"},
            "optional": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "list": {"type": "array"},
            "both": {"type": "object", "properties": {}, "additionalProperties": False},
            "digits": {"type": "string", "pattern": r"^\d+$"},
            "lookahead": {"type": "string", "pattern": r"^(?=a)"},
            "default": {"type": "integer", "minimum": 1, "default": 0},
            "rule": {"type": "string", "x-kubernetes-validations": [{"rule": "true"}]},
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {"type": "object", "properties": {"type": {"type": "string"}}},
            },
        },
    }
    found = "\n".join(structural_problems(bad))
    names = ("ref", "untyped", "optional", "list", "both", "digits", "lookahead", "default", "rule")
    for name in names:
        assert f"properties[{name}]" in found, name
    assert "must be required or defaulted" in found


def test_what_kubernetes_cannot_express_fails_the_generator() -> None:
    class Union(BaseModel):
        spec: int | str

    class Tuple(BaseModel):
        spec: tuple[int, str]

    for model in (Union, Tuple):
        with pytest.raises(ValueError, match=r"Kubernetes cannot express|no structural-schema"):
            crd.openapi_schema(model)


def test_amounts_are_int_or_string_with_a_pattern() -> None:
    spec = schema_of("CustomerBudget")["properties"]["spec"]["properties"]
    assert spec["balance"]["x-kubernetes-int-or-string"] is True
    assert spec["balance"]["pattern"] == AMOUNT_PATTERN
    assert spec["balance"]["minimum"] == 0
    assert spec["limit"]["minimum"] == 1
    grace = spec["policy"]["properties"]["onPaymentFailure"]["properties"]["gracePeriod"]
    assert grace["pattern"] == POSITIVE_DURATION_PATTERN


def test_status_fits_what_the_operator_writes() -> None:
    status = CustomerBudgetStatus(
        state="Active",
        balance="5.00",
        conditions=[
            Condition(
                type="Ready",
                status="True",
                reason="Configured",
                last_transition_time="2025-01-01T00:00:00Z",
                observed_generation=3,
            ),
        ],
        observed_generation=3,
    ).to_manifest()
    status_schema = schema_of("CustomerBudget")["properties"]["status"]
    assert schema_errors(status_schema, status) == []
    bad = copy.deepcopy(status)
    bad["conditions"][0]["status"] = "Maybe"
    assert schema_errors(status_schema, bad)


# --------------------------------------------------------------------------- examples


def test_examples_pass_schema_and_cel() -> None:
    manifests = example_manifests()
    assert len(manifests) == 5
    for manifest in manifests:
        schema = schema_of(manifest["kind"])
        assert schema_errors(schema, manifest) == [], manifest["metadata"]["name"]
        assert cel_failures(schema, manifest) == [], manifest["metadata"]["name"]
        assert api_server_errors(manifest) == [], manifest["metadata"]["name"]


def test_defaulting_does_not_change_meaning() -> None:
    """What the API server stores after defaulting parses to the same model."""
    metered = pricebook(rule(price={"perSecond": "0.01"}, maximum="1"))
    for manifest in [*example_manifests(), budget(), metered]:
        defaulted = apply_defaults(schema_of(manifest["kind"]), manifest)
        assert parse_resource(defaulted) == parse_resource(manifest)


# --------------------------------------------------------------------------- CEL rules

GRACE = {"action": "grace", "gracePeriod": "72h"}
CAPPED = {"mode": "capped", "limit": "100", "period": "month"}
KEY = {"name": "prod", "secretRef": {"name": "keys"}}
TOKENS = {"flat": "0.0001", "perMillionInputTokens": "0.50"}
ABNORMAL = {"action": "suspend", "minimum": "5.00"}

# (message, valid manifests, invalid manifest): the invalid one fails exactly this rule.
# fmt: off
CEL_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("give exactly one of requests or cost",
     [budget(rateLimits=[{"requests": 5, "per": "second"}, {"cost": "1", "per": "day"}])],
     budget(rateLimits=[{"requests": 5, "cost": "1.00", "per": "second"}])),
    ("give exactly one of requests or cost",
     [budget(apiKeys=[{**KEY, "rateLimits": [{"cost": 2, "per": "hour"}]}])],
     budget(apiKeys=[{**KEY, "rateLimits": [{"per": "hour"}]}])),
    ("action 'grace' needs gracePeriod (for example \"72h\")",
     [budget(policy={"onPaymentFailure": GRACE}), budget(policy={"onPaymentFailure": {}})],
     budget(policy={"onPaymentFailure": {"action": "grace"}})),
    ("minActiveHours cannot exceed the hours of baselineDays",
     [budget(policy={"abnormalSpend": ABNORMAL}),
      budget(policy={"abnormalSpend": {**ABNORMAL, "baselineDays": 1, "minActiveHours": 24}})],
     budget(policy={"abnormalSpend": {**ABNORMAL, "baselineDays": 1, "minActiveHours": 25}})),
    ("gracePeriod is only used with action 'grace'",
     [budget(policy={"onPaymentFailure": {"action": "grace", "gracePeriod": 3600}})],
     budget(policy={"onPaymentFailure": {"gracePeriod": "72h"}})),
    ("thresholds must be increasing and unique",
     [budget(policy={"alertThresholds": t})
      for t in ([], [100], [50, 80, 100], list(range(1, 11)))],
     budget(policy={"alertThresholds": [50, 90, 80]})),
    ("thresholds must be increasing and unique",
     [budget(policy={"alertThresholds": [10, 20]})],
     budget(policy={"alertThresholds": [10, 20, 30, 40, 50, 60, 70, 80, 90, 90]})),
    ("mode 'capped' needs both limit and period",
     [budget(**CAPPED), budget(mode="prepaid")],
     budget(mode="capped")),
    ("balance is for mode 'prepaid'; capped budgets spend up to limit",
     [budget(balance="5.00"), budget(**CAPPED)],
     budget(**CAPPED, balance="5.00")),
    ("a spend cap (limit) needs a period",
     [budget(balance="5", limit="1", period="day")],
     budget(balance="5", limit="1")),
    ("period is only meaningful together with limit",
     [budget(balance="5", limit=1, period="week")],
     budget(balance="5", period="week")),
    ("apiKeys names must be unique",
     [budget(apiKeys=[KEY, {**KEY, "name": "ci"}])],
     budget(apiKeys=[KEY, {"name": "prod", "secretRef": {"name": "other"}}])),
    ("must be greater than zero",
     [budget(**{**CAPPED, "limit": "0.000001"})],
     budget(**{**CAPPED, "limit": "0.00"})),
    ("must be greater than zero",
     [budget(policy={"maxRequestCost": "0.5"})],
     budget(policy={"maxRequestCost": "0"})),
    ("give path or pathPrefix, not both",
     [pricebook(rule(match={"path": "/v1/x"}), rule(name="b", match={"pathPrefix": "/v1/"}))],
     pricebook(rule(match={"path": "/v1/x", "pathPrefix": "/v1/"}))),
    ("a rule with token or time prices needs a maximum",
     [pricebook(rule(price=TOKENS, maximum="0.50")),
      pricebook(rule(price={"flat": 1, "perMillionInputTokens": 0, "perSecond": "0.000"}))],
     pricebook(rule(price=TOKENS))),
    ("a rule with token or time prices needs a maximum",
     [pricebook(rule(price={"perSecond": "0.001"}, maximum=1))],
     pricebook(rule(price={"perSecond": 1}))),
    ("minOutputTokens must not exceed maxOutputTokens",
     [pricebook(rule(minOutputTokens=100, maxOutputTokens=100)),
      pricebook(rule(minOutputTokens=4096)), pricebook(rule(maxOutputTokens=1))],
     pricebook(rule(minOutputTokens=20, maxOutputTokens=10))),
    ("rule names must be unique",
     [pricebook(rule(), rule(name="other"))],
     pricebook(rule(), rule(price={"flat": "0.02"}))),
    ("must be greater than zero",
     [pricebook(rule(maximum="0.01"))],
     pricebook(rule(maximum="0.000000"))),
    ("stripe.exchangeRate is for budgets in a custom unit",
     [budget(currency="credits", stripe={"customerId": "cus_A",
                                         "exchangeRate": {"currency": "USD", "units": "100"}})],
     budget(stripe={"customerId": "cus_A", "exchangeRate": {"currency": "USD", "units": 1}})),
    ("give price or expression, not both",
     [pricebook(priced_by(bound="prices.one", prices={"one": "0.01"}))],
     pricebook(rule(expression={"bound": "1"}))),
    ("clampField lowers a count the bound reads: give a bound",
     [pricebook(priced_by(bound="int(request.n) * prices.one", prices={"one": 1},
                          clampField="n"))],
     pricebook({**priced_by(cost="prices.one", prices={"one": 1}, clampField="n"),
                "maximum": "1.00"})),
    ("price names are 1-63 letters, digits and _ . : -",
     [pricebook(priced_by(bound="1", prices={"hd_1024x1024": 1, "b.c:d-e": "0.5"}))],
     pricebook(priced_by(bound="1", prices={"a b": 1}))),
    ("parent must be a CustomerBudget in the same namespace (a name, not namespace/name)",
     [budget(parent="acme-org"), budget(parent="team.a")],
     budget(parent="other/acme-org")),
    ("parent must be a CustomerBudget name",
     [budget(parent="a")],
     budget(parent="Team_A")),
    ("stripe links a root budget; a budget with a parent spends its root's money",
     [budget(parent="acme-org"), budget(stripe={"customerId": "cus_A"})],
     budget(parent="acme-org", stripe={"customerId": "cus_A"})),
    ("give exactly one of at or below",
     [budget(**CAPPED, policy={"softLimits": [{"action": "notify", "at": 90},
                                               {"action": "notify", "below": "5.00"}]})],
     budget(**CAPPED, policy={"softLimits": [{"action": "notify", "at": 90, "below": 5}]})),
    ("rateLimits are what action 'throttle' applies: give them with it, only with it",
     [budget(**CAPPED, policy={"softLimits": [
         {"action": "throttle", "at": 80, "rateLimits": [{"requests": 1, "per": "second"}]}]})],
     budget(**CAPPED, policy={"softLimits": [{"action": "throttle", "at": 80}]})),
    ("rateLimits are what action 'throttle' applies: give them with it, only with it",
     [budget(balance="5", policy={"softLimits": [{"action": "downgrade", "below": "1"}]})],
     budget(balance="5", policy={"softLimits": [
         {"action": "downgrade", "below": "1", "rateLimits": [{"requests": 1, "per": "day"}]}]})),
    ("policy.softLimits: 'at' is a percentage of the budget's limit, and this budget has none;"
     " use 'below' (an amount left) or give the budget a limit",
     [budget(balance="5", limit="4", period="day", policy={"softLimits": [
         {"action": "notify", "at": 50}]}),
      budget(balance="5", policy={"softLimits": [{"action": "notify", "below": "1"}]})],
     budget(balance="5", policy={"softLimits": [{"action": "notify", "at": 50}]})),
    ("a key's spend cap needs both limit and period",
     [budget(apiKeys=[{**KEY, "limit": "5.00", "period": "day"}])],
     budget(apiKeys=[{**KEY, "limit": "5.00"}])),
]
# fmt: on


def _messages(failures: list[str]) -> set[str]:
    return {failure.split(": ", 1)[1] for failure in failures}


@pytest.mark.parametrize(("message", "valid", "invalid"), CEL_CASES, ids=[c[0] for c in CEL_CASES])
def test_cel_rule(message: str, valid: list[dict[str, Any]], invalid: dict[str, Any]) -> None:
    for manifest in valid:
        assert api_server_errors(manifest) == [], manifest["spec"]
        assert model_accepts(manifest), manifest["spec"]
    schema = schema_of(invalid["kind"])
    defaulted = apply_defaults(schema, invalid)
    assert schema_errors(schema, defaulted) == [], "the OpenAPI schema alone lets it through"
    assert _messages(cel_failures(schema, defaulted)) == {message}
    # Without API-server defaulting the rules come to the same verdict.
    assert _messages(cel_failures(schema, invalid)) == {message}
    assert not model_accepts(invalid), "the model refuses it too"


def test_cel_string_literals_use_only_escapes_cel_has() -> None:
    """A real API server refuses a CRD whose rule has ``'\\.'`` in a quoted string (CEL knows
    no such escape; cel-python here lets it pass): a regex with backslashes goes in a raw
    string, ``r'...'``. Found by tests/e2e/test_crd_server.py."""
    allowed = set("abfnrtvxuU01234567\\'\"`?")
    for kind in ("CustomerBudget", "PriceBook"):
        stack = [schema_of(kind)]
        while stack:
            node = stack.pop()
            for rule in node.get("x-kubernetes-validations", []):
                for literal in re.finditer(r"(r?)'((?:[^'\\]|\\.)*)'", rule["rule"]):
                    raw, body = literal.groups()
                    escapes = re.findall(r"\\(.)", body)
                    assert raw or set(escapes) <= allowed, (kind, rule["rule"])
            stack += node.get("properties", {}).values()
            stack += [node["items"]] if "items" in node else []


def test_every_cel_rule_is_tested() -> None:
    declared = set()
    for kind in ("CustomerBudget", "PriceBook"):
        stack = [schema_of(kind)]
        while stack:
            node = stack.pop()
            declared |= {rule["message"] for rule in node.get("x-kubernetes-validations", [])}
            stack += node.get("properties", {}).values()
            stack += [node["items"]] if "items" in node else []
    assert declared == {message for message, _, _ in CEL_CASES}


def test_the_parent_may_change_on_update() -> None:
    """Changing spec.parent moves the budget (spendgate.tree_moves): no CEL rule compares a
    CustomerBudget with its old self."""
    stack = [schema_of("CustomerBudget")]
    while stack:
        node = stack.pop()
        for rule in node.get("x-kubernetes-validations", []):
            assert "oldSelf" not in rule["rule"], rule
        stack += node.get("properties", {}).values()
        stack += [node["items"]] if "items" in node else []


# --------------------------------------------------------------------------- cross-check

# Refused by the model and by the API server, by the OpenAPI schema or a CEL rule.
# fmt: off
INVALID: list[dict[str, Any]] = [
    budget(balance="-1"), budget(balance=-5), budget(balance=0.5), budget(balance="1.1234567"),
    budget(balance="12,50"), budget(balance="1e3"), budget(balance=True), budget(currency="US"),
    budget(currency="usd$"), budget(customerId="bad id"), budget(customerId="{acme}"),
    budget(mode="postpaid"), budget(**{**CAPPED, "period": "year"}),
    budget(**{**CAPPED, "limit": 0}),
    budget(rateLimits=[{"requests": 0, "per": "minute"}]),
    budget(rateLimits=[{"requests": 5, "per": "week"}]),
    budget(rateLimits=[{"requests": 5, "per": "minute", "burst": 0}]),
    budget(rateLimits=[{"cost": "0", "per": "minute"}]),
    budget(rateLimits=[{"requests": 1, "per": "minute"}] * 9),
    budget(apiKeys=[{"name": "Prod", "secretRef": {"name": "keys"}}]),
    budget(apiKeys=[{"name": "prod", "secretRef": {"name": "Bad_Name"}}]),
    budget(apiKeys=[{"name": "prod"}]),
    budget(policy={"alertThresholds": [0, 50]}), budget(policy={"alertThresholds": [50, 101]}),
    budget(policy={"alertThresholds": list(range(1, 12))}),
    budget(policy={"onPaymentFailure": {"action": "grace", "gracePeriod": "0s"}}),
    budget(policy={"onPaymentFailure": {"action": "grace", "gracePeriod": "soon"}}),
    budget(policy={"onPaymentFailure": {"action": "ignore"}}),
    budget(stripe={"customerId": "acme"}),
    budget(policy={"abnormalSpend": {}}), budget(policy={"abnormalSpend": {"minimum": "0"}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "action": "block"}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "factor": 1}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "percentile": 0}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "baselineDays": 61}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "window": 30}}),
    budget(policy={"abnormalSpend": {**ABNORMAL, "window": "0s"}}),
    budget(stripe={"customerId": "cus_1", "subscriptionId": "1"}),
    budget(displayName="x" * 201), budget(balanse="5.00"),
    pricebook(currency="dollars!"), pricebook(unmatched="allow"),
    {**pricebook(), "spec": {"currency": "USD", "rules": []}},
    pricebook(*[rule(name=f"r{i}") for i in range(201)]),
    pricebook(rule(name="Chat")), pricebook(rule(match={"methods": ["FETCH"]})),
    pricebook(rule(match={"methods": []})), pricebook(rule(match={"path": "v1/chat"})),
    pricebook(rule(timeout="0s")), pricebook(rule(timeout=0)), pricebook(rule(timeout="5x")),
    pricebook(rule(estimate={"outputTokens": -1})), pricebook(rule(estimate={"inputTokens": -1})),
    pricebook(rule(estimate={"seconds": "-1s"})), pricebook(rule(onUpstreamError="charge")),
    pricebook(rule(price={"flat": "-1"})), pricebook(rule(price={"flat": 0.01})),
    pricebook(rule(price={"perToken": "1"})), pricebook(rule(maximum=0)),
    {**pricebook(), "spec": {"currency": "USD", "rules": [{"name": "x"}]}},
]
# fmt: on
INVALID += [invalid for _, _, invalid in CEL_CASES]


@pytest.mark.parametrize("manifest", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_specs_fail_at_apply_time(manifest: dict[str, Any]) -> None:
    assert not model_accepts(manifest), manifest["spec"]
    assert api_server_errors(manifest), manifest["spec"]


# Documented gaps: refused by the model (the operator reports them in a condition), but not
# expressible in the CRD: numeric comparisons of decimal strings and upper bounds of strings.
MODEL_ONLY = [
    pricebook(rule(price={"flat": "1.00"}, maximum="0.50")),  # maximum below the flat price
    budget(balance="9999999999"),  # above MAX_MICROS
    pricebook(rule(timeout="367d")),  # over 366 days
    budget(policy={"abnormalSpend": {**ABNORMAL, "window": "90s"}}),  # not whole minutes
    budget(policy={"abnormalSpend": {**ABNORMAL, "window": "2d"}}),  # over 24 h
    # a clampField the bound does not read: lowering it would not lower the hold
    pricebook(priced_by(bound="prices.one", prices={"one": 1}, clampField="n")),
    # downgradeTo a model no rule prices on the rule's route, the rule's own, a pricier one
    pricebook(rule(match={"models": ["big"]}, downgradeTo="small")),
    pricebook(rule(match={"models": ["big*"]}, downgradeTo="big-mini")),
    pricebook(
        rule(match={"models": ["big"]}, downgradeTo="small"),
        rule(name="small", match={"models": ["small"]}, price={"flat": "0.02"}),
    ),
]
# ... and the other way round: the models normalize these (pydantic's lax mode turns "yes" into
# True and "10" into 10), the CRD asks for the canonical form.
CRD_STRICTER = [
    pricebook(rule(match={"methods": ["post"]})),
    budget(balance=" 5.00 "),
    budget(policy={"suspended": "yes"}),
    budget(rateLimits=[{"requests": "10", "per": "minute"}]),
]


@pytest.mark.parametrize("manifest", MODEL_ONLY)
def test_known_gaps_are_caught_by_the_model(manifest: dict[str, Any]) -> None:
    assert api_server_errors(manifest) == []
    assert not model_accepts(manifest)


@pytest.mark.parametrize("manifest", CRD_STRICTER)
def test_crd_asks_for_canonical_forms(manifest: dict[str, Any]) -> None:
    assert model_accepts(manifest)
    assert api_server_errors(manifest)


# --------------------------------------------------------------------------- patterns


def _samples(alphabet: list[str], count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [
        "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 8)))
        for _ in range(count)
    ]


def test_amount_pattern_agrees_with_parse_amount() -> None:
    samples = _samples(["0", "1", "9", "05", "123456", ".", "+", "-", "e", " ", ","], 4000, 1)
    samples += ["0", "12.50", "0.000001", "0.0000001", "+5", "-0", "1.", ".5", "9" * 15, "9" * 16]
    for text in samples:
        try:
            accepted = parse_amount(text) >= 0
        except AmountError as error:
            # The value bound is one the pattern does not express (it bounds only digits).
            accepted = "too large" in str(error) and len(text.lstrip("+").split(".")[0]) <= 15
        # The model also strips blanks and takes "-0"; the CRD wants the canonical form.
        canonical = text == text.strip() and not text.startswith("-")
        assert bool(re2.search(AMOUNT_PATTERN, text)) == (accepted and canonical), repr(text)
    balance = schema_of("CustomerBudget")["properties"]["spec"]["properties"]["balance"]
    assert balance["maximum"] == MAX_MICROS // 1_000_000


def test_duration_patterns_agree_with_parse_duration() -> None:
    samples = _samples(
        ["0", "1", "7", "00", "30", "ms", "s", "m", "h", "d", "x", " ", "-"], 4000, 2
    )
    for text in [*samples, "1h30m", "0s0ms", "500ms", "72h", "5m5s", "0m"]:
        try:
            milliseconds: int | None = parse_duration(text) if text == text.strip() else None
        except ValueError as error:
            milliseconds = 1 if "out of range" in str(error) else None
        assert bool(re2.search(DURATION_PATTERN, text)) == (milliseconds is not None), repr(text)
        positive = bool(re2.search(POSITIVE_DURATION_PATTERN, text))
        assert positive == (milliseconds is not None and milliseconds > 0), repr(text)
