"""Budgets synced from Stripe: customers marked in Stripe get a CustomerBudget from a template.

Entry points for the operator (leader; it creates the returned manifests through the
Kubernetes API -- create only, never update or delete, so kubectl-applied and imported budgets
coexist and a budget is never silently removed)::

    manifests = await customers_to_import(gateway, settings, template, namespace="billing",
                                          linked=set((await linked_customers(redis)).values()))
    manifest = budget_from_customer(template, customer_dict)        # pure

A customer is marked by ``metadata[settings.import_metadata_key] ==
settings.import_metadata_value`` (default ``spendgate: "true"``). The template is a
CustomerBudget manifest (a dict, e.g. from a ConfigMap) whose strings may hold placeholders:

- ``${customer.id}``, ``${customer.email}``, ``${customer.name}``: the Stripe customer;
- ``${metadata.KEY}``: the customer's metadata value KEY;
- ``${customerId}``: metadata ``spendgate_customer_id`` if set, else the Stripe id;
- ``${name}``: a Kubernetes name derived from the Stripe id (``stripe-cus-...``).

A placeholder that does not resolve is an error (never an empty string). The result always
carries ``spec.stripe.customerId``, the label ``spendgate.dev/imported-from: stripe`` and the
annotation ``spendgate.dev/stripe-customer``, and must validate as a CustomerBudget.

:func:`load_template` parses the template (one YAML document) and :func:`validate_template`
renders it for a sample customer, so that a broken template is an error when the operator
starts rather than a failed import per customer later; :class:`TemplateFile` (from
:func:`load_import_template`, at start-up) re-reads and re-validates the file when it changes.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from spendgate.models import API_VERSION, CUSTOMER_ID_PATTERN, ManifestError, parse_resource

from .client import StripeGateway, list_all
from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe.import")

PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
SOURCE_LABEL = "spendgate.dev/imported-from"
CUSTOMER_ANNOTATION = "spendgate.dev/stripe-customer"
MAX_PAGES = 100
KNOWN_PLACEHOLDERS = (
    "customer.id",
    "customer.email",
    "customer.name",
    "customer.description",
    "customerId",
    "name",
)
SAMPLE_CUSTOMER = "cus_SpendgateTemplateCheck"
SAMPLE_METADATA_VALUE = "1"  # what ${metadata.KEY} becomes in the start-up check


class TemplateError(ValueError):
    """The template cannot produce a budget for this customer."""


def kubernetes_name(stripe_customer: str) -> str:
    """A DNS-1123 name for a Stripe id; the hash keeps ids differing only in case apart."""
    digest = hashlib.sha256(stripe_customer.encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]+", "-", stripe_customer.lower()).strip("-")
    return f"stripe-{base}"[:50].rstrip("-") + f"-{digest}"


def _values(customer: dict[str, Any], settings: StripeSettings | None) -> dict[str, str]:
    metadata = customer.get("metadata") or {}
    cid_key = settings.customer_metadata_key if settings else "spendgate_customer_id"
    stripe_id = str(customer.get("id") or "")
    values = {
        "customer.id": stripe_id,
        "customerId": str(metadata.get(cid_key) or stripe_id),
        "name": kubernetes_name(stripe_id),
    }
    for key in ("email", "name", "description"):
        if customer.get(key):
            values[f"customer.{key}"] = str(customer[key])
    for key, value in metadata.items():
        values[f"metadata.{key}"] = str(value)
    return values


def _fill(node: Any, values: dict[str, str], path: str) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise TemplateError(f"{path}: placeholder ${{{name}}} has no value")
            return values[name]

        return PLACEHOLDER.sub(sub, node)
    return node


def _build(
    template: dict[str, Any], customer: dict[str, Any], settings: StripeSettings | None
) -> dict[str, Any]:
    """The manifest with placeholders filled and the fixed parts set (not validated yet)."""
    stripe_id = str(customer.get("id") or "")
    if not stripe_id.startswith("cus_"):
        raise TemplateError(f"not a Stripe customer: {stripe_id!r}")
    manifest = _fill(copy.deepcopy(template), _values(customer, settings), "template")
    manifest.setdefault("apiVersion", API_VERSION)
    manifest.setdefault("kind", "CustomerBudget")
    metadata = manifest.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise TemplateError("template.metadata: expected a mapping")
    metadata.setdefault("name", kubernetes_name(stripe_id))
    metadata.setdefault("labels", {})[SOURCE_LABEL] = "stripe"
    metadata.setdefault("annotations", {})[CUSTOMER_ANNOTATION] = stripe_id
    spec = manifest.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise TemplateError("template.spec: expected a mapping")
    spec.setdefault("customerId", stripe_id)
    if not re.match(CUSTOMER_ID_PATTERN, str(spec["customerId"])):
        raise TemplateError(f"spec.customerId {spec['customerId']!r} is not a valid customer id")
    stripe_link = spec.setdefault("stripe", {})
    if not isinstance(stripe_link, dict):
        raise TemplateError("template.spec.stripe: expected a mapping")
    stripe_link["customerId"] = stripe_id
    return manifest


def budget_from_customer(
    template: dict[str, Any], customer: dict[str, Any], settings: StripeSettings | None = None
) -> dict[str, Any]:
    """The CustomerBudget manifest for one Stripe customer (pure; raises TemplateError)."""
    manifest = _build(template, customer, settings)
    try:
        parse_resource(manifest, f"budget for {customer.get('id')}")
    except ManifestError as error:
        raise TemplateError(str(error)) from None
    return manifest


# --------------------------------------------------------------------------- the template


def load_template(text: str, source: str = "template") -> dict[str, Any]:
    """The template from YAML text: exactly one document, a mapping (raises TemplateError)."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise TemplateError(f"{source}: not valid YAML: {error}") from None
    if len(documents) != 1:
        raise TemplateError(
            f"{source}: expected one YAML document (a CustomerBudget), found {len(documents)}"
        )
    [template] = documents
    if not isinstance(template, dict):
        raise TemplateError(f"{source}: expected a mapping, got {type(template).__name__}")
    return template


