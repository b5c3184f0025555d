"""``run_operator`` against the kube emulator, in the calling test's own task.

Not a fixture on purpose: kopf cancels, at exit, the tasks created after it started, and
pytest-asyncio runs fixture teardowns in tasks of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kopf

from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings


@contextlib.asynccontextmanager
async def operator_on_emulator(
    settings: OperatorSettings, client: Any, url: str
) -> AsyncIterator[None]:
    """The operator logged in to the emulator at ``url``, ready on entry; on exit it is
    stopped and the Redis ``client`` closed."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_operator(
            settings,
            redis_client=client,
            login=lambda **_: kopf.ConnectionInfo(server=url),
            services=[],
            stop_flag=stop,
            ready_flag=ready,
            health=False,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        finally:
            await client.aclose()
