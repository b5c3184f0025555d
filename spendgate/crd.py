"""The CustomResourceDefinitions, generated from the models in ``spendgate.models``.

The pydantic models are the one source of truth: their JSON schema becomes the CRD's structural
OpenAPI schema, and the CEL rules declared next to their validators become
``x-kubernetes-validations``. The YAML in ``crds/`` is generated, and a test fails when it drifts:

    python -m spendgate.crd --write crds/     # regenerate after changing a model
    python -m spendgate.crd --check crds/     # exit 1 if the files on disk are out of date
    python -m spendgate.crd | kubectl apply -f -

Conversion from pydantic's JSON schema (draft 2020-12) to a Kubernetes structural schema:
``$ref`` inlined; ``anyOf [X, null]`` (optional fields) becomes X; ``title`` and null defaults
dropped; ``const`` becomes a one-value ``enum``; integer ``exclusiveMinimum/Maximum`` become
``minimum/maximum``; ``additionalProperties: true`` (``extra="allow"``, ``dict[str, Any]``) becomes
``x-kubernetes-preserve-unknown-fields``; ``additionalProperties: false`` (``extra="forbid"``) is
dropped, since the API server prunes unknown fields or, with kubectl's default strict field
validation, refuses them. Defaults are taken in serialization mode ("5m", not 300000 ms). Any
other construct raises, so a model change Kubernetes cannot express fails here, not at apply time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .models import GROUP, VERSION, CustomerBudget, PriceBook

Schema = dict[str, Any]

# The CRDs' schema generation, as an annotation on each CRD. The operator needs the installed
# CRDs at this generation or later (operator/kube/api_checks.py): Helm never upgrades crds/,
# and an older schema makes the API server refuse (422) or prune what the operator writes.
# Bump it with every schema change (tests/core/test_crds.py pins each generation's digests).
SCHEMA_ANNOTATION = f"{GROUP}/schema-generation"
SCHEMA_GENERATION = 3

HEADER = (
    "# Generated from spendgate/models/ by `python -m spendgate.crd --write crds/`.\n"
    "# Do not edit: change the models and regenerate (tests/core/test_crds.py checks it).\n"
)
CATEGORY = "spendgate"

# Keywords copied as they are; anything else in a model's JSON schema is an error.
_KEEP = {
    "type", "description", "required", "enum", "pattern", "format", "default",
    "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "maxProperties",
    "x-kubernetes-int-or-string", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def _column(name: str, path: str, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority  # shown by `kubectl get -o wide` only
    return column


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class Resource:
    model: type[BaseModel]
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[dict[str, Any], ...]

    @property
    def kind(self) -> str:
        return self.model.__name__

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{self.name}.yaml"


RESOURCES = (
    Resource(
        CustomerBudget,
        "customerbudgets",
        ("cb",),
        (
            _column("Customer", ".spec.customerId"),
            _column("Parent", ".spec.parent"),
            _column("Mode", ".spec.mode", priority=1),
            _column("State", ".status.state"),
            _column("Currency", ".spec.currency", priority=1),
            _column("Balance", ".status.balance"),
            _column("Spent", ".status.spentThisPeriod"),
            _column("Own", ".status.ownSpentThisPeriod", priority=1),
            _AGE,
        ),
    ),
    Resource(
        PriceBook,
        "pricebooks",
        ("pb",),
        (
            _column("Currency", ".spec.currency"),
            _column("Unmatched", ".spec.unmatched", priority=1),
            _AGE,
        ),
    ),
)


# --------------------------------------------------------------------------- schema conversion


def _merge(base: Schema, over: Schema) -> Schema:
    """``over`` (the referring side: a field's description, default) wins; CEL rules add up."""
    merged = {**base, **over}
    rules = base.get("x-kubernetes-validations", []) + over.get("x-kubernetes-validations", [])
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline ``$ref`` and unwrap ``anyOf [X, null]`` until the node is a plain schema."""
    while True:
        rest = {key: value for key, value in node.items() if key not in ("$ref", "anyOf")}
        if "$ref" in node:
            node = _merge(defs[node["$ref"].rsplit("/", 1)[-1]], rest)
        elif "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [branch for branch in node["anyOf"] if branch != {"type": "null"}]
            if len(branches) != 1:
                raise ValueError(f"a union Kubernetes cannot express: {node['anyOf']}")
            node = _merge(branches[0], rest)
        else:
            return node


def _convert(node: Schema, defs: dict[str, Schema], where: str) -> Schema:
    node = _resolve(node, defs)
    out: Schema = {}
    for key, value in sorted(node.items()):
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs, f"{where}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, f"{where}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs, f"{where}{{}}")
            elif value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "anyOf" and value == _INT_OR_STRING:
            out[key] = value
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and node.get("type") == "integer":
            # Kubernetes takes the OpenAPI 3.0 boolean form; for integers a bound is simpler.
            if key == "exclusiveMinimum":
                out["minimum"] = value + 1
            else:
                out["maximum"] = value - 1
        elif key == "description":
            out[key] = value.replace("``", "`").strip()
        elif key in _KEEP:
            out[key] = value
        else:
            raise ValueError(f"{where}: {key!r} has no structural-schema translation: {value!r}")
    return dict(sorted(out.items()))


def openapi_schema(model: type[BaseModel]) -> Schema:
    """The ``openAPIV3Schema`` of a resource model: its spec and status, fully described."""
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    schema = _convert(raw, raw.get("$defs", {}), model.__name__)
    properties = schema["properties"]
    # Set by the API server; metadata is never described in a CRD beyond its type.
    properties["apiVersion"] = {"type": "string", "description": "spendgate.dev/v1alpha1"}
    properties["kind"] = {"type": "string", "description": model.__name__}
    properties["metadata"] = {"type": "object"}
    schema["required"] = [name for name in schema["required"] if name != "metadata"]
    return schema


def definition(resource: Resource) -> dict[str, Any]:
    """The CustomResourceDefinition of one resource, as a mapping."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.name,
            "labels": {"app.kubernetes.io/part-of": "spendgate"},
            "annotations": {SCHEMA_ANNOTATION: str(SCHEMA_GENERATION)},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
                "shortNames": list(resource.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(resource.columns),
                    "schema": {"openAPIV3Schema": openapi_schema(resource.model)},
                }
            ],
        },
    }


