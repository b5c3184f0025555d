"""Our objects as the reconcilers see them: the bodies kopf hands over, the status merge
patch, and the Events a change of the Ready condition posts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import conditions as cond
from .conditions import READY


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
    "EventSpec",
    "generation_of",
    "object_ref",
    "plain",
    "ready_events",
    "status_patch",
]
