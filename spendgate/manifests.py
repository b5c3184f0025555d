"""Load, validate and apply CustomerBudget / PriceBook manifests (``spendgate apply``).

Everything is checked before anything is written: YAML, every resource's schema, Secret
references, duplicates within the input, and conflicts with what Redis already holds. Invalid
input applies nothing. Then PriceBooks are applied, then budgets, through ``ConfigStore``.

API keys are read from ``v1`` Secrets in the same input (``data`` base64 or ``stringData``);
only their SHA-256 hashes reach Redis, and no message here ever contains a key.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config_store import ConfigConflict, ConfigStore
from .currency_check import currency_problems
from .keys import hash_api_key
from .models import (
    DNS_SUBDOMAIN_PATTERN,
    CustomerBudget,
    ManifestError,
    Mode,
    PriceBook,
    format_loc,
    parse_resource,
)
from .money import format_amount
from .tree_rules import Level, gather_levels, level_of, parents_first, place

MIN_KEY_LENGTH = 16
_DNS_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_KINDS = "CustomerBudget, PriceBook (spendgate.dev/v1alpha1), Secret (v1) or List"


class ApplyError(ValueError):
    """Input that cannot be applied; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str], applied: list[str] | None = None) -> None:
        self.problems = problems
        self.applied = applied or []  # results applied before the problem (a race with Redis)
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Secret:
    namespace: str
    name: str
    data: dict[str, str] = field(repr=False)  # decoded values; never printed


@dataclass(frozen=True)
class PlannedBudget:
    budget: CustomerBudget
    source: str
    api_keys: dict[str, str] = field(repr=False)  # key name -> plaintext, for ConfigStore


