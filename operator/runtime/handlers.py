"""kopf handlers: thin wiring of :mod:`..budgets.reconcile` and :mod:`..pricebooks.reconcile`
to the cluster.

:func:`build_registry` returns a ``kopf.OperatorRegistry`` holding every handler, bound to one
:class:`Runtime` (Redis, the API client, alerting, the Stripe hooks when Stripe is enabled).
Nothing registers into kopf's global registry, so tests run operators side by side with other
credentials. Reconciliations are counted and timed (:func:`.metrics.counted`).

=======================  ===================================================================
handler                  does
=======================  ===================================================================
login                    the credentials of the operator's one API client
                         (``KubeClient.login``: in-cluster, else a kubeconfig), loaded again
                         on each kopf login (a 401); a ``login`` override (tests) configures it
startup ``configure``    production kopf settings (:func:`.kopf_settings.configure_kopf`)
cleanup                  ``Runtime.cleanups`` (the leader's other work stops, Lease released)
index ``budget_refs``    ``("Secret"|"PriceBook", namespace, name)`` → budgets using it
CustomerBudget
  field ``resume``       :func:`..budgets.abnormal.resume_budget`: the resume annotation
  create/update/resume   :func:`..budgets.reconcile.reconcile_budget`; status patch, Events, alerts
  timer ``status``       :func:`..budgets.reconcile.refresh_budget` every ``status_interval_s``
  delete (finalizer)     :func:`..budgets.reconcile.finalize_budget`: keys revoked, account frozen
PriceBook
  create/update/resume   :func:`..pricebooks.reconcile.reconcile_pricebook`
  delete (finalizer)     :func:`..pricebooks.reconcile.finalize_pricebook`
v1 Secret event          budgets referencing the Secret are annotated, so kopf reconciles
                         them at once (a rotated key takes effect in about a second)
=======================  ===================================================================

Temporary trouble (Redis, the API) raises ``kopf.TemporaryError``: kopf writes the status
(``Ready=Unknown``, reason ``RedisUnavailable``) and retries after ``retry_delay_s``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from spendgate.config_store import ConfigStore

from ..alerts.sender import AlertSender
from ..budgets import abnormal as budget_abnormal
from ..budgets import checks as budget_checks
from ..budgets import reconcile as budgets
from ..budgets.locks import KeyedLocks
from ..budgets.reconcile import Reconciled
from ..budgets.stripe_hooks import StripeHooks
from ..kube import conditions as cond
from ..kube.client import BUDGETS, GROUP, PRICEBOOKS, REFRESH_ANNOTATION, VERSION, KubeClient
from ..kube.conditions import READY
from ..kube.objects import EventSpec
from ..kube.retry import RetryableError
from ..kube.status_writer import StatusWriter, post_events
from ..pricebooks import reconcile as pricebooks
from . import metrics
from .kopf_settings import configure_kopf
from .settings import OperatorSettings

log = logging.getLogger("spendgate.operator")

# ``resume.spendgate.dev/abnormal-spend`` as a field path (its dots are not separators)
RESUME_FIELD = ("metadata", "annotations", budget_abnormal.RESUME_ANNOTATION)
BUDGET_REFS = "budget_refs"  # the index's id, and the kwarg name handlers receive it by

LoginFn = Callable[..., Any]


@dataclass
class Runtime:
    """What the handlers share: created once per operator by ``main.run``."""

    settings: OperatorSettings
    store: ConfigStore
    kube: KubeClient
    status: StatusWriter
    alerts: AlertSender | None = None
    stripe: StripeHooks | None = None  # with Stripe enabled (operator/stripe/wiring.py)
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # uid -> monotonic time of the last full reconcile (the timer re-reads Secrets sometimes)
    last_full: dict[str, float] = field(default_factory=dict)
    # uid -> (started, finished or None) of the latest reconcile handler run; the status timer
    # stays out of its way, so an older status never overwrites a newer one
    reconciling: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    stopping: bool = False  # set when kopf runs its cleanup: no more work is started
    # awaited by kopf's cleanup, e.g. main's leader election (its Lease released)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


async def _post(
    runtime: Runtime, body: Mapping[str, Any], events: Iterable[EventSpec], action: str
) -> None:
    await post_events(runtime.kube, body, events, action=action, instance=runtime.status.instance)


def _held_back(runtime: Runtime, uid: str) -> kopf.TemporaryError:
    delay = runtime.status.retry_in(uid) or runtime.settings.retry_delay_s
    return kopf.TemporaryError("the API server refused the status; retrying", delay=delay)


async def _bounded(settings: OperatorSettings, work: Awaitable[Any], what: str) -> Any:
    try:
        async with asyncio.timeout(settings.reconcile_timeout_s):
            return await work
    except TimeoutError:
        raise kopf.TemporaryError(
            f"{what} did not finish in {settings.reconcile_timeout_s:g}s",
            delay=settings.retry_delay_s,
        ) from None


async def _unless_stopped(work: Awaitable[Any], stopped: kopf.DaemonStopped) -> Any:
    """``work``'s result; None if kopf stops the timer first (the object is being deleted, or
    the operator exits): ``work`` is then cancelled. kopf waits for a timer in the middle of
    its handler before it removes the finalizer, and rechecks only every
    ``background.cancellation_polling`` seconds; a refresh that outlives the object is stale."""
    task = asyncio.ensure_future(work)

    async def until_stopped() -> None:
        await stopped.wait()

    stop = asyncio.ensure_future(until_stopped())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if stopped:
            return None
        raise


def _retry(settings: OperatorSettings, error: RetryableError) -> kopf.TemporaryError:
    delay = error.delay_s if error.delay_s is not None else settings.retry_delay_s
    return kopf.TemporaryError(error.message, delay=delay)


async def touch_budgets(runtime: Runtime, namespace: str, names: Iterable[str], cause: str) -> None:
    """Annotate budgets so kopf reconciles them now; bounded retries, then logged."""
    for name in sorted(set(names)):
        for attempt in range(3):
            try:
                await runtime.kube.annotate(BUDGETS, namespace, name, {REFRESH_ANNOTATION: cause})
                break
            except RetryableError as error:
                if attempt == 2:
                    log.warning(
                        "could not trigger a reconcile; the periodic resync will catch up",
                        extra={
                            "budget": f"{namespace}/{name}",
                            "cause": cause,
                            "error": error.message,
                        },
                    )
                else:
                    await asyncio.sleep(0.2 * (attempt + 1))


def _refs(index: kopf.Index[Any, Any] | None, key: tuple[str, str, str]) -> list[str]:
    if index is None:
        return []
    return [str(name) for name in index.get(key, [])]


async def log_in(runtime: Runtime, login: LoginFn | None, /, **kwargs: Any) -> Any:
    """The credentials of the operator's one API client (:meth:`KubeClient.login`: in-cluster,
    else a kubeconfig), loaded again; or, with ``login`` (tests), what it returns, which the
    client then takes. kopf's login handler, and the leader election's before kopf runs."""
    if login is None:
        return runtime.kube.login()
    info = login(**{"logger": log, **kwargs})
    if inspect.isawaitable(info):
        info = await info
    if info is not None:
        runtime.kube.configure(info)
    return info


# --------------------------------------------------------------------------- registry


def build_registry(runtime: Runtime, *, login: LoginFn | None = None) -> kopf.OperatorRegistry:
    """All handlers of the operator in a fresh registry. kopf logs in with the credentials of
    ``runtime.kube`` (:meth:`KubeClient.login`); ``login`` (tests) replaces them, and the
    client takes what it returns."""
    registry = kopf.OperatorRegistry()
    settings = runtime.settings

    @kopf.on.login(registry=registry)
    async def login_handler(**kwargs: Any) -> Any:
        return await log_in(runtime, login, **kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, runtime.settings)
        log.info("kopf configured; its handlers start", extra={"pod": runtime.settings.pod_name})

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        # kopf may still run a handler or two after this (workers draining their queues):
        # ``stopping`` makes them give up before they start any work. First the leader's
        # other work stops and the Lease is released (kopf's handlers have stopped: a standby
        # may take over now), then the clients close: their idle connections would hold
        # kopf's exit for 5 s (kopf waits for every task created after it started).
        runtime.stopping = True
        for stop in runtime.cleanups:
            await stop()
        if runtime.alerts is not None:
            await runtime.alerts.aclose()
        await runtime.kube.aclose()

    def not_stopping() -> None:
        if runtime.stopping:
            raise kopf.TemporaryError("the operator is stopping", delay=settings.retry_delay_s)

    # ------------------------------------------------------------------ index

    @kopf.index(GROUP, VERSION, BUDGETS, id=BUDGET_REFS, registry=registry)
    def budget_refs(
        namespace: str, name: str, body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str, str], str]:
        refs = {("Secret", namespace, s): name for s in budget_checks.secret_names(body)}
        refs |= {("PriceBook", namespace, p): name for p in budget_checks.pricebook_names(body)}
        return refs

    # ------------------------------------------------------------------ CustomerBudgets

    def for_budget(step: Callable[..., Awaitable[Reconciled]], body: kopf.Body) -> Any:
        """``step`` (reconcile or refresh) of one budget with the runtime's clients."""
        return step(
            body,
            store=runtime.store,
            read_secret=runtime.kube.read_secret,
            locks=runtime.locks,
            stripe=runtime.stripe,
        )

    async def publish(result: Reconciled, body: kopf.Body, action: str) -> bool:
        """Status, then (once it is written: they follow from it) Events and alerts."""
        lag = result.status.get("exportLagSeconds")
        if isinstance(lag, int):
            metrics.BUDGET_EXPORT_LAG.observe(lag)
        changes = result.patch(body.get("status"))
        if not await runtime.status.write(BUDGETS, body, changes, action=action):
            return False
        await _post(runtime, body, result.events, action)
        if runtime.alerts is not None:
            for alert in result.alerts:
                runtime.alerts.dispatch(alert)
        if result.error is not None:
            raise _retry(settings, result.error)
        return True

    # Before ``reconcile`` (kopf runs a change's handlers in this order): the status it then
    # computes shows the suspension lifted.
    @kopf.on.field(GROUP, VERSION, BUDGETS, id="resume", field=RESUME_FIELD, registry=registry)
    async def resume_abnormal(body: kopf.Body, **_: Any) -> None:
        not_stopping()
        try:
            now_ms = int(time.time() * 1000)
            events = await budget_abnormal.resume_budget(body, runtime.store, now_ms)
            await _post(runtime, body, events, "Resume")
        except RetryableError as error:
            raise _retry(settings, error) from None

    @kopf.on.resume(GROUP, VERSION, BUDGETS, id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, BUDGETS, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, BUDGETS, id="reconcile", registry=registry)
    async def reconcile_budget(body: kopf.Body, uid: str, **_: Any) -> None:
        not_stopping()
        started = time.monotonic()
        runtime.reconciling[uid] = (started, None)
        try:
            with metrics.counted("CustomerBudget") as outcome:
                result = await _bounded(
                    settings,
                    for_budget(budgets.reconcile_budget, body),
                    "reconciling the budget",
                )
                outcome.append(metrics.outcome_of(result.status, result.error))
        finally:
            runtime.reconciling[uid] = (started, time.monotonic())
        if result.error is None:
            runtime.last_full[uid] = started
        if not await publish(result, body, "Reconcile"):
            raise _held_back(runtime, uid)

    def reconcile_overlaps(uid: str, since: float) -> bool:
        """A reconcile ran recently, runs now, or started after ``since``: its status wins."""
        started, finished = runtime.reconciling.get(uid, (0.0, 0.0))
        quiet = min(2.0, settings.status_interval_s / 2)
        return finished is None or started >= since or time.monotonic() - finished < quiet

    @kopf.timer(
        GROUP,
        VERSION,
        BUDGETS,
        id="status",
        registry=registry,
        interval=settings.status_interval_s,
        initial_delay=settings.status_interval_s,
    )
    async def refresh_status(
        body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        if runtime.stopping:
            # kopf can (re)spawn a timer while it shuts down, after it stopped the others; it
            # would run until kopf cancels leftover tasks 5 s later. End it now, doing nothing.
            raise asyncio.CancelledError()
        started = time.monotonic()
        if reconcile_overlaps(uid, started):
            return  # its status is fresher than ours would be
        last = runtime.last_full.get(uid)
        due = last is None or started - last >= settings.resync_interval_s
        reconcile = budgets.reconcile_budget if due else budgets.refresh_budget
        work = for_budget(reconcile, body)
        result = await _unless_stopped(
            _bounded(settings, work, "refreshing the budget status"), stopped
        )
        if result is None:
            return  # the budget is being deleted, or the operator stops
        if due and result.error is None:
            runtime.last_full[uid] = started
        if reconcile_overlaps(uid, started):
            return  # a reconcile started meanwhile; what it writes is newer
        await publish(result, body, "Refresh")  # refused: reported, and tried on a later tick

    @kopf.on.delete(GROUP, VERSION, BUDGETS, id="finalize", registry=registry)
    async def finalize_budget(body: kopf.Body, uid: str, **_: Any) -> None:
        not_stopping()
        try:
            events = await _bounded(
                settings,
                budgets.finalize_budget(body, store=runtime.store, stripe=runtime.stripe),
                "revoking the budget",
            )
        except RetryableError as error:
            message = f"cannot revoke yet, retrying: {error.message}"
            await _post(runtime, body, [EventSpec("Warning", error.reason, message)], "Finalize")
            raise _retry(settings, error) from None
        await _post(runtime, body, events, "Finalize")
        runtime.status.forget(uid)
        runtime.last_full.pop(uid, None)
        runtime.reconciling.pop(uid, None)
        customer = budget_checks.raw_customer_id(body)
        if customer is not None:
            runtime.locks.forget(customer)

    # ------------------------------------------------------------------ Secrets

    @kopf.on.event("", "v1", "secrets", id="secret_changed", registry=registry)
    async def secret_changed(
        event: Mapping[str, Any], namespace: str, name: str, body: kopf.Body, **kwargs: Any
    ) -> None:
        if event.get("type") is None or runtime.stopping:
            return  # the initial listing: budgets are reconciled on resume anyway
        names = _refs(kwargs.get(BUDGET_REFS), ("Secret", namespace, name))
        if names:
            version = body.get("metadata", {}).get("resourceVersion", "")
            await touch_budgets(
                runtime, namespace, names, f"Secret/{name}@{version}:{event['type']}"
            )

    # ------------------------------------------------------------------ PriceBooks

    @kopf.on.resume(GROUP, VERSION, PRICEBOOKS, id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, PRICEBOOKS, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, PRICEBOOKS, id="reconcile", registry=registry)
    async def reconcile_pricebook(
        body: kopf.Body, uid: str, namespace: str, name: str, **kwargs: Any
    ) -> None:
        not_stopping()
        with metrics.counted("PriceBook") as outcome:
            result = await _bounded(
                settings,
                pricebooks.reconcile_pricebook(body, store=runtime.store),
                "reconciling the PriceBook",
            )
            outcome.append(metrics.outcome_of(result.status, result.error))
        old = body.get("status") or {}
        if not await runtime.status.write(PRICEBOOKS, body, result.patch(old), action="Reconcile"):
            raise _held_back(runtime, uid)
        await _post(runtime, body, result.events, "Reconcile")
        if result.error is not None:
            raise _retry(settings, result.error)
        ready_changed = cond.status_of(old.get("conditions"), READY) != cond.status_of(
            result.status.get("conditions"), READY
        )
        currency_changed = result.currency is not None and old.get("currency") != result.currency
        if ready_changed or currency_changed:
            names = _refs(kwargs.get(BUDGET_REFS), ("PriceBook", namespace, name))
            version = body.get("metadata", {}).get("resourceVersion", "")
            await touch_budgets(runtime, namespace, names, f"PriceBook/{name}@{version}")

    @kopf.on.delete(GROUP, VERSION, PRICEBOOKS, id="finalize", registry=registry)
    async def finalize_pricebook(body: kopf.Body, namespace: str, name: str, **kwargs: Any) -> None:
        not_stopping()
        try:
            events = await _bounded(
                settings,
                pricebooks.finalize_pricebook(body, store=runtime.store),
                "removing the PriceBook",
            )
        except RetryableError as error:
            raise _retry(settings, error) from None
        await _post(runtime, body, events, "Finalize")
        names = _refs(kwargs.get(BUDGET_REFS), ("PriceBook", namespace, name))
        await touch_budgets(runtime, namespace, names, f"PriceBook/{name}:deleted")

    return registry


__all__ = [
    "Runtime",
    "build_registry",
    "touch_budgets",
]
