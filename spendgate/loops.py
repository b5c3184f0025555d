"""Background loops that end as soon as their stop event is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_every(
    stop: asyncio.Event,
    interval_s: float,
    step: Callable[[], Awaitable[Any]],
    *,
    log: logging.Logger,
    failed: str,
    traceback: bool = True,
) -> None:
    """Await ``step()`` every ``interval_s`` until ``stop`` is set; a failed step is logged
    (``failed`` is the message) and the next one runs on schedule.

    ``traceback=False`` logs a warning with the error's repr instead of the traceback.
    """
    while not stop.is_set():
        try:
            await step()
        except Exception as error:
            if traceback:
                log.exception(failed)
            else:
                log.warning(failed, extra={"error": repr(error)})
        await sleep_or_stop(stop, interval_s)


__all__ = ["run_every", "sleep_or_stop"]