@dataclass
class Resources:
    """Validated input, ready for ``apply_resources``."""

    pricebooks: list[tuple[PriceBook, str]] = field(default_factory=list)
    budgets: list[PlannedBudget] = field(default_factory=list)
    secrets: dict[tuple[str, str], Secret] = field(default_factory=dict)


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (as kubectl does), instead of
    silently keeping the last value. Keys brought in by a merge (``<<: *base``) may be
    overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(name: str, error: yaml.YAMLError) -> str:
    """One line naming the input and the place: ``f.yaml: invalid YAML at line 3 column 5: ...``."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        line = f"{name}: invalid YAML at line {mark.line + 1} column {mark.column + 1}:"
        line += f" {error.problem}"
        if error.context:
            start = error.context_mark
            at = f" at line {start.line + 1}" if start is not None else ""
            line += f" ({error.context}{at})"
        return line
    return f"{name}: invalid YAML: {' '.join(str(error).split())}"


def read_documents(name: str, text: str) -> list[tuple[str, Any]]:
    """Split a YAML stream into ``(location, document)``; ``kind: List`` items are expanded."""
    stream = io.StringIO(text)
    stream.name = name  # type: ignore[misc]  # what PyYAML's own messages call the input
    try:
        documents = list(yaml.load_all(stream, Loader=_StrictLoader))
    except yaml.YAMLError as error:
        raise ApplyError([_yaml_problem(name, error)]) from None
    except RecursionError:
        raise ApplyError([f"{name}: invalid YAML: nested too deeply"]) from None
    found: list[tuple[str, Any]] = []
    for index, document in enumerate(documents, start=1):
        where = f"{name} document {index}"
        if document is None:
            continue
        if isinstance(document, dict) and document.get("kind") == "List":
            items = document.get("items")
            if not isinstance(items, list):
                raise ApplyError([f"{where}: items: a List needs a list of items"])
            found += [(f"{where} items[{i}]", item) for i, item in enumerate(items)]
        else:
            found.append((where, document))
    return found


def _label(where: str, document: Any) -> str:
    """``file document 2 (CustomerBudget default/acme)`` -- as much as the document tells."""
    if not isinstance(document, dict):
        return where
    meta = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    name = meta.get("name")
    ref = f"{meta.get('namespace') or 'default'}/{name}" if name else "<no name>"
    return f"{where} ({document.get('kind', '<no kind>')} {ref})"


def parse_secret(document: dict[str, Any], source: str) -> Secret:
    problems: list[str] = []
    meta = document.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    for path, value in (("metadata.name", name), ("metadata.namespace", namespace)):
        if not isinstance(value, str) or not _DNS_RE.match(value):
            problems.append(f"{path}: {value!r} is not a valid Kubernetes name")
    if document.get("type", "Opaque") != "Opaque":
        problems.append(f"type: {document['type']!r}: API keys must be in an Opaque Secret")
    data: dict[str, str] = {}
    for section in ("data", "stringData"):
        raw = document.get(section) or {}
        if not isinstance(raw, dict):
            problems.append(f"{section}: must be a mapping of key to value")
            continue
        for key, value in raw.items():
            if not isinstance(value, str):
                where = format_loc((section, str(key)))
                problems.append(f"{where}: must be a string (quote it in YAML)")
            elif section == "stringData":
                data[key] = value  # stringData wins over data, as in Kubernetes
            else:
                try:
                    data[key] = base64.b64decode(value, validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    problems.append(f"{section}.{key}: not valid base64 of UTF-8 text")
    if problems:
        raise ManifestError(source, problems)
    return Secret(namespace, name, data)


def _resolve_key(
    budget: CustomerBudget, index: int, secrets: Mapping[tuple[str, str], Secret]
) -> tuple[str | None, str | None]:
    """Resolve ``spec.apiKeys[index]``; returns ``(plaintext, None)`` or ``(None, problem)``."""
    ref = budget.spec.api_keys[index].secret_ref
    path = f"spec.apiKeys[{index}].secretRef"
    secret = secrets.get((budget.metadata.namespace, ref.name))
    if secret is None:
        where = f"{budget.metadata.namespace}/{ref.name}"
        return None, f"{path}: Secret {where} is not in the input"
    value = secret.data.get(ref.key)
    if value is None:
        return None, f"{path}: Secret {ref.name} has no key {ref.key!r}"
    if not value:
        return None, f"{path}: key {ref.key!r} of Secret {ref.name} is empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return None, (
            f"{path}: key {ref.key!r} of Secret {ref.name} contains whitespace or control"
            " characters (a trailing newline?)"
        )
    if len(value) < MIN_KEY_LENGTH:
        return None, (
            f"{path}: key {ref.key!r} of Secret {ref.name} is {len(value)} characters;"
            f" API keys need at least {MIN_KEY_LENGTH}"
        )
    return value, None


def resolve_api_keys(
    budget: CustomerBudget, secrets: Mapping[tuple[str, str], Secret]
) -> tuple[dict[str, str], list[str]]:
    """Plaintext keys by key name for the enabled ``spec.apiKeys``, and any problems."""
    keys: dict[str, str] = {}
    problems: list[str] = []
    for index, ref in enumerate(budget.spec.api_keys):
        if ref.disabled:
            continue  # a revoked key needs no material; its Secret may be gone
        value, problem = _resolve_key(budget, index, secrets)
        if problem:
            problems.append(problem)
        elif value is not None:
            keys[ref.name] = value
    return keys, problems


def load_resources(inputs: Iterable[tuple[str, str]]) -> Resources:
    """Validate ``(name, yaml text)`` inputs completely; raise ApplyError listing every problem.

    Input without a single CustomerBudget or PriceBook is an error too (as ``kubectl apply``
    of an empty file is): a wrong file or an empty pipe must not look like a success."""
    problems: list[str] = []
    documents: list[tuple[str, Any]] = []
    names: list[str] = []
    for name, text in inputs:
        names.append(name)
        try:
            documents += read_documents(name, text)
        except ApplyError as error:
            problems += error.problems

    parsed: list[tuple[str, CustomerBudget | PriceBook]] = []
    resources = Resources()
    seen: dict[tuple[str, str], str] = {}
    for where, document in documents:
        source = _label(where, document)
        kind = document.get("kind") if isinstance(document, dict) else None
        try:
            if kind == "Secret":
                if document.get("apiVersion") != "v1":
                    raise ManifestError(source, ["apiVersion: a Secret must be 'v1'"])
                secret = parse_secret(document, source)
                ident = ("Secret", f"{secret.namespace}/{secret.name}")
                resources.secrets[(secret.namespace, secret.name)] = secret
            elif kind in ("CustomerBudget", "PriceBook"):
                resource = parse_resource(document, source)
                ident = (resource.kind, resource.ref)
                parsed.append((source, resource))
            else:
                raise ManifestError(source, [f"kind: {kind!r} is not one of {_KINDS}"])
        except ManifestError as error:
            problems += [f"{error.source}: {problem}" for problem in error.problems]
            continue
        if ident in seen:
            problems.append(
                f"{source}: metadata.name: duplicate {ident[0]} {ident[1]}, also in {seen[ident]}"
            )
        seen[ident] = where

    owners: dict[str, str] = {}  # customerId -> budget ref
    key_users: dict[str, str] = {}  # key hash -> "source spec.apiKeys[i]"
    for source, resource in parsed:
        if isinstance(resource, PriceBook):
            resources.pricebooks.append((resource, source))
            continue
        customer = resource.spec.customer_id
        if owners.setdefault(customer, resource.ref) != resource.ref:
            problems.append(
                f"{source}: spec.customerId: {customer!r} is also used by CustomerBudget"
                f" {owners[customer]}; each customer needs exactly one budget"
            )
        keys, key_problems = resolve_api_keys(resource, resources.secrets)
        problems += [f"{source}: {problem}" for problem in key_problems]
        for index, ref in enumerate(resource.spec.api_keys):
            if ref.name not in keys:
                continue
            user = f"{resource.ref} spec.apiKeys[{index}]"
            first = key_users.setdefault(hash_api_key(keys[ref.name]), user)
            if first != user:
                problems.append(
                    f"{source}: spec.apiKeys[{index}].secretRef: the same key is already used"
                    f" by {first}; every key must be unique"
                )
        resources.budgets.append(PlannedBudget(resource, source, keys))
    problems += _tree_problems(resources, partial=True)
    if not problems and not parsed:
        problems.append(_nothing_to_apply(names, bool(resources.secrets)))
    if problems:
        raise ApplyError(problems)
    return resources


def _tree_problems(
    resources: Resources, fetched: Mapping[str, Level | None] | None = None, *, partial: bool
) -> list[str]:
    """The tree rules over the input's budgets (parents from the input, then ``fetched`` from
    Redis); orders ``resources.budgets`` parents first."""
    planned = {p.budget.ref: p for p in resources.budgets}
    known = {ref: level_of(p.budget) for ref, p in planned.items()}

    def find(ref: str) -> Level | None:
        return known.get(ref) or (fetched or {}).get(ref)

    problems = []
    for p in resources.budgets:
        placement = place(p.budget, find, partial=partial)
        problems += [f"{p.source}: {problem}" for problem in placement.problems]
    order = parents_first([p.budget for p in resources.budgets])
    resources.budgets = [planned[budget.ref] for budget in order]
    return problems


def _nothing_to_apply(names: list[str], secrets: bool) -> str:
    where = ", ".join(names) or "the input"
    if secrets:
        return (
            f"{where}: no CustomerBudget or PriceBook, only Secrets (they are read for the API"
            " keys of budgets in the same input, never stored): nothing to apply"
        )
    return f"{where}: no CustomerBudget or PriceBook (empty input?): nothing to apply"


def load_files(paths: Iterable[str]) -> Resources:
    inputs: list[tuple[str, str]] = []
    problems: list[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                inputs.append((path, handle.read()))
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{path}: cannot read: {error}")
    if problems:
        raise ApplyError(problems)
    return load_resources(inputs)


# --------------------------------------------------------------------------- applying


async def known_currencies(store: ConfigStore, resources: Resources) -> dict[str, str]:
    """``namespace/name`` -> currency of every PriceBook in Redis or in the input (which wins)."""
    known: dict[str, str] = {}
    for ref in await store.list_pricebooks():
        try:
            spec = await store.get_pricebook(ref)
        except ValueError:  # stored by an older version: the operator reports it
            continue
        if spec is not None:
            known[ref] = spec.currency
    known.update({pricebook.ref: pricebook.spec.currency for pricebook, _ in resources.pricebooks})
    return known


async def check_conflicts(store: ConfigStore, resources: Resources) -> list[str]:
    """Problems with what Redis already holds (claimed customer ids, keys of other customers,
    PriceBooks in another currency)."""
    problems: list[str] = []
    currencies = await known_currencies(store, resources) if resources.budgets else {}
    known = {p.budget.ref: level_of(p.budget) for p in resources.budgets}
    fetched = await gather_levels([p.budget for p in resources.budgets], known, store.applied_level)
    problems += _tree_problems(resources, fetched, partial=False)
    for planned in resources.budgets:
        budget = planned.budget
        problems += [
            f"{planned.source}: {problem}" for problem in currency_problems(budget, currencies)
        ]
        placement = place(budget, lambda ref: known.get(ref) or fetched.get(ref))
        if not placement.problems:  # a budget applied elsewhere moves with its subtree
            moved = await store.move_problem(budget.spec.customer_id, placement.ancestors)
            problems += [f"{planned.source}: {moved}"] if moved else []
        owner = await store.owner_of(budget.spec.customer_id)
        if owner is not None and owner != budget.ref:
            problems.append(
                f"{planned.source}: spec.customerId: {budget.spec.customer_id!r} is already"
                f" claimed by CustomerBudget {owner}"
            )
        for index, ref in enumerate(budget.spec.api_keys):
            plaintext = planned.api_keys.get(ref.name)
            holder = await store.lookup_key(hash_api_key(plaintext)) if plaintext else None
            if holder is not None and holder.customer_id != budget.spec.customer_id:
                problems.append(
                    f"{planned.source}: spec.apiKeys[{index}].secretRef: this key already"
                    f" belongs to customer {holder.customer_id!r}"
                )
    return problems


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _budget_summary(budget: CustomerBudget, balance_change: int, removed: int) -> str:
    spec = budget.spec
    parts = []
    if balance_change:
        sign = "+" if balance_change > 0 else ""
        parts.append(f"{sign}{format_amount(balance_change)} opening balance")
    elif spec.balance is not None:
        parts.append("opening balance unchanged")
    if spec.mode is Mode.capped and spec.limit is not None and spec.period is not None:
        parts.append(f"limit {format_amount(spec.limit)} {spec.currency} per {spec.period}")
    parts.append(_plural(sum(not key.disabled for key in spec.api_keys), "key"))
    if removed:
        parts.append(f"{_plural(removed, 'key')} revoked")
    return f"customerbudget {budget.ref} configured ({', '.join(parts)})"


async def apply_resources(
    store: ConfigStore, resources: Resources, *, dry_run: bool = False
) -> list[str]:
    """Check against Redis, then apply PriceBooks and budgets; one result line per resource."""
    problems = await check_conflicts(store, resources)
    if problems:
        raise ApplyError(problems)
    if dry_run:
        return dry_run_results(resources)
    results = []
    for pricebook, _source in resources.pricebooks:
        await store.apply_pricebook(pricebook)
        rules = _plural(len(pricebook.spec.rules), "rule")
        results.append(f"pricebook {pricebook.ref} configured ({rules})")
    for planned in resources.budgets:
        try:
            applied = await store.apply_budget(planned.budget, planned.api_keys)
        except ConfigConflict as error:  # Redis changed since check_conflicts
            raise ApplyError([f"{planned.source}: {error}"], applied=results) from None
        results.append(
            _budget_summary(planned.budget, applied.balance_change, applied.keys_removed)
        )
    return results


def dry_run_results(resources: Resources) -> list[str]:
    lines = [f"pricebook {pb.ref} valid (dry run)" for pb, _ in resources.pricebooks]
    lines += [f"customerbudget {p.budget.ref} valid (dry run)" for p in resources.budgets]
    return lines


__all__ = [
    "MIN_KEY_LENGTH",
    "ApplyError",
    "PlannedBudget",
    "Resources",
    "Secret",
    "apply_resources",
    "check_conflicts",
    "dry_run_results",
    "load_files",
    "load_resources",
    "parse_secret",
    "read_documents",
    "resolve_api_keys",
]
