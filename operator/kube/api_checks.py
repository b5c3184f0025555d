"""Whether this replica can reconcile, as ``/readyz`` reports it: the CRDs it needs are
installed at its schema generation or later, and its RBAC lets it list what it reconciles.

- **CRDs.** Helm never upgrades ``crds/``; an operator newer than its CRDs would meet the API
  server's 422s (or have fields pruned) on every status patch. Each CRD carries
  ``spendgate.dev/schema-generation`` (:data:`spendgate.crd.SCHEMA_GENERATION`); an older or
  missing one is a readiness problem naming the CRD and the command that fixes it. A newer one
  is fine: during an upgrade the new CRDs are applied first, and the old replicas stay ready.
- **Access.** CustomerBudgets, PriceBooks and Secrets listed (one item) in each watched
  namespace, or cluster-wide: a forbidden list is a problem with the server's message.

Checked at start and again every ``retry_s`` while something is wrong (every ``recheck_s``
once all is well), so a fixed CRD or Role makes the replica ready without a restart. Each
change is logged once (error, then "resolved"); ``spendgate_api_check_problems`` counts the
problems of the last check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Gauge

from spendgate import crd

from .client import GROUP, VERSION, KubeClient
from .retry import KubernetesUnavailable

log = logging.getLogger("spendgate.operator.kube")

API_CHECK_PROBLEMS = Gauge(
    "spendgate_api_check_problems",
    "What keeps this replica from reconciling (outdated or missing CRDs, forbidden lists)",
)
FIX_CRDS = "kubectl apply --server-side -f crds/ (the chart's crds/ of this version)"


def crd_problem(name: str, body: Mapping[str, Any] | None) -> str | None:
    if body is None:
        return f"the CRD {name} is not installed: {FIX_CRDS}"
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(crd.SCHEMA_ANNOTATION)
    try:
        generation = int(raw) if raw is not None else 0
    except ValueError:
        generation = 0
    if generation < crd.SCHEMA_GENERATION:
        shown = raw if raw is not None else "none"
        return (
            f"the installed CRD {name} is schema generation {shown}, this operator needs"
            f" {crd.SCHEMA_GENERATION}: {FIX_CRDS}"
        )
    return None


class ApiChecks:
    """The checks, run by :meth:`run` beside kopf; :meth:`readiness` for ``/readyz``."""

    def __init__(
        self,
        kube: KubeClient,
        namespaces: Sequence[str],
        *,
        retry_s: float = 5.0,
        recheck_s: float = 60.0,
    ) -> None:
        self.kube = kube
        self.namespaces = tuple(namespaces)
        self.retry_s = retry_s
        self.recheck_s = recheck_s
        self.problems: list[str] | None = None  # None: not checked yet

    async def check(self) -> list[str]:
        problems = []
        for resource in crd.RESOURCES:
            try:
                problem = crd_problem(resource.name, await self.kube.get_crd(resource.name))
            except KubernetesUnavailable as error:
                problem = f"cannot read the CRD {resource.name}: {error.message}"
            if problem is not None:
                problems.append(problem)
        for namespace in self.namespaces or (None,):
            where = f"/namespaces/{namespace}" if namespace else ""
            for what, path in (
                ("CustomerBudgets", f"/apis/{GROUP}/{VERSION}{where}/customerbudgets"),
                ("PriceBooks", f"/apis/{GROUP}/{VERSION}{where}/pricebooks"),
                ("Secrets", f"/api/v1{where}/secrets"),
            ):
                scope = f"in {namespace}" if namespace else "cluster-wide"
                try:
                    if not await self.kube.can_list(path):
                        problems.append(f"{what} are not served {scope}")
                except KubernetesUnavailable as error:
                    problems.append(f"cannot list {what} {scope}: {error.message}")
        return problems

    async def run(self, stop: asyncio.Event) -> None:
        await self.kube.wait_configured()
        while not stop.is_set():
            problems = await self.check()
            if problems != self.problems:
                for problem in problems:
                    if problem not in (self.problems or []):
                        log.error("this replica cannot reconcile", extra={"problem": problem})
                if not problems and self.problems:
                    log.info("the API checks pass again: the replica can reconcile")
            self.problems = problems
            API_CHECK_PROBLEMS.set(len(problems))
            delay = self.retry_s if problems else self.recheck_s
            # No task per wait (asyncio.wait_for would make one): kopf, at its exit, cancels the
            # tasks created after it started, and this loop must outlive kopf on a standby.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    def readiness(self) -> str | None:
        if self.problems is None:
            return "the API checks (CRDs, RBAC) have not run yet"
        return "; ".join(self.problems) or None


__all__ = ["API_CHECK_PROBLEMS", "ApiChecks", "crd_problem"]
