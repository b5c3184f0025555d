"""An in-memory Kubernetes API server for end-to-end operator tests, recording every API call.

Built on ``kmock`` (``kmock.KubernetesEmulator``: discovery, list, watch, get, create, patch,
delete over real HTTP). :class:`KubeEmulator` adds what kopf relies on and kmock leaves out:

- ``metadata.resourceVersion`` bumped on every change (kopf's JSON-patch ``test`` ops and its
  consistency wait need it), ``uid``, ``creationTimestamp``, and ``generation`` bumped on spec
  changes only (``observedGeneration`` depends on it);
- ``metadata.generateName`` (kopf posts Events with it);
- the ``status`` subresource: a PATCH of ``.../status`` changes only ``status``, a PATCH of the
  object never changes ``status``; a no-op patch changes nothing and emits no watch event;
- JSON patches (``application/json-patch+json``) with ``test`` ops; a failed test is HTTP 422;
- a merge patch carrying ``metadata.resourceVersion`` applies only to that version, else HTTP
  409 Conflict, as on a real API server (leader election relies on it);
- finalizers: DELETE only sets ``deletionTimestamp`` while finalizers remain, and the object
  goes when the last one is removed;
- ``/api/v1/namespaces[/NAME]`` (kmock cannot parse these paths; patched here).

**API call recording.** Every request the operator makes (kopf's and the operator's own
client; not the test's own requests, which go out with kmock's ``User-Agent``) is appended
to the module-level :data:`API_CALLS` as an :class:`ApiCall` (HTTP method, API group,
version, resource, subresource, verb, namespace, name, path, user agent). The session
fixture ``kube_api_calls`` returns that list; :func:`rbac_rules` turns it into
``(apiGroup, resource, verb)`` triples, the shape of a ClusterRole's rules, so a later test
can check the Helm chart's RBAC against what the operator really does. With the environment
variable ``SPENDGATE_KUBE_CALLS_FILE`` set, the calls are also written there as JSON at the
end of the session (see ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
from kmock._internal import apps, enums, parsing, rendering

from spendgate import crd

# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class ApiCall:
    method: str  # HTTP method
    verb: str  # Kubernetes verb: get list watch create patch update delete
    api_group: str | None  # "" for the core group; None for non-resource URLs (discovery)
    version: str | None
    resource: str | None  # plural
    subresource: str | None
    namespace: str | None
    name: str | None
    path: str
    user_agent: str

    @property
    def rbac_resource(self) -> str | None:
        if self.resource is None:
            return None
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


API_CALLS: list[ApiCall] = []  # every call of every emulator in this process


def rbac_rules(calls: Iterable[ApiCall]) -> list[tuple[str, str, str]]:
    """``(apiGroup, resource[/subresource], verb)`` triples, sorted, for resource requests."""
    rules = {
        (call.api_group or "", call.rbac_resource, call.verb)
        for call in calls
        if call.api_group is not None and call.rbac_resource is not None
    }
    return sorted(rules)  # type: ignore[arg-type]


def non_resource_urls(calls: Iterable[ApiCall]) -> list[str]:
    return sorted({call.path for call in calls if call.api_group is None})


def write_calls(path: str | Path, calls: Iterable[ApiCall] = API_CALLS) -> None:
    calls = list(calls)
    Path(path).write_text(
        json.dumps(
            {
                "calls": [asdict(call) for call in calls],
                "rbac": [list(rule) for rule in rbac_rules(calls)],
                "nonResourceURLs": non_resource_urls(calls),
            },
            indent=2,
        )
    )


_VERBS = {
    enums.action.LIST: "list",
    enums.action.WATCH: "watch",
    enums.action.FETCH: "get",
    enums.action.CREATE: "create",
    enums.action.UPDATE: "patch",
    enums.action.DELETE: "delete",
}


def _record(request: rendering.Request) -> None:
    agent = str(request.headers.get("User-Agent", ""))
    if agent.startswith("kmock/"):
        return  # the test's own requests (kubectl's role), not the operator's
    resource = request.resource
    if resource is None or resource.plural is None:
        call = ApiCall(
            str(request.method.value),
            "get",
            None,
            None,
            None,
            None,
            None,
            None,
            request.url.path,
            agent,
        )
    else:
        verb = _VERBS.get(request.action) if request.action is not None else None
        if verb is None:
            verb = {"PUT": "update", "DELETE": "deletecollection"}.get(
                str(request.method.value), str(request.method.value).lower()
            )
        call = ApiCall(
            method=str(request.method.value),
            verb=verb,
            api_group=resource.group,
            version=resource.version,
            resource=resource.plural,
            subresource=request.subresource,
            namespace=request.namespace,
            name=request.name,
            path=request.url.path,
            user_agent=agent,
        )
    API_CALLS.append(call)


# --------------------------------------------------------------------------- kmock fixes

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock reads ``/api/v1/namespaces[/NAME]`` as a namespace prefix; it is the resource."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath(
            "", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None
        )
    return _original_parse_path(path)


parsing.parse_path = _parse_path


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


# --------------------------------------------------------------------------- the emulator


@dataclass(frozen=True)
class Kind:
    """A resource to declare: ``group/version/plural``, namespaced or not, with status?"""

    ref: str
    kind: str
    namespaced: bool = True
    status: bool = False


CORE_KINDS = (
    Kind("v1/namespaces", "Namespace", namespaced=False, status=True),
    Kind("v1/events", "Event"),
    Kind("v1/secrets", "Secret"),
    Kind("v1/services", "Service", status=True),
    Kind("v1/pods", "Pod", status=True),
    Kind("coordination.k8s.io/v1/leases", "Lease"),
    Kind(
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        status=True,
    ),
)
SPENDGATE_KINDS = (
    Kind("spendgate.dev/v1alpha1/customerbudgets", "CustomerBudget", status=True),
    Kind("spendgate.dev/v1alpha1/pricebooks", "PriceBook", status=True),
)
PEERING_KINDS = (
    Kind("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", namespaced=False),
    Kind("kopf.dev/v1/kopfpeerings", "KopfPeering"),
)
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with resource versions, generations and subresource semantics."""

    _resource_version = 1000

    def declare(self, kinds: Iterable[Kind]) -> None:
        for kind in kinds:
            self.resources[kind.ref] = kmock.ResourceInfo(
                kind=kind.kind,
                singular=kind.kind.lower(),
                namespaced=kind.namespaced,
                verbs=set(ALL_VERBS),
                subresources={"status"} if kind.status else set(),
            )

    def _namespaced(self, resource: Any) -> bool:
        return resource in self.resources and bool(self.resources[resource].namespaced)

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    async def _serve_list(self, request: rendering.Request) -> Any:
        listing = await super()._serve_list(request)
        listing["metadata"]["resourceVersion"] = str(self._resource_version)
        return listing

    def _matches(self, request: rendering.Request, event: Mapping[str, Any]) -> bool:
        meta = (event.get("object") or {}).get("metadata") or {}
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        return bool(
            check(request, request.resource, meta.get("namespace"), meta.get("name"), strict=False)
        )

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        """Watch from ``resourceVersion`` without a gap: kmock subscribes to its event bus only
        after replaying the current objects, losing the changes made in between."""
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        try:
            since = int(request.params.get("resourceVersion", ""))
        except ValueError:
            since = None
        async with self._lock:
            marker = await bus.mark()
            current = [
                {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                for (resource, namespace, name), obj in self.objects.items()
                if resource == request.resource and not obj.deleted
            ]
        try:
            for event in current:
                if self._matches(request, event) and _newer(event, since):
                    yield event
            async for event in bus.stream(since=marker):
                if self._matches(request, event) and _newer(event, since):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _handle(self, request: rendering.Request) -> Any:
        _record(request)
        if request.resource is not None and request.resource.plural is not None:
            async with self._lock:
                await self._mutate(request)
        # Skip KubernetesEmulator._handle (its own, simpler mutations): serve the reactions.
        return await apps.RawHandler._handle(self, request)

    async def _mutate(self, request: rendering.Request) -> None:
        resource = request.resource
        assert resource is not None
        objects = self._objects
        bus = self._buses[resource]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if request.action == enums.action.CREATE:
            data = request.data
            if not isinstance(data, dict):
                raise _error(400, "BadRequest", "the body must be a JSON object")
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            if not meta.get("name"):
                raise _error(422, "Invalid", "metadata.name: Required value")
            namespace = request.namespace or meta.get("namespace")
            if self._namespaced(resource):
                meta["namespace"] = namespace
            else:
                namespace = None
            key = (resource, namespace, meta["name"])
            if key in objects and not objects[key].deleted:
                raise _error(409, "AlreadyExists", f"{resource.plural} {meta['name']!r} exists")
            meta["uid"] = str(uuid.uuid4())
            meta["resourceVersion"] = self._next_version()
            meta["creationTimestamp"] = now
            meta["generation"] = 1
            meta.pop("deletionTimestamp", None)
            if key in objects:
                objects[key].create(data)
            else:
                objects[key] = data
            await bus.put({"type": "ADDED", "object": copy.deepcopy(data)})
            return

        if request.name is None or request.action not in (
            enums.action.UPDATE,
            enums.action.DELETE,
        ):
            return  # reads are served by kmock's fallbacks
        key = (resource, request.namespace, request.name)
        if key not in objects or objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = objects[key]
        current: dict[str, Any] = copy.deepcopy(obj.raw)

        if request.action == enums.action.DELETE:
            if current["metadata"].get("deletionTimestamp"):
                return
            if current["metadata"].get("finalizers"):
                current["metadata"]["deletionTimestamp"] = now
                current["metadata"]["resourceVersion"] = self._next_version()
                obj.create(current)
                await bus.put({"type": "MODIFIED", "object": copy.deepcopy(current)})
            else:
                obj.delete()
                await bus.put({"type": "DELETED", "object": current})
            return

        # PATCH: merge patch (a dict) or JSON patch (a list of operations).
        if isinstance(request.data, dict):
            wanted = (request.data.get("metadata") or {}).get("resourceVersion")
            have = current["metadata"].get("resourceVersion")
            if wanted is not None and str(wanted) != str(have):
                raise _error(
                    409,
                    "Conflict",
                    f"the object has been modified (resourceVersion {have}, not {wanted})",
                )
        try:
            if isinstance(request.data, list):
                patched = jsonpatch.apply_patch(current, request.data, in_place=False)
            elif isinstance(request.data, dict):
                patched = _merge(current, request.data)
            else:
                raise _error(400, "BadRequest", "the patch must be a JSON object or list")
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as error:
            raise _error(422, "Invalid", f"the patch failed: {error}") from None
        if request.subresource == "status":
            new = dict(current, status=patched.get("status"))
            if new["status"] is None:
                new.pop("status")
        else:
            new = patched
            if resource in self.resources and "status" in self.resources[resource].subresources:
                new.pop("status", None)
                if "status" in current:
                    new["status"] = current["status"]
        new["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
        if new == current:
            return  # a no-op: no new version, no watch event
        if new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = int(current["metadata"].get("generation") or 0) + 1
        new["metadata"]["resourceVersion"] = self._next_version()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            obj.create(new)
            obj.delete()
            await bus.put({"type": "DELETED", "object": copy.deepcopy(new)})
            return
        obj.create(new)
        await bus.put({"type": "MODIFIED", "object": copy.deepcopy(new)})


def _newer(event: Mapping[str, Any], since: int | None) -> bool:
    if since is None:
        return True
    version = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    return version is None or int(version) > since


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


# --------------------------------------------------------------------------- a test's kubectl


class Kubectl:
    """What a test does to the cluster, over HTTP like kubectl (not recorded as API calls)."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator

    @staticmethod
    def _path(ref: str, namespace: str | None, name: str | None = None) -> str:
        resource = kmock.resource(ref)
        base = (
            f"/api/{resource.version}"
            if resource.group == ""
            else (f"/apis/{resource.group}/{resource.version}")
        )
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{resource.plural}"
        return base + (f"/{name}" if name else "")

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        # No keep-alive: an idle server-side connection task would outlive the operator, and
        # kopf waits 5 s for the tasks created after it started before it cancels them.
        headers = {"Connection": "close", **kwargs.pop("headers", {})}
        async with self.emulator.request(method, path, headers=headers, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise AssertionError(f"{method} {path}: HTTP {response.status}: {body}")
            return body  # type: ignore[no-any-return]

    async def create(self, ref: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        namespace = (obj.get("metadata") or {}).get("namespace")
        return await self._call("POST", self._path(ref, namespace), json=dict(obj))

    async def patch(
        self, ref: str, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            self._path(ref, namespace, name),
            data=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, ref: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self._call("DELETE", self._path(ref, namespace, name))

    def get(self, ref: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(ref), namespace, name)
        objects = self.emulator.objects
        if key not in objects or objects[key].deleted:
            return None
        return copy.deepcopy(objects[key].raw)

    def list(self, ref: str, namespace: str | None = None) -> list[dict[str, Any]]:
        wanted = kmock.resource(ref)
        return [
            copy.deepcopy(obj.raw)
            for (resource, ns, _name), obj in self.emulator.objects.items()
            if resource == wanted and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def events(self, namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        found = self.list("v1/events", namespace)
        if name is not None:
            found = [e for e in found if e.get("involvedObject", {}).get("name") == name]
        return found

    async def wait_for(
        self, predicate: Any, *, within: float = 30.0, interval: float = 0.05, what: str = ""
    ) -> Any:
        """Poll ``predicate()`` until it returns something truthy; fail after ``within`` s."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
            await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def started_emulator(
    kinds: Iterable[Kind] = CORE_KINDS + SPENDGATE_KINDS,
) -> AsyncIterator[tuple[KubeEmulator, str]]:
    """An emulator serving on a free loopback port: yields it and its base URL."""
    async with KubeEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.declare(kinds)
        if any(kind.ref == CRDS for kind in kinds):
            for resource in crd.RESOURCES:  # installed, as helm install does from crds/
                await Kubectl(emulator).create(CRDS, crd.definition(resource))
        yield emulator, str(server.url).rstrip("/")


__all__ = [
    "ALL_VERBS",
    "API_CALLS",
    "CORE_KINDS",
    "PEERING_KINDS",
    "SPENDGATE_KINDS",
    "ApiCall",
    "Kind",
    "KubeEmulator",
    "Kubectl",
    "non_resource_urls",
    "rbac_rules",
    "started_emulator",
    "write_calls",
]
