"""Telling people about a budget from outside kopf's handlers (the leader's periodic work):
a Kubernetes Event on the CustomerBudget, the alert webhook, and a refresh of its status.

    notify = BudgetNotifier(kube, alerts, instance="operator-0")
    await notify.tell(target, "CostAbsorbed", message, alert_fields={...})

A :class:`BudgetTarget` names the budget (``namespace/name`` and, when known, its uid: ``kubectl
describe`` matches Events by uid). Posting is best effort: a failure is logged and returned as
False, never raised, so one budget's trouble never stops a pass over the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..alerts.sender import Alert
from ..kube.client import BUDGETS, GROUP, REFRESH_ANNOTATION, VERSION

log = logging.getLogger("spendgate.operator.notify")


class EventApi(Protocol):
    """What the notifier needs of the API (:class:`~spendgate.operator.kube.client.KubeClient`)."""

    async def create_event(
        self,
        involved: Mapping[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        action: str,
        component: str = ...,
        instance: str = ...,
    ) -> None: ...

    async def annotate(
        self, plural: str, namespace: str, name: str, annotations: Mapping[str, str | None]
    ) -> dict[str, Any] | None: ...


class AlertApi(Protocol):
    def dispatch(self, alert: Alert) -> Any: ...


@dataclass(frozen=True)
class BudgetTarget:
    """The CustomerBudget a finding is about."""

    customer_id: str
    ref: str  # namespace/name
    uid: str | None = None
    currency: str | None = None

    @property
    def involved(self) -> dict[str, Any]:
        namespace, _, name = self.ref.partition("/")
        involved = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CustomerBudget",
            "namespace": namespace,
            "name": name,
        }
        if self.uid:
            involved["uid"] = self.uid
        return involved


def targets_from_bodies(bodies: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``namespace/name`` → body of each listed CustomerBudget."""
    found = {}
    for body in bodies:
        meta = body.get("metadata") or {}
        found[f"{meta.get('namespace') or 'default'}/{meta.get('name')}"] = body
    return found


class BudgetNotifier:
    def __init__(
        self,
        kube: EventApi,
        alerts: AlertApi | None,
        *,
        instance: str = "",
        action: str = "WatchSpend",  # the Events' action: what the leader was doing
    ) -> None:
        self.kube = kube
        self.alerts = alerts
        self.instance = instance
        self.action = action

    async def tell(
        self,
        target: BudgetTarget,
        reason: str,
        message: str,
        *,
        type: Literal["Normal", "Warning"] = "Warning",
        alert_fields: Mapping[str, Any] | None = None,
        refresh: bool = False,
    ) -> bool:
        """An Event (reason, message) on the budget, an alert of kind ``reason`` (unless
        ``alert_fields`` is None) and, with ``refresh``, an annotation so kopf recomputes the
        status now. True when the Event was posted."""
        if self.alerts is not None and alert_fields is not None:
            self.alerts.dispatch(
                Alert(
                    kind=reason,
                    budget=target.ref,
                    customer_id=target.customer_id,
                    message=f"CustomerBudget {target.ref} (customer {target.customer_id}):"
                    f" {message}",
                    severity="warning" if type == "Warning" else "info",
                    fields=dict(alert_fields),
                )
            )
        namespace, _, name = target.ref.partition("/")
        try:
            if refresh:
                cause = f"{reason}@{target.customer_id}"
                await self.kube.annotate(BUDGETS, namespace, name, {REFRESH_ANNOTATION: cause})
            await self.kube.create_event(
                target.involved,
                type=type,
                reason=reason,
                message=message,
                action=self.action,
                instance=self.instance,
            )
        except Exception as error:
            log.warning(
                "could not post an Event on the budget",
                extra={"budget": target.ref, "reason": reason, "error": repr(error)},
            )
            return False
        return True


__all__ = ["BudgetNotifier", "BudgetTarget", "targets_from_bodies"]
