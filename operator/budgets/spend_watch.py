"""The leader's spend watch, every ``interval_s`` (``SPENDGATE_SPEND_WATCH_INTERVAL``, 60 s):

- for every customer configured in Redis: absorbed cost, reported once per entry
  (:mod:`.absorbed`);
- for every budget with ``spec.policy.abnormalSpend``: the spend rollup and the abnormal-spend
  check, acting on a trip (:mod:`.abnormal`).

The budgets are listed from the API once per pass (their policies and uids); a customer's
policy is the one of the budget that owns it in Redis. When the API cannot be listed, the pass
still reports absorbed cost (Events without uid) and checks no policy.

    watch = SpendWatch(redis, kube, alerts, namespaces=(), interval_s=60)
    await watch.run(stop)        # the leader's task
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from spendgate.config_store import ConfigStore
from spendgate.ledger import Ledger
from spendgate.loops import run_every

from .abnormal import Outcome, forget, has_rollup, policy_of, watch_abnormal
from .absorbed import Finding, report_absorbed
from .notify import AlertApi, BudgetNotifier, BudgetTarget, EventApi, targets_from_bodies

log = logging.getLogger("spendgate.operator.spend_watch")


class BudgetLister(EventApi, Protocol):
    async def list_customer_budgets(self, namespace: str | None) -> list[dict[str, Any]]: ...


@dataclass
class PassResult:
    absorbed: dict[str, list[Finding]] = field(default_factory=dict)
    abnormal: dict[str, Outcome] = field(default_factory=dict)
    listed: bool = True  # the budgets could be listed from the API


def _wall_ms() -> int:
    return int(time.time() * 1000)


class SpendWatch:
    def __init__(
        self,
        redis: Any,
        kube: BudgetLister,
        alerts: AlertApi | None,
        *,
        namespaces: Sequence[str] = (),
        interval_s: float = 60.0,
        instance: str = "",
        clock: Callable[[], int] = _wall_ms,
    ) -> None:
        self.redis = redis
        self.kube = kube
        self.namespaces = tuple(namespaces)
        self.interval_s = interval_s
        self.clock = clock
        self.notifier = BudgetNotifier(kube, alerts, instance=instance)

    async def _budgets(self) -> dict[str, Mapping[str, Any]] | None:
        try:
            bodies: list[dict[str, Any]] = []
            for namespace in self.namespaces or (None,):
                bodies += await self.kube.list_customer_budgets(namespace)
        except Exception as error:
            log.warning(
                "spend watch: could not list the budgets; no abnormal-spend check this pass",
                extra={"error": repr(error)},
            )
            return None
        return targets_from_bodies(bodies)

    async def pass_once(self) -> PassResult:
        now_ms = self.clock()
        budgets = await self._budgets()
        result = PassResult(listed=budgets is not None)
        ledger = Ledger(self.redis)
        for customer, ref in sorted((await ConfigStore(self.redis).list_customers()).items()):
            if self.namespaces and ref.partition("/")[0] not in self.namespaces:
                continue  # another operator's budget (one Redis, several watched namespaces)
            body = budgets.get(ref) if budgets is not None else None
            try:
                account = await ledger.account(customer)
                if not account.configured:
                    continue
                uid = ((body or {}).get("metadata") or {}).get("uid")
                target = BudgetTarget(customer, ref, uid, account.currency)
                result.absorbed[customer] = await report_absorbed(self.redis, target, self.notifier)
                if budgets is None:
                    continue
                try:
                    policy = policy_of(body)
                except ValueError as error:
                    log.info(
                        "spend watch: invalid abnormal-spend policy, not checked",
                        extra={"customer": customer, "budget": ref, "error": str(error)},
                    )
                    continue
                if policy is not None:
                    result.abnormal[customer] = await watch_abnormal(
                        self.redis, target, policy, self.notifier, now_ms
                    )
                elif await has_rollup(self.redis, customer):
                    await forget(self.redis, customer)
            except Exception:
                log.exception("spend watch failed for a customer", extra={"customer": customer})
        return result

    async def run(self, stop: Any) -> None:
        await run_every(
            stop, self.interval_s, self.pass_once, log=log, failed="spend watch pass failed"
        )


__all__ = ["PassResult", "SpendWatch"]
