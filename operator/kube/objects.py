"""What the CustomerBudget and PriceBook reconcilers share.

Retryable errors (Redis or the Kubernetes API unreachable: ``Ready=Unknown``, try again later),
the Events they post, reading the bodies kopf hands over, and the status merge patch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from spendgate.logs import redact

from . import conditions as cond

T = TypeVar("T")

READY = "Ready"
INVALID_SPEC = "InvalidSpec"  # the Ready=False reason of a spec that does not validate
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


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the reconciled object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def ready_events(
    old_status: Mapping[str, Any], status: Mapping[str, Any], *, configured_message: str | None
) -> list[EventSpec]:
    """Events for a change of the Ready condition.

    A new ``Ready=True`` is ``Configured`` (with ``configured_message`` when given), a new
    ``Ready=False``/``Unknown`` a Warning with its reason. ``configured_message`` also reports
    a change that kept ``Ready=True``.
    """
    ready = cond.find(status.get("conditions"), READY)
    if ready is None:
        return []
    if cond.transitioned(old_status.get("conditions"), dict(ready)):
        if ready["status"] == "True":
            return [EventSpec("Normal", "Configured", configured_message or ready["message"])]
        return [EventSpec("Warning", ready["reason"], ready["message"])]
    if configured_message is not None and ready["status"] == "True":
        return [EventSpec("Normal", "Configured", configured_message)]
    return []


def object_ref(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def generation_of(body: Mapping[str, Any]) -> int | None:
    generation = (body.get("metadata") or {}).get("generation")
    return generation if isinstance(generation, int) else None


def plain(value: Any) -> Any:
    """kopf bodies are read-only mapping views; the models want plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``old`` into ``new`` at the top level (``None`` deletes).

    Only changed fields are written, so a periodic refresh of an idle object costs no API write.
    """
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if plain(old.get(key)) != value:
            patch[key] = value
    return patch


__all__ = [
    "INVALID_SPEC",
    "READY",
    "EventSpec",
    "KubernetesUnavailable",
    "RedisUnavailable",
    "RetryableError",
    "generation_of",
    "object_ref",
    "plain",
    "ready_events",
    "redis_call",
    "status_patch",
]
