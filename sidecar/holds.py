"""Growing a request's hold while it runs, exactly, in Redis (the ``extend`` script).

A stream whose output outruns its hold asks for more before the events that need it are sent;
when the balance cannot pay, the caller ends the response there. A request priced by upstream
time (streamed or not) has a :class:`GpuClock` that extends its hold one window ahead of the
time it uses, and stops it when the balance cannot pay the next window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from redis.exceptions import RedisError

from spendgate.backpressure import LocalExhaustion
from spendgate.ledger import Ledger, TreeMoving

from .billing import Metered
from .fail_open import FailOpenAllowance
from .metrics import SidecarMetrics
from .settings import FailMode, SidecarSettings

T = TypeVar("T")


class Holds:
    def __init__(
        self,
        settings: SidecarSettings,
        ledger: Ledger,
        metrics: SidecarMetrics,
        fail_open: FailOpenAllowance | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.fail_open = fail_open

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
        except (LocalExhaustion, TreeMoving):  # a move of the budget: cut, hold nothing
            self.metrics.backpressure.labels("extend").inc()
            return False  # cut the stream rather than serve what nobody holds
        except (RedisError, OSError, TimeoutError):
            self.metrics.redis_errors.labels("extend").inc()
            if self.settings.fail_mode is not FailMode.open or self.fail_open is None:
                return False
            # Fail-open: go on past the hold only within the customer's allowance.
            now_ms = int(time.time() * 1000)
            if not await self.fail_open.extend(customer, request_id, extra, now_ms):
                return False
            metered.hold += extra
            return True
        if extension.ok:
            metered.hold += extra
        return extension.ok

    def clock(self, metered: Metered) -> GpuClock | None:
        """A clock for a reserved request whose hold pays for a window of upstream time."""
        bound = metered.bound
        if not metered.reserved or bound is None or not bound.window_ms:
            return None
        if metered.form.paid_ms(bound, metered.output_limit, metered.hold) is None:
            return None
        return GpuClock(self, metered, bound.window_ms)


class OutOfTime(Exception):
    """The request's held GPU time ran out and the balance could not pay for more."""


class GpuClock:
    """Keeps a request priced by upstream time paid for while it runs.

    Half a window before the held time is used up, the hold is extended by one more window
    (``estimate.seconds``), up to what the rule's timeout can cost. When the balance cannot pay
    for more, whatever is left is taken, and when the held time is used up the request is
    stopped: :attr:`up` is set and the upstream response (once there is one) is closed.
    """

    def __init__(self, holds: Holds, metered: Metered, window_ms: int) -> None:
        self.holds = holds
        self.metered = metered
        self.window_ms = window_ms
        self.up = asyncio.Event()
        self._upstream: aiohttp.ClientResponse | None = None
        self._task = asyncio.create_task(self._run())

    def attach(self, upstream: aiohttp.ClientResponse) -> None:
        """Close this upstream response when the time is up."""
        self._upstream = upstream
        if self.up.is_set():
            upstream.close()

    def stop(self) -> None:
        self._task.cancel()

    async def race(self, work: Awaitable[T]) -> T:
        """``work``'s result, unless the time is up first (then it is cancelled: OutOfTime)."""
        job = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self.up.wait())
        try:
            await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            waiter.cancel()
        if job.done():
            return job.result()
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job
        raise OutOfTime

    def _paid_ms(self) -> int | None:
        metered = self.metered
        assert metered.bound is not None
        return metered.form.paid_ms(metered.bound, metered.output_limit, metered.hold)

    async def _run(self) -> None:
        metered, timeout = self.metered, self.metered.rule.timeout
        lead = max(self.window_ms // 2, 1)
        refused = False
        while True:
            paid = self._paid_ms()
            if paid is None or paid >= timeout:
                return  # the hold pays for all the time the rule allows
            delay = paid - (0 if refused else lead) - metered.elapsed_ms()
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            if refused:
                break
            try:
                refused = not await self._extend(paid) or self._paid_ms() == paid
            except _StoreDown:
                return  # fail-open: served to the timeout, settled later like any fail-open
        metered.out_of_time = metered.cut_off = True
        self.holds.metrics.time_cutoffs.inc()
        self.up.set()
        if self._upstream is not None:
            self._upstream.close()

    async def _extend(self, paid: int) -> bool:
        """Hold one more window (what is left of the balance, at worst); False when nothing."""
        metered, holds = self.metered, self.holds
        assert metered.bound is not None
        until = min(paid + self.window_ms, metered.rule.timeout)
        try:
            wanted = metered.form.hold_for_ms(metered.bound, metered.output_limit, until)
        except ValueError:  # a bound expression that cannot price more time: no more time
            return False
        extra = wanted - metered.hold
        if extra <= 0:
            return True
        ttl_ms = metered.rule.timeout + holds.settings.hold_grace_ms
        customer, request_id = metered.owner.customer_id, metered.request_id
        try:
            extension = await holds.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
            if not extension.ok and extension.reason == "insufficient" and extension.available:
                extra = min(extra, extension.available)
                extension = await holds.ledger.extend(customer, request_id, extra, ttl_ms=ttl_ms)
        except (LocalExhaustion, TreeMoving):  # a move of the budget: cut, hold nothing
            holds.metrics.backpressure.labels("extend").inc()
            return False
        except (RedisError, OSError, TimeoutError):
            holds.metrics.redis_errors.labels("extend").inc()
            if holds.settings.fail_mode is FailMode.open:
                raise _StoreDown from None
            return False
        if extension.ok:
            metered.hold += extra
        return extension.ok


class _StoreDown(Exception):
    """Redis is unreachable and the sidecar fails open: stop watching, keep serving."""
