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
carries ``spec.stripe.customerId``, the label ``spendgate.dev/source: stripe`` and the
annotation ``spendgate.dev/stripe-customer``, and must validate as a CustomerBudget.
"""

from __future__ import annotations

import copy
import hashlib
import re
from typing import Any

from spendgate.models import CUSTOMER_ID_PATTERN, ManifestError, parse_resource

from .client import StripeGateway, list_all
from .settings import StripeSettings

PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
SOURCE_LABEL = "spendgate.dev/source"
CUSTOMER_ANNOTATION = "spendgate.dev/stripe-customer"
MAX_PAGES = 100


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


def budget_from_customer(
    template: dict[str, Any], customer: dict[str, Any], settings: StripeSettings | None = None
) -> dict[str, Any]:
    """The CustomerBudget manifest for one Stripe customer (pure; raises TemplateError)."""
    stripe_id = str(customer.get("id") or "")
    if not stripe_id.startswith("cus_"):
        raise TemplateError(f"not a Stripe customer: {stripe_id!r}")
    manifest = _fill(copy.deepcopy(template), _values(customer, settings), "template")
    manifest.setdefault("apiVersion", "spendgate.dev/v1alpha1")
    manifest.setdefault("kind", "CustomerBudget")
    metadata = manifest.setdefault("metadata", {})
    metadata.setdefault("name", kubernetes_name(stripe_id))
    metadata.setdefault("labels", {})[SOURCE_LABEL] = "stripe"
    metadata.setdefault("annotations", {})[CUSTOMER_ANNOTATION] = stripe_id
    spec = manifest.setdefault("spec", {})
    spec.setdefault("customerId", stripe_id)
    if not re.match(CUSTOMER_ID_PATTERN, str(spec["customerId"])):
        raise TemplateError(f"spec.customerId {spec['customerId']!r} is not a valid customer id")
    stripe_link = spec.setdefault("stripe", {})
    stripe_link["customerId"] = stripe_id
    try:
        parse_resource(manifest, f"budget for {stripe_id}")
    except ManifestError as error:
        raise TemplateError(str(error)) from None
    return manifest


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
) -> list[dict[str, Any]]:
    """Manifests for marked Stripe customers not yet linked to a budget (paginated list).

    ``linked``: Stripe customer ids that already have a budget. A customer the template cannot
    serve is skipped and described in ``errors`` (for an Event), never half-created."""
    manifests: list[dict[str, Any]] = []
    customers = list_all(
        gateway,
        gateway.client.v1.customers.list_async,
        {"limit": 100},
        "list customers",
        max_pages=MAX_PAGES,
    )
    async for customer in customers:
        if customer.get("id") in linked or not is_marked(customer, settings):
            continue
        try:
            manifest = budget_from_customer(template, customer, settings)
        except TemplateError as error:
            if errors is not None:
                errors.append(str(error))
            continue
        if namespace:
            manifest["metadata"].setdefault("namespace", namespace)
        manifests.append(manifest)
    return manifests
