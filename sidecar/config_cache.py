"""The sidecar's view of configuration: API key owners and its PriceBook, kept fresh by pub/sub.

Budgets themselves are read by the ledger scripts on every request, so balance, limits and
suspensions need no cache. Keys and prices are cached in memory and refreshed when the operator
announces a change on ``sg:config``; a periodic full reload covers messages lost while the
subscription was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from spendgate import keys as rkeys
from spendgate.config_store import ConfigStore, KeyOwner
from spendgate.models import PriceBookSpec

log = logging.getLogger("spendgate.sidecar.config")

_NEGATIVE_TTL_S = 5.0
_NEGATIVE_MAX = 10_000
_LISTED_PRICEBOOKS = 20


class ConfigCache:
    def __init__(self, store: ConfigStore, pricebook_ref: str, *, refresh_s: float) -> None:
        self.store = store
        self.pricebook_ref = pricebook_ref
        self.refresh_s = refresh_s
        self.keys: dict[str, KeyOwner] = {}
        self.pricebook: PriceBookSpec | None = None
        self.loaded = False
        self._unknown: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    async def load(self) -> None:
        self.keys = await self.store.all_keys()
        self.pricebook = await self.store.get_pricebook(self.pricebook_ref)
        self._unknown.clear()
        self.loaded = True
        if self.pricebook is None:
            await self._report_missing_pricebook()

    async def _report_missing_pricebook(self) -> None:
        """Name the PriceBooks that do exist: a typo in --pricebook is then plain to see."""
        existing = await self.store.list_pricebooks()
        shown = ", ".join(existing[:_LISTED_PRICEBOOKS]) or "none"
        if len(existing) > _LISTED_PRICEBOOKS:
            shown += f" (and {len(existing) - _LISTED_PRICEBOOKS} more)"
        log.warning(
            f"pricebook {self.pricebook_ref} not found; PriceBooks in Redis: {shown}",
            extra={"pricebook": self.pricebook_ref, "existing": existing[:_LISTED_PRICEBOOKS]},
        )

    async def owner(self, digest: str) -> KeyOwner | None:
        """The owner of a key hash; a miss asks Redis once and is remembered briefly."""
        owner = self.keys.get(digest)
        if owner is not None:
            return owner
        seen = self._unknown.get(digest)
        if seen is not None and time.monotonic() - seen < _NEGATIVE_TTL_S:
            return None
        owner = await self.store.lookup_key(digest)
        if owner is None:
            if len(self._unknown) >= _NEGATIVE_MAX:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic()
        else:
            self.keys[digest] = owner
        return owner

    async def on_message(self, message: str) -> None:
        kind, _, subject = message.partition(":")
        if kind == "key":
            self._unknown.pop(subject, None)
            owner = await self.store.lookup_key(subject)
            if owner is None:
                self.keys.pop(subject, None)
            else:
                self.keys[subject] = owner
        elif kind == "pricebook" and subject == self.pricebook_ref:
            self.pricebook = await self.store.get_pricebook(self.pricebook_ref)
            log.info("pricebook reloaded", extra={"pricebook": self.pricebook_ref})
        elif kind == "customer":  # re-applied, or moved in its tree (spendgate.tree_moves)
            self.store.ledger.tree.forget(subject)
        elif kind == "reload":
            await self.load()

    # ----------------------------------------------------------------- background work

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="config-listen"),
            asyncio.create_task(self._refresh_periodically(), name="config-refresh"),
        ]

    async def wait_subscribed(self, within_s: float) -> bool:
        try:
            await asyncio.wait_for(self._subscribed.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_s: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        if not self._tasks:
            return
        # redis-py's pub/sub can swallow a cancellation while it reconnects: never wait forever.
        _, stuck = await asyncio.wait(self._tasks, timeout=timeout_s)
        if stuck:
            log.warning("config tasks did not stop in time", extra={"tasks": len(stuck)})
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" noise

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub: Any = None
            try:
                pubsub = self.store.redis.pubsub()
                await pubsub.subscribe(rkeys.CONFIG_CHANNEL)
                # Anything published while we were not listening is unknown: reload all.
                await self.load()
                self._subscribed.set()
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    await self.on_message(data.decode() if isinstance(data, bytes) else data)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # reconnect on any Redis failure
                # "Lost" only if it was made: a first subscribe that fails is not a loss.
                lost = self._subscribed.is_set()
                self._subscribed.clear()
                log.warning(
                    "config subscription lost; retrying"
                    if lost
                    else "config subscription not established; retrying",
                    extra={
                        "channel": rkeys.CONFIG_CHANNEL,
                        "error": repr(error),
                        "retry_in_s": backoff,
                    },
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.load()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("config refresh failed", extra={"error": repr(error)})
