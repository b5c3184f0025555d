"""Carry out the actions of ``mapping.py`` against the ledger: idempotent, order-tolerant.

Entry points (the webhook processor and reconciliation use them; the operator calls only the
timer)::

    applier = Applier(redis, ledger, settings, gateway=gateway, on_event=emit)
    await applier.handle_event(event_dict)     # one Stripe event -> effects (list of strings)
    await applier.apply(link, actions)         # actions computed elsewhere (reconciliation)
    await applier.apply_due_grace()            # timer (leader, every few seconds): suspend
                                               # budgets whose payment grace period ran out

``on_event(customer_id, reason, message, warning)`` (sync or async) is how the operator turns
what happened into Kubernetes Events on the budget (``warning`` -> type Warning, else Normal).

Idempotency: funding by the Stripe object id (``Ledger.fund``/``adjust`` are once-only per id);
state changes by the Stripe ``created`` timestamp of the event per suspension source, kept in
``sg:{c}:stripe`` and compared in the same Lua script that writes the suspension, so an older
event never undoes a newer one (ties: the later arrival wins). Grace periods: the deadline
lives in ``sg:{c}:stripe`` (``grace:<source>``) and an index ``sg:stripe:grace`` (zset,
``customerId<TAB>source`` scored by deadline ms) that the timer reads; a lift clears the
deadline, so a timer that fires late finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from spendgate.keys import CONFIG_CHANNEL, for_customer
from spendgate.ledger import Ledger

from .access import GRACE_DUE, GRACE_INDEX, SET_ACCESS, payment_method_access
from .actions import (
    Action,
    Adjust,
    CheckPaymentMethods,
    Fund,
    Notify,
    RefundTopup,
    ReverseGrant,
    SetAccess,
)
from .client import StripeGateway, to_dict
from .currency import minor_to_micros
from .links import Link, linked_customers, resolve_link, stripe_key
from .mapping import actions_for_event, event_stripe_customer
from .settings import StripeSettings

log = logging.getLogger("spendgate.operator.stripe")

OnEvent = Callable[[str, str, str, bool], Any]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Applier:
    def __init__(
        self,
        redis: Any,
        ledger: Ledger,
        settings: StripeSettings,
        *,
        gateway: StripeGateway | None = None,
        on_event: OnEvent | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ledger = ledger
        self.settings = settings
        self.gateway = gateway
        self.on_event = on_event
        self.clock = clock
        self._set_access = redis.register_script(SET_ACCESS)
        self._grace_due = redis.register_script(GRACE_DUE)

    # ------------------------------------------------------------------ events

    async def handle_event(self, event: Mapping[str, Any]) -> list[str]:
        """Apply one Stripe event (a parsed webhook body); returns what it did."""
        data = event.get("data") or {}
        obj = data.get("object") or {}
        link = await resolve_link(
            self.redis, event_stripe_customer(event), obj.get("metadata"), self.settings
        )
        if link is None:
            return ["unlinked"]
        actions = actions_for_event(event, link, self.settings)
        return await self.apply(link, actions)

    async def apply(self, link: Link, actions: list[Action]) -> list[str]:
        done: list[str] = []
        for action in actions:
            done.append(await self._apply_one(link, action))
        return done

    async def _apply_one(self, link: Link, action: Action) -> str:
        cid = link.customer_id
        if isinstance(action, Fund):
            credit = await self.ledger.fund(
                cid, action.funding_id, action.amount, source="stripe", note=action.note
            )
            if not credit.duplicate:
                await self._notify(
                    cid, "StripeFunded", f"{action.note}: +{action.amount} micro", warning=False
                )
            return f"fund:{action.funding_id}:{'dup' if credit.duplicate else action.amount}"
        if isinstance(action, Adjust):
            if action.only_if_applied and not await self._applied(cid, action.only_if_applied):
                return f"skip:{action.adjustment_id}"
            credit = await self.ledger.adjust(
                cid,
                action.adjustment_id,
                action.amount,
                source="stripe",
                note=action.note,
                allow_negative=True,  # money Stripe took back is gone, balance or not
            )
            return f"adjust:{action.adjustment_id}:{'dup' if credit.duplicate else action.amount}"
        if isinstance(action, ReverseGrant):
            return await self._reverse_grant(link, action)
        if isinstance(action, RefundTopup):
            return await self._refund(link, action)
        if isinstance(action, SetAccess):
            return await self.set_access(link, action)
        if isinstance(action, Notify):
            await self._notify(cid, action.reason, action.message, warning=action.warning)
            return f"notify:{action.reason}"
        if isinstance(action, CheckPaymentMethods):
            # Bounded: the processor must not stall behind Stripe; reconciliation catches up.
            try:
                has = await asyncio.wait_for(
                    self.has_payment_method(link), timeout=self.settings.request_timeout_s
                )
            except TimeoutError:
                has = None
            if has is None:
                return "pm:unknown"
            return await self.set_access(link, payment_method_access(has, action.created))
        raise TypeError(f"unknown action {action!r}")

    async def _applied(self, customer_id: str, funding_id: str) -> bool:
        return bool(await self.redis.exists(for_customer(customer_id).funding(funding_id)))

    async def _reverse_grant(self, link: Link, action: ReverseGrant) -> str:
        cid = link.customer_id
        fund_key = for_customer(cid).funding(action.grant_id)
        # Never funded (voided before we saw it): mark the id as used so a late "created"
        # event cannot fund a dead grant, and take nothing back.
        if await self.redis.set(fund_key, "0@voided", nx=True):
            return f"grant-void-unfunded:{action.grant_id}"
        if _text(await self.redis.get(fund_key) or "").startswith("0@"):
            return f"grant-void-unfunded:{action.grant_id}:dup"
        reverse_id = f"{action.grant_id}.void"
        if await self._applied(cid, reverse_id):
            return f"grant-void:{action.grant_id}:dup"
        remaining = action.remaining
        if remaining is None:
            remaining = await self.grant_remaining(link, action.grant_id)
        amount = action.granted if remaining is None else min(remaining, action.granted)
        if amount <= 0:
            await self.redis.set(for_customer(cid).funding(reverse_id), "0@nothing-left", nx=True)
            return f"grant-void:{action.grant_id}:0"
        credit = await self.ledger.adjust(
            cid,
            reverse_id,
            -amount,
            source="stripe",
            note=f"credit grant {action.grant_id} ended",
            allow_negative=True,
        )
        if not credit.duplicate:
            await self._notify(
                cid,
                "StripeCreditGrantEnded",
                f"credit grant {action.grant_id} {action.why}: -{amount} micro-units",
                warning=False,
            )
        return f"grant-void:{action.grant_id}:{'dup' if credit.duplicate else -amount}"

    async def grant_remaining(self, link: Link, grant_id: str) -> int | None:
        """What is left of a grant in Stripe (its credit balance summary), or None if unknown.

        One bounded attempt: the processor must not stall behind it; None means the full
        granted amount is reversed (documented in docs/stripe.md)."""
        if self.gateway is None:
            return None
        client = self.gateway.client
        try:
            summary = await asyncio.wait_for(
                client.v1.billing.credit_balance_summary.retrieve_async(
                    {
                        "customer": link.stripe_customer,
                        "filter": {"type": "credit_grant", "credit_grant": grant_id},
                    }
                ),
                timeout=self.settings.request_timeout_s,
            )
        except Exception as error:
            log.warning(
                "credit balance of grant %s unavailable: %s", grant_id, type(error).__name__
            )
            return None
        return remaining_from_summary(to_dict(summary), link.currency)

    async def _refund(self, link: Link, action: RefundTopup) -> str:
        cid = link.customer_id
        if not await self._applied(cid, action.payment_intent):
            return f"skip-refund:{action.charge_id}"
        field = f"refunded:{action.charge_id}"
        before = int(_text(await self.redis.hget(stripe_key(cid), field) or 0))
        delta = action.total_refunded - before
        if delta <= 0:
            return f"refund:{action.charge_id}:dup"
        # The id names the cumulative total: a crash before the HSET re-applies nothing.
        await self.ledger.adjust(
            cid,
            f"{action.charge_id}.refund.{action.total_refunded}",
            -delta,
            source="stripe",
            note=f"refund of {action.payment_intent}",
            allow_negative=True,
        )
        await self.redis.hset(stripe_key(cid), field, str(action.total_refunded))
        return f"refund:{action.charge_id}:{-delta}"

    # ------------------------------------------------------------------ access

    async def set_access(self, link: Link, action: SetAccess) -> str:
        cid = link.customer_id
        keys = [stripe_key(cid), for_customer(cid).suspensions]
        if action.suspend and action.grace_ms > 0:
            mode, deadline = "grace", action.created * 1000 + action.grace_ms
        else:
            mode, deadline = ("suspend" if action.suspend else "lift"), 0
        result = _text(
            await self._set_access(
                keys=keys, args=[action.source, mode, action.created, action.reason, deadline]
            )
        )
        if result == "grace":
            await self.redis.zadd(GRACE_INDEX, {f"{cid}\t{action.source}": deadline})
            await self._notify(
                cid,
                "StripeGracePeriod",
                f"{action.reason}; suspending at {_iso(deadline)} unless paid",
            )
        elif result == "suspended":
            await self._changed(cid)
            await self._notify(cid, "Suspended", f"{action.source}: {action.reason}")
        elif result == "lifted":
            await self.redis.zrem(GRACE_INDEX, f"{cid}\t{action.source}")
            await self._changed(cid)
            await self._notify(cid, "Resumed", f"{action.source}: {action.reason}", warning=False)
        elif mode == "lift":
            await self.redis.zrem(GRACE_INDEX, f"{cid}\t{action.source}")
        return f"{action.source}:{result}"

    async def apply_due_grace(self, now_ms: int | None = None) -> int:
        """Suspend every budget whose grace period ended; returns how many were suspended."""
        now = int(self.clock() * 1000) if now_ms is None else now_ms
        due = await self.redis.zrangebyscore(GRACE_INDEX, "-inf", now, start=0, num=500)
        count = 0
        for member in due:
            cid, _, source = _text(member).partition("\t")
            keys = [stripe_key(cid), for_customer(cid).suspensions]
            result, detail = (
                _text(x) for x in await self._grace_due(keys=keys, args=[source, now])
            )
            if result == "later":
                await self.redis.zadd(GRACE_INDEX, {_text(member): int(detail)})
                continue
            await self.redis.zrem(GRACE_INDEX, member)
            if result == "suspended":
                count += 1
                await self._changed(cid)
                await self._notify(cid, "Suspended", f"{source}: grace period over: {detail}")
        return count

    async def reindex_grace(self) -> int:
        """Re-create timer entries from the per-customer state (repairs a crash between the
        state write and the index write); reconciliation calls it."""
        count = 0
        for cid in await linked_customers(self.redis):
            raw = await self.redis.hgetall(stripe_key(cid))
            for name, value in raw.items():
                name = _text(name)
                if name.startswith("grace:"):
                    deadline = int(_text(value).split("|", 1)[0])
                    added = await self.redis.zadd(
                        GRACE_INDEX, {f"{cid}\t{name[6:]}": deadline}, nx=True
                    )
                    count += int(added or 0)
        return count

    async def has_payment_method(self, link: Link) -> bool | None:
        """Whether the Stripe customer has a payment method on file (None: could not ask)."""
        if self.gateway is None:
            return None
        client = self.gateway.client
        try:
            customer = to_dict(
                await self.gateway.call(
                    lambda: client.v1.customers.retrieve_async(link.stripe_customer),
                    "retrieve customer",
                )
            )
            settings_ = customer.get("invoice_settings") or {}
            if settings_.get("default_payment_method") or customer.get("default_source"):
                return True
            methods = to_dict(
                await self.gateway.call(
                    lambda: client.v1.customers.payment_methods.list_async(
                        link.stripe_customer, {"limit": 1}
                    ),
                    "list payment methods",
                )
            )
        except Exception as error:
            log.warning(
                "payment methods of %s unavailable: %s", link.customer_id, type(error).__name__
            )
            return None
        return bool(methods.get("data"))

    # ------------------------------------------------------------------ helpers

    async def _changed(self, customer_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.redis.publish(CONFIG_CHANNEL, f"customer:{customer_id}")

    async def _notify(
        self, customer_id: str, reason: str, message: str, *, warning: bool = True
    ) -> None:
        (log.warning if warning else log.info)(
            "stripe: %s %s: %s",
            customer_id,
            reason,
            message,
            extra={"customer": customer_id, "reason": reason},
        )
        if self.on_event is None:
            return
        try:
            result = self.on_event(customer_id, reason, message, warning)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("event callback failed for %s %s", customer_id, reason)


def remaining_from_summary(summary: Mapping[str, Any], budget_currency: str) -> int | None:
    """The available balance in a credit balance summary, in micro-units (None if absent)."""
    for balance in summary.get("balances") or []:
        available = (balance or {}).get("available_balance") or {}
        monetary = available.get("monetary") or {}
        value, currency = monetary.get("value"), monetary.get("currency")
        if isinstance(value, int) and currency and str(currency).upper() == budget_currency:
            return minor_to_micros(value, str(currency))
    return None


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