def placeholders(node: Any) -> set[str]:
    """Every placeholder name in the template's strings."""
    if isinstance(node, dict):
        return set().union(*(placeholders(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node))
    if isinstance(node, str):
        return set(PLACEHOLDER.findall(node))
    return set()


def _metadata_paths(node: Any, path: str = "") -> list[str]:
    """Paths (``spec.balance``, ``spec.apiKeys[0].name``) whose value uses customer metadata."""
    if isinstance(node, dict):
        return [
            p for k, v in node.items() for p in _metadata_paths(v, f"{path}.{k}" if path else k)
        ]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _metadata_paths(v, f"{path}[{i}]")]
    if isinstance(node, str) and any(n.startswith("metadata.") for n in PLACEHOLDER.findall(node)):
        return [path]
    return []


def sample_customer(template: dict[str, Any], settings: StripeSettings | None) -> dict[str, Any]:
    """A marked customer with every field the template may name (metadata values "1")."""
    metadata = {
        name.removeprefix("metadata."): SAMPLE_METADATA_VALUE
        for name in placeholders(template)
        if name.startswith("metadata.")
    }
    if settings is not None:
        metadata[settings.import_metadata_key] = settings.import_metadata_value
    return {
        "id": SAMPLE_CUSTOMER,
        "object": "customer",
        "email": "sample@example.com",
        "name": "Sample Customer",
        "description": "sample",
        "metadata": metadata,
    }


def validate_template(
    template: dict[str, Any],
    settings: StripeSettings | None = None,
    *,
    namespace: str | None = None,
) -> dict[str, Any]:
    """Render ``template`` for :func:`sample_customer` and validate it with the models; the
    manifest, or TemplateError naming every problem. A field whose value comes from customer
    metadata (``${metadata.KEY}``) can only be judged per customer: problems there are left to
    the import (which skips, logs and counts such a customer). ``namespace``: where imported
    budgets go; the template's ``metadata.namespace``, if any, must be the same."""
    unknown = sorted(
        n
        for n in placeholders(template)
        if n not in KNOWN_PLACEHOLDERS and not n.startswith("metadata.")
    )
    if unknown:
        raise TemplateError(
            "unknown placeholder(s) "
            + ", ".join(f"${{{n}}}" for n in unknown)
            + "; known: "
            + ", ".join(f"${{{n}}}" for n in (*KNOWN_PLACEHOLDERS, "metadata.KEY"))
        )
    if template.get("kind", "CustomerBudget") != "CustomerBudget":
        raise TemplateError(f"kind: {template.get('kind')!r} must be CustomerBudget")
    meta = template.get("metadata")
    own = meta.get("namespace") if isinstance(meta, dict) else None
    if namespace is not None and own is not None and own != namespace:
        raise TemplateError(
            f"metadata.namespace {own!r} differs from the import namespace {namespace!r}"
            " (leave it out of the template)"
        )
    manifest = _build(template, sample_customer(template, settings), settings)
    if namespace is not None:
        manifest["metadata"].setdefault("namespace", namespace)
    try:
        parse_resource(manifest, "template")
    except ManifestError as error:
        dependent = _metadata_paths(template)
        problems = [p for p in error.problems if not _under(p.split(": ", 1)[0], dependent)]
        if problems:
            raise TemplateError("; ".join(problems)) from None
    return manifest


