"""Growing a request's hold while it runs, exactly, in Redis (the ``extend`` script).

A stream whose output outruns its hold asks for more before the events that need it are sent;
when the balance cannot pay, the caller ends the response there.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from spendgate.backpressure import LocalExhaustion
from spendgate.ledger import Ledger

from .billing import Metered
from .metrics import SidecarMetrics
from .settings import FailMode, SidecarSettings


class Holds:
    def __init__(self, settings: SidecarSettings, ledger: Ledger, metrics: SidecarMetrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics

    async def extend(self, metered: Metered, needed: int = 1) -> bool:
        rule = metered.rule
        if metered.hold >= rule.max_cost:
            return True  # the cost can never exceed the rule's maximum
        step = max(metered.hold, rule.max_cost // 4, 1)
        extra = min(step, rule.max_cost - metered.hold)
        ttl_ms = rule.timeout + self.settings.hold_grace_ms
        customer, request_id = metered.owner.customer_id, metered.request_id
        try:
            extension = await self.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
            if not extension.ok and extension.reason == "insufficient":
                # Less than a full step is left: take what remains if it pays for this piece,
                # so the stream is cut off when the balance is gone, not before.
                extra = min(extra, extension.available or 0)
                if extra >= needed:
                    extension = await self.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
        except LocalExhaustion:
            self.metrics.backpressure.labels("extend").inc()
            return False  # cut the stream rather than serve what nobody holds
        except (RedisError, OSError, TimeoutError):
            self.metrics.redis_errors.labels("extend").inc()
            return self.settings.fail_mode is FailMode.open
        if extension.ok:
            metered.hold += extra
        return extension.ok