def schema_digest(resource: Resource) -> str:
    """A digest of what the API server enforces and shows: the spec (schema, printer columns,
    names), not the annotations."""
    spec = json.dumps(definition(resource)["spec"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


class _Dumper(yaml.SafeDumper):
    """Writes shared sub-schemas out in full: no YAML anchors and aliases in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(resource: Resource) -> str:
    body = yaml.dump(definition(resource), Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return HEADER + body


# --------------------------------------------------------------------------- files


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for resource in RESOURCES:
        path = directory / resource.filename
        path.write_text(render(resource), encoding="utf-8")
        paths.append(path)
    return paths


def check(directory: Path) -> list[Path]:
    """The CRD files in ``directory`` that are missing or differ from the models."""
    stale = []
    for resource in RESOURCES:
        path = directory / resource.filename
        if not path.is_file() or path.read_text(encoding="utf-8") != render(resource):
            stale.append(path)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spendgate.crd",
        description="Generate the spendgate CRDs from the models (to stdout without options).",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="DIR", type=Path, nargs="?", const=Path("crds"))
    action.add_argument("--check", metavar="DIR", type=Path, nargs="?", const=Path("crds"))
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(f"wrote {path}")
        return 0
    if args.check is not None:
        stale = check(args.check)
        for path in stale:
            print(
                f"{path} is out of date with spendgate/models/;"
                f" run: python -m spendgate.crd --write {args.check}",
                file=sys.stderr,
            )
        return 1 if stale else 0
    sys.stdout.write("---\n".join(render(resource) for resource in RESOURCES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
