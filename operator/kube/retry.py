"""Temporary failures of a reconciliation: the Kubernetes API or Redis is unreachable.

The reconciliation reports ``Ready=Unknown`` with the error's reason and is tried again later.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import TypeVar

from redis.exceptions import RedisClusterException, RedisError

from spendgate.logs import redact

from . import conditions as cond
from .conditions import READY

T = TypeVar("T")

REDIS_UNAVAILABLE = "RedisUnavailable"
KUBERNETES_UNAVAILABLE = "KubernetesApiUnavailable"


class RetryableError(Exception):
    """A temporary failure: report it, then try the whole reconciliation again later."""

    reason = "Retrying"

    def __init__(self, message: str, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay_s = delay_s

    def ready_condition(self, generation: int | None, now: datetime) -> cond.Condition:
        """``Ready=Unknown`` with this error's reason: the outcome is not known yet."""
        return cond.make_condition(
            READY, "Unknown", self.reason, self.message, generation=generation, now=now
        )


class RedisUnavailable(RetryableError):
    reason = REDIS_UNAVAILABLE


class KubernetesUnavailable(RetryableError):
    reason = KUBERNETES_UNAVAILABLE


async def redis_call(awaitable: Awaitable[T]) -> T:
    """Await a Redis operation; unreachable Redis (or any Redis error) becomes retryable."""
    try:
        return await awaitable
    except (RedisError, RedisClusterException, OSError) as error:
        text = redact(str(error)) or type(error).__name__
        raise RedisUnavailable(f"Redis is unavailable: {type(error).__name__}: {text}") from None


__all__ = [
    "KUBERNETES_UNAVAILABLE",
    "REDIS_UNAVAILABLE",
    "KubernetesUnavailable",
    "RedisUnavailable",
    "RetryableError",
    "redis_call",
]
