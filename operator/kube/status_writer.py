"""Writing a spendgate object's status and Events with the operator's one client.

The reconcilers' status goes out here, not through kopf's patch: a status patch the API server
refuses (HTTP 422 -- typically a CRD older than the operator, see :mod:`.api_checks`) would
end kopf's periodic timer for that object and the patch would be lost. Here a refusal is

- logged once per refusal as a structured error (object, fields, the server's message, when
  it is tried again), counted in ``spendgate_status_patch_rejected_total{kind}``,
- reported where it still can be: a Warning Event ``StatusRejected`` on the object, and
  ``Ready=Unknown`` (reason ``StatusRejected``) written alone, if the server takes that,
- tried again -- the whole status, recomputed -- after an exponential backoff
  (``base_s`` doubling to ``cap_s``); until then the object's writes are skipped, and
  its timer keeps running.

Events carry a real ``action`` (what the operator did), not kopf's placeholder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from . import conditions as cond
from .client import Invalid, KubeClient
from .conditions import READY
from .objects import EventSpec, generation_of, object_ref, plain
from .retry import KubernetesUnavailable

log = logging.getLogger("spendgate.operator.kube")

STATUS_PATCH_REJECTED = Counter(
    "spendgate_status_patch_rejected_total",
    "Status patches the API server refused (422), retried with backoff",
    ["kind"],
)
STATUS_REJECTED = "StatusRejected"


def involved_object(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ObjectReference of a body, for an Event's ``involvedObject``."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
    }


async def post_events(
    kube: KubeClient,
    body: Mapping[str, Any],
    events: Iterable[EventSpec],
    *,
    action: str,
    instance: str,
) -> None:
    """Post Events on ``body``; best effort (a failure is logged, never raised)."""
    for event in events:
        try:
            await kube.create_event(
                involved_object(body),
                type=event.type,
                reason=event.reason,
                message=event.message,
                action=action,
                instance=instance,
            )
        except KubernetesUnavailable as error:
            log.warning(
                "could not post an Event",
                extra={"object": object_ref(body), "reason": event.reason, "error": error.message},
            )


@dataclass
class _Rejected:
    attempts: int
    retry_at: float
    message: str


class StatusWriter:
    """Merge-patches status with backoff on refusal; one per operator, keyed by object uid."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        instance: str = "",
        base_s: float = 2.0,
        cap_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.instance = instance
        self.base_s = base_s
        self.cap_s = cap_s
        self.clock = clock
        self.rejected: dict[str, _Rejected] = {}

    def retry_in(self, uid: str) -> float | None:
        """Seconds until the object's status is tried again; None if it is not held back."""
        held = self.rejected.get(uid)
        return None if held is None else max(0.0, held.retry_at - self.clock())

    def forget(self, uid: str) -> None:
        self.rejected.pop(uid, None)

    async def write(
        self, plural: str, body: Mapping[str, Any], changes: Mapping[str, Any], *, action: str
    ) -> bool:
        """Write ``changes`` to the status. False if refused now or held back by a refusal."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or object_ref(body))
        wait = self.retry_in(uid)
        if wait is not None and wait > 0:
            return False
        if not changes:
            self.rejected.pop(uid, None)  # nothing (left) to write
            return True
        try:
            await self.kube.patch_status(plural, meta["namespace"], meta["name"], changes)
        except Invalid as error:
            await self._rejected(plural, body, uid, changes, error, action)
            return False
        held = self.rejected.pop(uid, None)
        if held is not None:
            log.info(
                "the API server accepts the status again",
                extra={"object": object_ref(body), "after_attempts": held.attempts},
            )
        return True

    async def _rejected(
        self,
        plural: str,
        body: Mapping[str, Any],
        uid: str,
        changes: Mapping[str, Any],
        error: Invalid,
        action: str,
    ) -> None:
        held = self.rejected.get(uid)
        attempts = 1 if held is None else held.attempts + 1
        delay = min(self.cap_s, self.base_s * 2 ** (attempts - 1))
        self.rejected[uid] = _Rejected(attempts, self.clock() + delay, error.message)
        kind = str(body.get("kind") or plural)
        STATUS_PATCH_REJECTED.labels(kind).inc()
        log.error(
            "the API server rejected a status patch",
            extra={
                "object": object_ref(body),
                "kind": kind,
                "fields": sorted(changes),
                "error": error.message,
                "attempt": attempts,
                "retry_in_s": delay,
            },
        )
        if held is not None and held.message == error.message and delay < self.cap_s:
            return  # the same refusal again: told already
        message = (
            f"the API server refused the status update ({error.message}); retrying in"
            f" {delay:g}s. A CRD older than the operator? kubectl apply --server-side -f crds/"
        )
        await post_events(
            self.kube,
            body,
            [EventSpec("Warning", STATUS_REJECTED, message)],
            action=action,
            instance=self.instance,
        )
        old = (body.get("status") or {}).get("conditions")
        generation = generation_of(body)
        ready = cond.make_condition(
            READY, "Unknown", STATUS_REJECTED, message, generation=generation
        )
        meta = body.get("metadata") or {}
        # If the condition cannot be written either, the Event and the log remain.
        with contextlib.suppress(KubernetesUnavailable):
            await self.kube.patch_status(
                plural,
                meta["namespace"],
                meta["name"],
                {"conditions": cond.set_condition(plain(old), ready)},
            )


__all__ = [
    "STATUS_PATCH_REJECTED",
    "STATUS_REJECTED",
    "StatusWriter",
    "involved_object",
    "post_events",
]
