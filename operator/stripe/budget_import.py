"""Budgets synced from Stripe: the leader's periodic import (``import_enabled``).

Every ``import_interval_s`` the leader (a task of :meth:`StripeService.run_leader
<spendgate.operator.stripe.wiring.StripeService.run_leader>`):

1. reads the template file (``import_template_file``, a mounted ConfigMap: re-read when its
   content changes; a template that became invalid is logged and nothing is imported until it
   is fixed);
2. collects the Stripe customers that **already have a budget**: linked in Redis
   (``sg:stripe:customers``, every reconciled budget with ``spec.stripe``), or named by any
   CustomerBudget the API lists in the watched namespaces (``spec.stripe.customerId`` or the
   import annotation) -- so a kubectl-applied budget wins even before it is reconciled, and a
   budget whose ``spec.stripe`` someone removed is not imported again;
3. lists the Stripe customers (paginated, ``sync.customers_to_import``) and renders a
   CustomerBudget for each marked one without a budget;
4. **creates** each through the API in ``import_namespace`` (label
   ``spendgate.dev/imported-from: stripe``, annotation ``spendgate.dev/stripe-customer``) and
   posts a ``StripeImported`` Event on it. HTTP 409 (it exists: another leader, or a stale
   list) counts as skipped -- creating is idempotent. A name already used by a budget that does
   not name this customer is never overwritten: that customer fails, with a warning.

Imported budgets are then reconciled by kopf like any other. The import never updates or
deletes a budget: editing one is the cluster admin's (kubectl) business, and a customer deleted
in Stripe is **suspended** (source ``stripe-deleted``, by the ``customer.deleted`` event or the
next reconciliation) -- its budget and ledger stay.

Outcomes are logged and counted in ``spendgate_stripe_imports_total{outcome}`` (created,
skipped, failed); ``spendgate_stripe_import_last_success_timestamp`` is the end of the last
complete pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spendgate.loops import run_every

from ..kube.client import GROUP, VERSION, KubeClient
from ..kube.retry import KubernetesUnavailable
from . import metrics
from .client import StripeGateway
from .links import linked_customers
from .settings import StripeSettings
from .sync import (
    CUSTOMER_ANNOTATION,
    MAX_PAGES,
    TemplateError,
    TemplateFile,
    customers_to_import,
    load_import_template,
)

log = logging.getLogger("spendgate.operator.stripe.import")

IMPORTED_REASON = "StripeImported"


@dataclass
class ImportResult:
    created: list[str] = field(default_factory=list)  # namespace/name
    skipped: list[str] = field(default_factory=list)  # Stripe customer ids
    failed: list[str] = field(default_factory=list)  # what went wrong, per customer

    def counts(self) -> dict[str, int]:
        return {
            "created": len(self.created),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
        }


class BudgetImport:
    """The leader's import of marked Stripe customers as CustomerBudgets."""

    def __init__(
        self,
        settings: StripeSettings,
        *,
        kube: KubeClient,
        redis: Any,
        template: TemplateFile,
        watched: Sequence[str] = (),
        instance: str = "",
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.redis = redis
        self.template = template
        self.namespace = template.namespace
        self.watched = tuple(watched)
        self.instance = instance

    async def run(self, stop: asyncio.Event, gateway: StripeGateway) -> None:
        await run_every(
            stop,
            self.settings.import_interval_s,
            lambda: self.import_once(gateway),
            log=log,
            failed="importing budgets from Stripe failed; retrying at the next interval",
            traceback=False,
        )

    async def claimed(self) -> tuple[set[str], set[tuple[str, str]]]:
        """Stripe customers that have a budget already, and the budget names in use."""
        stripe_ids = set((await linked_customers(self.redis)).values())
        names: set[tuple[str, str]] = set()
        for namespace in self.watched or (None,):
            for budget in await self.kube.list_customer_budgets(namespace):
                meta = budget.get("metadata") or {}
                names.add((str(meta.get("namespace")), str(meta.get("name"))))
                link = (budget.get("spec") or {}).get("stripe")
                if isinstance(link, dict) and link.get("customerId"):
                    stripe_ids.add(str(link["customerId"]))
                imported = (meta.get("annotations") or {}).get(CUSTOMER_ANNOTATION)
                if imported:
                    stripe_ids.add(str(imported))
        return stripe_ids, names

    async def import_once(self, gateway: StripeGateway) -> ImportResult:
        """One pass; raises only when Redis, the API or Stripe could not be read at all."""
        result = ImportResult()
        try:
            template = self.template.load()
        except TemplateError as error:
            log.error("no budgets are imported from Stripe: %s", error)
            return result
        stripe_ids, names = await self.claimed()
        errors: list[str] = []

        def truncated() -> None:
            log.warning(
                "more Stripe customers than one import pass lists; the rest were not looked at",
                extra={"max_customers": MAX_PAGES * 100},
            )

        manifests = await customers_to_import(
            gateway,
            self.settings,
            template,
            linked=stripe_ids,
            namespace=self.namespace,
            errors=errors,
            skipped=result.skipped,
            on_truncated=truncated,
        )
        for error in errors:
            log.warning("a marked Stripe customer does not fit the import template: %s", error)
            result.failed.append(error)
        for manifest in manifests:
            await self._create(manifest, names, result)
        for outcome, count in result.counts().items():
            if count:
                metrics.STRIPE_IMPORTS.labels(outcome).inc(count)
        metrics.STRIPE_IMPORT_LAST_SUCCESS.set(time.time())
        if result.created or result.failed:
            log.info("imported budgets from Stripe", extra=result.counts())
        return result

    async def _create(
        self, manifest: dict[str, Any], names: set[tuple[str, str]], result: ImportResult
    ) -> None:
        name = str(manifest["metadata"]["name"])
        stripe_customer = str(manifest["spec"]["stripe"]["customerId"])
        where = f"{self.namespace}/{name}"
        if (self.namespace, name) in names:
            message = (
                f"{stripe_customer}: the budget name {where} is taken by a budget that does not"
                " name this Stripe customer"
            )
            log.warning("a marked Stripe customer cannot be imported: %s", message)
            result.failed.append(message)
            return
        try:
            created = await self.kube.create_customer_budget(self.namespace, manifest)
        except KubernetesUnavailable as error:
            message = f"{stripe_customer}: creating {where} failed: {error}"
            log.warning("a marked Stripe customer cannot be imported: %s", message)
            result.failed.append(message)
            return
        names.add((self.namespace, name))
        if created is None:
            log.info(
                "the budget of a marked Stripe customer exists already",
                extra={"budget": where, "stripe_customer": stripe_customer},
            )
            result.skipped.append(stripe_customer)
            return
        log.info(
            "created a CustomerBudget for a marked Stripe customer",
            extra={"budget": where, "stripe_customer": stripe_customer},
        )
        result.created.append(where)
        await self._announce(created, stripe_customer)

    async def _announce(self, created: dict[str, Any], stripe_customer: str) -> None:
        meta = created.get("metadata") or {}
        involved = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CustomerBudget",
            "namespace": meta.get("namespace") or self.namespace,
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        }
        key, value = self.settings.import_metadata_key, self.settings.import_metadata_value
        try:
            await self.kube.create_event(
                involved,
                type="Normal",
                reason=IMPORTED_REASON,
                message=f"created for Stripe customer {stripe_customer} (metadata {key}={value})",
                action="StripeImport",
                instance=self.instance,
            )
        except KubernetesUnavailable as error:
            log.warning("could not post the import Event", extra={"error": repr(error)})


__all__ = [
    "IMPORTED_REASON",
    "BudgetImport",
    "ImportResult",
    "TemplateFile",
    "load_import_template",
]