def _under(location: str, paths: list[str]) -> bool:
    return any(location == p or location.startswith((f"{p}.", f"{p}[")) for p in paths)


class TemplateFile:
    """The import template, validated; re-read when the file's content changes."""

    def __init__(self, settings: StripeSettings) -> None:
        if not settings.import_template_file or not settings.import_namespace:
            raise TemplateError("the import needs import_template_file and import_namespace")
        self.settings = settings
        self.path = Path(settings.import_template_file)
        self.namespace = settings.import_namespace
        self._text: str | None = None
        self._template: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        """The template (raises TemplateError naming the file and what is wrong)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise TemplateError(f"{self.path}: cannot read the import template: {reason}") from None
        if self._template is not None and text == self._text:
            return self._template
        try:
            template = load_template(text, str(self.path))
            validate_template(template, self.settings, namespace=self.namespace)
        except TemplateError as error:
            message = str(error).removeprefix(f"{self.path}: ")
            raise TemplateError(f"{self.path}: invalid import template: {message}") from None
        if self._text is not None:
            log.info("the Stripe import template changed", extra={"file": str(self.path)})
        self._text, self._template = text, template
        return template


def load_import_template(settings: StripeSettings, watched: Sequence[str] = ()) -> TemplateFile:
    """At start-up: the template file, loaded and validated by rendering it for a sample
    customer (raises TemplateError). ``watched``: the operator's namespaces (empty: all); the
    import namespace must be one of them, or its budgets would never be reconciled."""
    template = TemplateFile(settings)
    if watched and template.namespace not in watched:
        raise TemplateError(
            f"import_namespace {template.namespace!r} is not a watched namespace"
            f" ({', '.join(watched)}): its budgets would never be reconciled"
        )
    template.load()
    return template


# --------------------------------------------------------------------------- customers


def is_marked(customer: dict[str, Any], settings: StripeSettings) -> bool:
    metadata = customer.get("metadata") or {}
    return (
        not customer.get("deleted")
        and str(metadata.get(settings.import_metadata_key, "")) == settings.import_metadata_value
    )


async def customers_to_import(
    gateway: StripeGateway,
    settings: StripeSettings,
    template: dict[str, Any],
    *,
    linked: set[str] | frozenset[str] = frozenset(),
    namespace: str | None = None,
    errors: list[str] | None = None,
    skipped: list[str] | None = None,
    on_truncated: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Manifests for marked Stripe customers not yet linked to a budget (paginated list).

    ``linked``: Stripe customer ids that already have a budget; the marked ones among them are
    appended to ``skipped``. A customer the template cannot serve is skipped and described in
    ``errors`` (for logs and metrics), never half-created. ``on_truncated()``: more than
    ``MAX_PAGES`` pages of customers, the rest was not looked at."""
    manifests: list[dict[str, Any]] = []
    customers = list_all(
        gateway,
        gateway.client.v1.customers.list_async,
        {"limit": 100},
        "list customers",
        max_pages=MAX_PAGES,
        on_truncated=on_truncated,
    )
    async for customer in customers:
        if not is_marked(customer, settings):
            continue
        if customer.get("id") in linked:
            if skipped is not None:
                skipped.append(str(customer.get("id")))
            continue
        try:
            manifest = budget_from_customer(template, customer, settings)
        except TemplateError as error:
            if errors is not None:
                errors.append(f"{customer.get('id')}: {error}")
            continue
        if namespace:
            manifest["metadata"].setdefault("namespace", namespace)
        manifests.append(manifest)
    return manifests
