"""Reconciling CustomerBudgets: spec and Secrets into Redis, Redis back into status.

Plain async functions over plain dicts (a budget's body as the API server returns it), so they
are tested without Kubernetes; ``spendgate.operator.handlers`` wires them to kopf.

- :func:`reconcile_budget` validates the spec, reads the referenced Secrets through an injected
  :class:`SecretReader`, checks the claimed ``customerId`` and the named PriceBooks, applies the
  budget with ``ConfigStore.apply_budget`` (the code behind ``spendgate apply``) and computes
  the status from the account in Redis.
- :func:`refresh_budget` is the periodic status refresh; it falls back to a full reconcile when
  the budget is not Ready or Redis lost its configuration.
- :func:`finalize_budget` runs when a budget is deleted: keys revoked, account frozen.

With Stripe enabled, a :class:`StripeHooks` (operator/stripe_wiring.py) links each applied
budget to its Stripe customer (``StripeCustomerConflict`` when another budget holds it), fills
``status.lastStripeSync`` and ``status.exportLagSeconds``, and releases the link on deletion.

Every problem becomes a ``Ready=False`` condition with a reason and a message naming the field
(and a Warning Event); nothing is skipped silently. Redis being unreachable is different: it is
temporary, so it shows as ``Ready=Unknown`` (``RedisUnavailable``) and the caller retries.

**Keys whose Secret is missing or invalid are revoked**, not kept: the rest of the budget is
applied and the budget reports ``SecretMissing``/``SecretInvalid``. Deleting a key's Secret thus
stops that key at once, which is the safe reading of an ambiguous situation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from spendgate.cli import period_start_ms
from spendgate.config_store import BudgetApplied, ConfigConflict, ConfigStore
from spendgate.keys import check_customer_id
from spendgate.ledger import Account
from spendgate.logs import redact
from spendgate.manifests import MIN_KEY_LENGTH, Secret, parse_secret
from spendgate.models import (
    BudgetState,
    CustomerBudget,
    ManifestError,
    Mode,
    parse_resource,
)
from spendgate.money import AmountError, format_amount, parse_amount

from . import conditions as cond
from .alerts import Alert

T = TypeVar("T")

# Suspension sources (fields of the customer's ``susp`` hash in Redis) and what they mean.
SPEC_SOURCE = "spec"  # spec.policy.suspended (written by the configure script)
DELETED_SOURCE = "deleted"  # the CustomerBudget was deleted (ConfigStore.revoke_customer)
PAYMENT_METHOD_SOURCE = "payment-method"  # requirePaymentMethod and none on file (Stripe sync)
SUSPENSION_REASONS = {
    SPEC_SOURCE: "SuspendedInSpec",
    DELETED_SOURCE: "BudgetDeleted",
    PAYMENT_METHOD_SOURCE: "PendingPaymentMethod",
    # Written by the Stripe sync (operator/stripe/mapping.py):
    "payment": "PaymentFailed",
    "subscription": "SubscriptionInactive",
    "dispute": "Disputed",
    "stripe-deleted": "StripeCustomerDeleted",
}

# Ready=False reasons, most fundamental first: the first one present names the condition.
INVALID_SPEC = "InvalidSpec"
CUSTOMER_ID_CONFLICT = "CustomerIdConflict"
API_KEY_CONFLICT = "ApiKeyConflict"
STRIPE_CUSTOMER_CONFLICT = "StripeCustomerConflict"
SECRET_MISSING = "SecretMissing"
SECRET_INVALID = "SecretInvalid"
PRICEBOOK_MISSING = "PriceBookMissing"
CURRENCY_MISMATCH = "CurrencyMismatch"
REDIS_UNAVAILABLE = "RedisUnavailable"
KUBERNETES_UNAVAILABLE = "KubernetesApiUnavailable"
PROBLEM_ORDER = (
    INVALID_SPEC,
    CUSTOMER_ID_CONFLICT,
    API_KEY_CONFLICT,
    SECRET_MISSING,
    SECRET_INVALID,
    PRICEBOOK_MISSING,
    CURRENCY_MISMATCH,
    STRIPE_CUSTOMER_CONFLICT,
)

READY, FUNDED, SUSPENDED = "Ready", "Funded", "Suspended"
ATTENTION_STATES = frozenset(
    {
        BudgetState.exhausted,
        BudgetState.suspended,
        BudgetState.pending_payment_method,
        BudgetState.misconfigured,
    }
)
# The account fields of the status; cleared when the budget does not own its customer.
ACCOUNT_FIELDS = ("balance", "held", "available", "spentThisPeriod", "periodStart", "currency")


# --------------------------------------------------------------------------- interfaces


class SecretReader(Protocol):
    """Reads a v1 Secret (the object as the API returns it); ``None`` if it does not exist.

    Raises :class:`KubernetesUnavailable` when the API cannot answer (retried later).
    """

    def __call__(self, namespace: str, name: str) -> Awaitable[dict[str, Any] | None]: ...


class StripeHooks(Protocol):
    """Stripe's part of reconciling a budget; Redis errors propagate (retried)."""

    async def link(self, spec: Any) -> str | None:
        """Record the budget's Stripe link (or drop it: no ``spec.stripe``); a message when
        another budget holds the Stripe customer (nothing is linked then)."""
        ...

    async def status(self, spec: Any) -> dict[str, Any]:
        """``lastStripeSync`` and ``exportLagSeconds`` (None when not linked)."""
        ...

    async def unlink(self, customer_id: str) -> None:
        """The budget is deleted: release its link once its usage is exported."""
        ...


class RetryableError(Exception):
    """A temporary failure: report it, then try the whole reconciliation again later."""

    reason = "Retrying"

    def __init__(self, message: str, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay_s = delay_s


class RedisUnavailable(RetryableError):
    reason = REDIS_UNAVAILABLE


class KubernetesUnavailable(RetryableError):
    reason = KUBERNETES_UNAVAILABLE


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the budget."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclass
class Reconciled:
    """What a reconciliation found: the new status, what to tell, and whether to retry."""

    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    error: RetryableError | None = None
    applied: BudgetApplied | None = None
    customer_id: str | None = None

    def patch(self, old_status: Mapping[str, Any] | None) -> dict[str, Any]:
        return status_patch(old_status, self.status)


class KeyedLocks:
    """One asyncio.Lock per key (customer id): two budgets claiming one customer never race."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def forget(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]


# --------------------------------------------------------------------------- small helpers


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


def parse_budget(body: Mapping[str, Any]) -> CustomerBudget:
    """The budget as a model; raises ManifestError listing every bad field."""
    manifest = {
        key: plain(body[key]) for key in ("apiVersion", "kind", "metadata", "spec") if key in body
    }
    meta = manifest.get("metadata") or {}
    # Only the identity: server-filled metadata (managedFields, ...) is of no interest here.
    manifest["metadata"] = {
        k: meta[k] for k in ("name", "namespace", "generation", "uid") if k in meta
    }
    resource = parse_resource(manifest, f"CustomerBudget {object_ref(body)}")
    if not isinstance(resource, CustomerBudget):
        raise ManifestError(object_ref(body), [f"kind: {resource.kind} is not a CustomerBudget"])
    return resource


def raw_customer_id(body: Mapping[str, Any]) -> str | None:
    """``spec.customerId`` if it is a valid id, even when the rest of the spec is invalid."""
    value = (body.get("spec") or {}).get("customerId")
    try:
        return check_customer_id(value) if isinstance(value, str) else None
    except ValueError:
        return None


async def redis_call(awaitable: Awaitable[T]) -> T:
    """Await a Redis operation; unreachable Redis (or any Redis error) becomes retryable."""
    try:
        return await awaitable
    except (RedisError, RedisClusterException, OSError) as error:
        text = redact(str(error)) or type(error).__name__
        raise RedisUnavailable(f"Redis is unavailable: {type(error).__name__}: {text}") from None


def _decimal(micros: int) -> str:
    return format_amount(micros)


def _micros(text: Any) -> int | None:
    if not isinstance(text, str | int):
        return None
    try:
        return parse_amount(text, allow_negative=True)
    except AmountError:
        return None


def _ms_to_iso(ms: int) -> str:
    return cond.now_iso(datetime.fromtimestamp(ms / 1000, UTC))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``old`` into ``new`` at the top level (``None`` deletes).

    Only changed fields are written, so a periodic refresh of an idle budget costs no API write.
    """
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if plain(old.get(key)) != value:
            patch[key] = value
    return patch


# --------------------------------------------------------------------------- Secrets


@dataclass
class KeyResolution:
    keys: dict[str, str] = field(repr=False, default_factory=dict)  # key name -> plaintext
    problems: list[Problem] = field(default_factory=list)
    unusable: set[str] = field(default_factory=set)  # key names revoked because of a problem


async def resolve_keys(budget: CustomerBudget, read_secret: SecretReader) -> KeyResolution:
    """Read the Secrets of the enabled ``spec.apiKeys``; plaintext keys by name and problems.

    Messages name the field, the Secret and the data key, never the key material.
    """
    namespace = budget.metadata.namespace
    result = KeyResolution()
    secrets: dict[str, Secret | Problem | None] = {}
    for index, ref in enumerate(budget.spec.api_keys):
        if ref.disabled:
            continue  # a revoked key needs no material; its Secret may be gone
        path = f"spec.apiKeys[{index}].secretRef"
        name = ref.secret_ref.name
        if name not in secrets:
            raw = await read_secret(namespace, name)
            if raw is None:
                secrets[name] = None
            else:
                try:
                    secrets[name] = parse_secret(plain(raw), f"Secret {namespace}/{name}")
                except ManifestError as error:
                    secrets[name] = Problem(SECRET_INVALID, "; ".join(error.problems))
        secret = secrets[name]
        problem: Problem | None = None
        if secret is None:
            problem = Problem(SECRET_MISSING, f"{path}: Secret {namespace}/{name} not found")
        elif isinstance(secret, Problem):
            problem = Problem(
                SECRET_INVALID, f"{path}: Secret {namespace}/{name}: {secret.message}"
            )
        else:
            value = secret.data.get(ref.secret_ref.key)
            if value is None:
                problem = Problem(
                    SECRET_MISSING,
                    f"{path}: Secret {namespace}/{name} has no key {ref.secret_ref.key!r}",
                )
            else:
                reason = _bad_key(value)
                if reason:
                    problem = Problem(
                        SECRET_INVALID,
                        f"{path}: key {ref.secret_ref.key!r} of Secret {namespace}/{name} {reason}",
                    )
                else:
                    result.keys[ref.name] = value
        if problem is not None:
            result.problems.append(problem)
            result.unusable.add(ref.name)
    return result


def _bad_key(value: str) -> str | None:
    """Why a key is not usable (same rules as ``spendgate apply``), or None."""
    if not value:
        return "is empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "contains whitespace or control characters (a trailing newline?)"
    if len(value) < MIN_KEY_LENGTH:
        return f"is {len(value)} characters; API keys need at least {MIN_KEY_LENGTH}"
    return None


# --------------------------------------------------------------------------- PriceBooks


async def check_pricebooks(budget: CustomerBudget, store: ConfigStore) -> list[Problem]:
    """The PriceBooks named in ``spec.priceBooks`` exist (are configured) and share the currency.

    Redis is asked, not the API server: what the sidecars will price with is what counts, and a
    PriceBook that exists but is invalid is not configured either.
    """
    problems = []
    namespace = budget.metadata.namespace
    for index, name in enumerate(budget.spec.price_books):
        ref = f"{namespace}/{name}"
        pricebook = await redis_call(store.get_pricebook(ref))
        if pricebook is None:
            problems.append(
                Problem(
                    PRICEBOOK_MISSING,
                    f"spec.priceBooks[{index}]: PriceBook {ref} is not configured"
                    " (it does not exist, or it is invalid: see its Ready condition)",
                )
            )
        elif pricebook.currency != budget.spec.currency:
            problems.append(
                Problem(
                    CURRENCY_MISMATCH,
                    f"spec.priceBooks[{index}]: PriceBook {ref} charges in {pricebook.currency},"
                    f" the budget is in {budget.spec.currency}; requests it prices are refused",
                )
            )
    return problems


# --------------------------------------------------------------------------- state and status


def current_spent(account: Account, now_ms: int) -> int:
    """Spent this period; Redis resets it lazily at the next request after a period ends."""
    if account.period and account.period_start_ms != period_start_ms(account.period, now_ms):
        return 0
    return account.spent


def budget_state(account: Account, now_ms: int) -> tuple[BudgetState, list[str]]:
    """Active, Exhausted, Suspended or PendingPaymentMethod, with the reasons for humans."""
    if account.suspensions:
        reasons = [f"{source}: {why}" for source, why in sorted(account.suspensions.items())]
        if set(account.suspensions) == {PAYMENT_METHOD_SOURCE}:
            return BudgetState.pending_payment_method, reasons
        return BudgetState.suspended, reasons
    spent = current_spent(account, now_ms)
    currency = account.currency or ""
    cap_reached = [
        f"spend cap reached: {_decimal(spent)} of {_decimal(account.limit)} {currency}"
        f" spent this {account.period}"
    ]
    if account.mode == Mode.capped:
        # Capped: exhausted when the cap is spent; in-flight holds alone do not count.
        return (
            (BudgetState.exhausted, cap_reached)
            if spent >= account.limit
            else (
                BudgetState.active,
                [],
            )
        )
    if _available(account, spent) <= 0:  # prepaid: available = balance - held (and the cap)
        if account.limit and spent + account.held >= account.limit:
            return BudgetState.exhausted, cap_reached
        return BudgetState.exhausted, [
            f"no balance available: balance {_decimal(account.balance)} {currency},"
            f" held {_decimal(account.held)}"
        ]
    return BudgetState.active, []


def account_fields(account: Account, now_ms: int) -> dict[str, Any]:
    spent = current_spent(account, now_ms)
    start = period_start_ms(account.period, now_ms) if account.period else 0
    return {
        "currency": account.currency,
        "balance": _decimal(account.balance),
        "held": _decimal(account.held),
        "available": _decimal(_available(account, spent)),
        "spentThisPeriod": _decimal(spent),
        "periodStart": _ms_to_iso(start) if account.period else None,
    }


def _available(account: Account, spent: int) -> int:
    """``Account.available`` with ``spent`` of the current period (see current_spent)."""
    if account.mode == Mode.capped:
        return account.limit - spent - account.held
    available = account.balance - account.held
    if account.limit:
        available = min(available, account.limit - spent - account.held)
    return available


def account_conditions(
    account: Account,
    state: BudgetState,
    reasons: list[str],
    generation: int | None,
    now: datetime,
) -> list[cond.Condition]:
    currency = account.currency or ""
    if state is BudgetState.exhausted:
        capped = "spend cap" in (reasons[0] if reasons else "")
        funded = cond.make_condition(
            FUNDED,
            "False",
            "SpendCapReached" if capped else "BalanceExhausted",
            "; ".join(reasons),
            generation=generation,
            now=now,
        )
    elif account.mode == Mode.capped:
        funded = cond.make_condition(
            FUNDED,
            "True",
            "WithinSpendCap",
            f"{_decimal(account.limit - current_spent(account, _ms(now)))} {currency} left of"
            f" the {_decimal(account.limit)} {currency} cap this {account.period}",
            generation=generation,
            now=now,
        )
    else:
        funded = cond.make_condition(
            FUNDED,
            "True",
            "BalanceAvailable",
            f"{_decimal(_available(account, current_spent(account, _ms(now))))} {currency}"
            " available",
            generation=generation,
            now=now,
        )
    if account.suspensions:
        sources = sorted(account.suspensions)
        reason = "MultipleReasons"
        if len(sources) == 1:
            reason = SUSPENSION_REASONS.get(sources[0], "Suspended")
        suspended = cond.make_condition(
            SUSPENDED, "True", reason, "; ".join(reasons), generation=generation, now=now
        )
    else:
        suspended = cond.make_condition(
            SUSPENDED, "False", "NotSuspended", "", generation=generation, now=now
        )
    return [funded, suspended]


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    alerted: int  # highest threshold alerted (0: none)
    baseline: dict[str, str] | None  # prepaid: {"balance", "charged"} after the last top-up
    crossed: int | None = None  # a threshold crossed now (alert!)
    used: int = 0  # micro-units used of ``base``
    base: int = 0


def evaluate_thresholds(
    budget: CustomerBudget, account: Account, old_status: Mapping[str, Any], now_ms: int
) -> Thresholds:
    """Which alert threshold (percent) the budget has reached, and whether that is news.

    *Capped*: percent of ``limit`` spent this period. *Prepaid*: percent spent of the balance
    the customer had after the last top-up (the *baseline*); money coming in (a top-up, a
    credit, a larger opening balance: ``balance + charged`` grows) starts a new baseline. A
    prepaid budget with a period ``limit`` alerts on whichever of the two is further along.

    ``status.alertedThreshold`` remembers what was already alerted, so restarts and periodic
    refreshes never alert twice; when usage falls below it (a top-up, a new period) it falls
    too, and the thresholds can alert again.
    """
    thresholds = budget.spec.policy.alert_thresholds
    alerted = old_status.get("alertedThreshold") or 0
    alerted = alerted if isinstance(alerted, int) else 0
    spent = current_spent(account, now_ms)
    baseline: dict[str, str] | None = None
    candidates: list[tuple[int, int]] = []  # (used, base)
    if account.mode == Mode.capped:
        candidates.append((spent, account.limit))
    else:
        old = old_status.get("alertBaseline") or {}
        b, c = _micros(old.get("balance")), _micros(old.get("charged"))
        total_in = account.balance + account.charged
        if b is None or c is None or total_in > b + c:
            b, c = account.balance, account.charged  # money came in: count afresh
        baseline = {"balance": _decimal(b), "charged": _decimal(c)}
        if b > 0:
            candidates.append((account.charged - c, b))
        if account.limit:
            candidates.append((spent, account.limit))
    if not candidates:
        return Thresholds(alerted, baseline)
    used, base = max(candidates, key=lambda ub: (ub[0] * 100 // ub[1]) if ub[1] > 0 else 0)
    reached = max((t for t in thresholds if used * 100 >= t * base), default=0)
    if reached > alerted:
        return Thresholds(reached, baseline, crossed=reached, used=used, base=base)
    return Thresholds(min(alerted, reached), baseline, used=used, base=base)


def threshold_message(budget: CustomerBudget, account: Account, t: Thresholds) -> str:
    currency = budget.spec.currency
    percent = t.used * 100 // t.base if t.base else 0
    who = f"CustomerBudget {budget.ref} (customer {budget.spec.customer_id})"
    if account.mode == Mode.capped or (account.limit and t.base == account.limit):
        return (
            f"{who} crossed {t.crossed}% of its spend cap: {_decimal(t.used)} of"
            f" {_decimal(t.base)} {currency} spent this {account.period} ({percent}%)"
        )
    return (
        f"{who} crossed {t.crossed}% of its balance: {_decimal(t.used)} of {_decimal(t.base)}"
        f" {currency} used since the last top-up ({percent}%), {_decimal(account.balance)}"
        f" {currency} left"
    )


# --------------------------------------------------------------------------- reconcile


def _ready_from(
    problems: Sequence[Problem], generation: int | None, now: datetime, summary: str
) -> cond.Condition:
    if not problems:
        return cond.make_condition(
            READY, "True", "Configured", summary, generation=generation, now=now
        )
    ordered = sorted(problems, key=lambda p: PROBLEM_ORDER.index(p.reason))
    return cond.make_condition(
        READY,
        "False",
        ordered[0].reason,
        "; ".join(p.message for p in ordered),
        generation=generation,
        now=now,
    )


def _summary(budget: CustomerBudget, keys: int) -> str:
    """What is configured: the stable message of ``Ready=True``."""
    spec = budget.spec
    parts = [f"customer {spec.customer_id}", f"{_plural(keys, 'API key')}"]
    if spec.mode is Mode.capped and spec.limit is not None:
        parts.append(f"capped at {_decimal(spec.limit)} {spec.currency} per {spec.period}")
    else:
        opening = _decimal(spec.balance or 0)
        parts.append(f"prepaid, opening balance {opening} {spec.currency}")
    return ", ".join(parts)


def _changes(applied: BudgetApplied) -> str:
    """What this apply changed, for the ``Configured`` Event."""
    parts = []
    if applied.balance_change:
        sign = "+" if applied.balance_change > 0 else ""
        parts.append(f"balance {sign}{_decimal(applied.balance_change)}")
    if applied.keys_removed:
        parts.append(f"{_plural(applied.keys_removed, 'key')} revoked")
    return f" ({', '.join(parts)})" if parts else ""


def _transition_events(
    old_status: Mapping[str, Any], status: Mapping[str, Any], *, configured_message: str | None
) -> list[EventSpec]:
    """Events for changes of the Ready condition and of the state."""
    events: list[EventSpec] = []
    old_conditions = old_status.get("conditions") or []
    ready = cond.find(status.get("conditions"), READY)
    if ready is not None and cond.transitioned(old_conditions, dict(ready)):
        if ready["status"] == "True":
            events.append(EventSpec("Normal", "Configured", configured_message or ready["message"]))
        else:
            events.append(EventSpec("Warning", ready["reason"], ready["message"]))
    elif configured_message is not None and ready is not None and ready["status"] == "True":
        events.append(EventSpec("Normal", "Configured", configured_message))
    old_state, new_state = old_status.get("state"), status.get("state")
    if new_state is not None and new_state != old_state:
        why = "; ".join(status.get("stateReasons") or [])
        arrow = f"{old_state} → {new_state}" if old_state else f"{new_state}"
        kind: Literal["Normal", "Warning"] = (
            "Warning" if BudgetState(new_state) in ATTENTION_STATES else "Normal"
        )
        events.append(
            EventSpec(kind, "StateChanged", f"state {arrow}" + (f": {why}" if why else ""))
        )
    return events


def _state_alert(budget: CustomerBudget, old_state: Any, status: Mapping[str, Any]) -> Alert | None:
    new_state = status.get("state")
    if new_state == old_state or new_state is None or old_state is None:
        return None  # no change, or the first observation of a new budget
    if BudgetState.misconfigured.value in (new_state, old_state):
        return None  # configuration problems are Events and conditions, not money alerts
    why = "; ".join(status.get("stateReasons") or [])
    warning = BudgetState(new_state) in ATTENTION_STATES
    return Alert(
        kind="StateChanged",
        budget=budget.ref,
        customer_id=budget.spec.customer_id,
        severity="warning" if warning else "info",
        message=(
            f"CustomerBudget {budget.ref} (customer {budget.spec.customer_id}) is now {new_state}"
            f" (was {old_state})" + (f": {why}" if why else "")
        ),
        fields={
            "state": new_state,
            "previousState": old_state,
            "reasons": list(status.get("stateReasons") or []),
            "balance": status.get("balance"),
            "available": status.get("available"),
            "spentThisPeriod": status.get("spentThisPeriod"),
            "currency": budget.spec.currency,
        },
    )


def _with_account(
    budget: CustomerBudget,
    account: Account,
    old_status: Mapping[str, Any],
    status: dict[str, Any],
    now: datetime,
) -> tuple[list[EventSpec], list[Alert]]:
    """Fill the account fields, state, Funded/Suspended and thresholds into ``status``."""
    now_ms = _ms(now)
    generation = budget.metadata.generation
    state, reasons = budget_state(account, now_ms)
    status.update(account_fields(account, now_ms))
    status["customerId"] = budget.spec.customer_id
    status["state"] = state.value
    status["stateReasons"] = reasons
    status["conditions"] = cond.set_conditions(
        status.get("conditions"), account_conditions(account, state, reasons, generation, now)
    )
    thresholds = evaluate_thresholds(budget, account, old_status, now_ms)
    status["alertedThreshold"] = thresholds.alerted
    status["alertBaseline"] = thresholds.baseline
    events: list[EventSpec] = []
    alerts: list[Alert] = []
    if thresholds.crossed is not None:
        message = threshold_message(budget, account, thresholds)
        events.append(EventSpec("Warning", "ThresholdCrossed", message))
        alerts.append(
            Alert(
                kind="ThresholdCrossed",
                budget=budget.ref,
                customer_id=budget.spec.customer_id,
                message=message,
                fields={
                    "threshold": thresholds.crossed,
                    "used": _decimal(thresholds.used),
                    "of": _decimal(thresholds.base),
                    "balance": status["balance"],
                    "available": status["available"],
                    "spentThisPeriod": status["spentThisPeriod"],
                    "currency": budget.spec.currency,
                    "state": state.value,
                },
            )
        )
    alert = _state_alert(budget, old_status.get("state"), status)
    if alert is not None:
        alerts.append(alert)
    return events, alerts


def _clear_account(status: dict[str, Any]) -> None:
    for name in ACCOUNT_FIELDS:
        status[name] = None
    status["alertBaseline"] = None
    status["alertedThreshold"] = None
    status["activeKeys"] = None
    status["conditions"] = [
        c for c in status.get("conditions") or [] if c.get("type") not in (FUNDED, SUSPENDED)
    ]


async def reconcile_budget(
    body: Mapping[str, Any],
    *,
    store: ConfigStore,
    read_secret: SecretReader,
    locks: KeyedLocks | None = None,
    now: datetime | None = None,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    """Apply a CustomerBudget to Redis and compute its status. Never raises for bad input.

    Returns the status to write and the Events/alerts to send; ``error`` is set when the
    attempt must be retried (Redis or the Kubernetes API unreachable).
    """
    now = now or datetime.now(UTC)
    old_status: dict[str, Any] = plain(body.get("status") or {})
    status: dict[str, Any] = {
        key: old_status.get(key)
        for key in (
            "conditions",
            "state",
            "stateReasons",
            "customerId",
            "alertedThreshold",
            "alertBaseline",
            "activeKeys",
            *ACCOUNT_FIELDS,
        )
        if key in old_status
    }
    generation = generation_of(body)
    try:
        budget = parse_budget(body)
    except ManifestError as error:
        problems = [Problem(INVALID_SPEC, problem) for problem in error.problems]
        status["conditions"] = cond.set_condition(
            status.get("conditions"), _ready_from(problems, generation, now, "")
        )
        status["state"] = BudgetState.misconfigured.value
        status["stateReasons"] = [
            "the spec is invalid; the last valid configuration (if any) stays in effect"
        ]
        status["observedGeneration"] = generation
        events = _transition_events(old_status, status, configured_message=None)
        return Reconciled(status, events, customer_id=raw_customer_id(body))

    customer = budget.spec.customer_id
    lock = locks(customer) if locks is not None else None
    try:
        if lock is not None:
            async with lock:
                return await _reconcile_parsed(
                    budget, old_status, status, store, read_secret, now, stripe
                )
        return await _reconcile_parsed(budget, old_status, status, store, read_secret, now, stripe)
    except RetryableError as error:
        status["conditions"] = cond.set_condition(
            status.get("conditions"),
            cond.make_condition(
                READY, "Unknown", error.reason, error.message, generation=generation, now=now
            ),
        )
        events = _transition_events(old_status, status, configured_message=None)
        return Reconciled(status, events, error=error, customer_id=customer)


async def _reconcile_parsed(
    budget: CustomerBudget,
    old_status: dict[str, Any],
    status: dict[str, Any],
    store: ConfigStore,
    read_secret: SecretReader,
    now: datetime,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    spec = budget.spec
    generation = budget.metadata.generation
    problems: list[Problem] = []

    owner = await redis_call(store.owner_of(spec.customer_id))
    if owner is not None and owner != budget.ref:
        problems.append(
            Problem(
                CUSTOMER_ID_CONFLICT,
                f"spec.customerId: {spec.customer_id!r} is already claimed by CustomerBudget"
                f" {owner}; each customer needs exactly one budget (this one is not applied)",
            )
        )
        return _unapplied(budget, old_status, status, problems, now)

    resolution = await resolve_keys(budget, read_secret)
    problems += resolution.problems
    problems += await check_pricebooks(budget, store)
    effective = budget
    if resolution.unusable:
        effective = budget.model_copy(
            update={
                "spec": spec.model_copy(
                    update={
                        "api_keys": [
                            key.model_copy(update={"disabled": True})
                            if key.name in resolution.unusable
                            else key
                            for key in spec.api_keys
                        ]
                    }
                )
            }
        )
    try:
        applied = await redis_call(store.apply_budget(effective, resolution.keys))
    except ConfigConflict as error:
        reason = CUSTOMER_ID_CONFLICT if "customerId" in str(error) else API_KEY_CONFLICT
        problems.append(Problem(reason, str(error)))
        return _unapplied(budget, old_status, status, problems, now)
    if not spec.policy.require_payment_method:
        await redis_call(store.ledger.unsuspend(spec.customer_id, PAYMENT_METHOD_SOURCE))
    if stripe is not None:
        conflict = await redis_call(stripe.link(spec))
        if conflict is not None:
            problems.append(
                Problem(STRIPE_CUSTOMER_CONFLICT, f"spec.stripe.customerId: {conflict}")
            )
        status.update(await redis_call(stripe.status(spec)))
    account = await redis_call(store.ledger.account(spec.customer_id))

    summary = _summary(budget, applied.keys_added)
    status["conditions"] = cond.set_condition(
        status.get("conditions"), _ready_from(problems, generation, now, summary)
    )
    status["observedGeneration"] = generation
    status["activeKeys"] = applied.keys_added
    events_acc, alerts = _with_account(budget, account, old_status, status, now)
    changed = (
        old_status.get("observedGeneration") != generation
        or applied.balance_change != 0
        or applied.keys_removed > 0
    )
    detail = summary + _changes(applied)
    events = _transition_events(old_status, status, configured_message=detail if changed else None)
    return Reconciled(
        status, events + events_acc, alerts, applied=applied, customer_id=spec.customer_id
    )


def _unapplied(
    budget: CustomerBudget,
    old_status: dict[str, Any],
    status: dict[str, Any],
    problems: list[Problem],
    now: datetime,
) -> Reconciled:
    """Nothing was applied: report why; never show another budget's account."""
    generation = budget.metadata.generation
    status["conditions"] = cond.set_condition(
        status.get("conditions"), _ready_from(problems, generation, now, "")
    )
    _clear_account(status)
    status["customerId"] = budget.spec.customer_id
    status["state"] = BudgetState.misconfigured.value
    status["stateReasons"] = ["the budget is not applied: see the Ready condition"]
    status["observedGeneration"] = generation
    events = _transition_events(old_status, status, configured_message=None)
    return Reconciled(status, events, customer_id=budget.spec.customer_id)


async def refresh_budget(
    body: Mapping[str, Any],
    *,
    store: ConfigStore,
    read_secret: SecretReader,
    locks: KeyedLocks | None = None,
    now: datetime | None = None,
    stripe: StripeHooks | None = None,
) -> Reconciled:
    """The periodic status refresh from Redis (balances, state, thresholds).

    A budget that is not Ready, whose spec changed since it was applied, or whose customer is
    no longer configured in Redis (a Redis that lost its data) is reconciled in full instead.
    """
    now = now or datetime.now(UTC)
    old_status: dict[str, Any] = plain(body.get("status") or {})
    full = not cond.is_true(old_status.get("conditions"), READY) or old_status.get(
        "observedGeneration"
    ) != generation_of(body)
    budget: CustomerBudget | None = None
    if not full:
        try:
            budget = parse_budget(body)
        except ManifestError:
            full = True
    if full or budget is None:
        return await reconcile_budget(
            body, store=store, read_secret=read_secret, locks=locks, now=now, stripe=stripe
        )
    try:
        owner = await redis_call(store.owner_of(budget.spec.customer_id))
        account = await redis_call(store.ledger.account(budget.spec.customer_id))
        linked = await redis_call(stripe.status(budget.spec)) if stripe is not None else {}
    except RetryableError as error:
        status = dict(old_status)
        status["conditions"] = cond.set_condition(
            status.get("conditions"),
            cond.make_condition(
                READY,
                "Unknown",
                error.reason,
                error.message,
                generation=budget.metadata.generation,
                now=now,
            ),
        )
        return Reconciled(
            status,
            _transition_events(old_status, status, configured_message=None),
            error=error,
            customer_id=budget.spec.customer_id,
        )
    if owner != budget.ref or not account.configured:
        return await reconcile_budget(
            body, store=store, read_secret=read_secret, locks=locks, now=now, stripe=stripe
        )
    status = dict(old_status)
    status.update(linked)
    events, alerts = _with_account(budget, account, old_status, status, now)
    events = _transition_events(old_status, status, configured_message=None) + events
    return Reconciled(status, events, alerts, customer_id=budget.spec.customer_id)


async def finalize_budget(
    body: Mapping[str, Any], *, store: ConfigStore, stripe: StripeHooks | None = None
) -> list[EventSpec]:
    """The budget is being deleted: revoke its keys and freeze its account, at once.

    The account and its ledger stream stay in Redis: requests in flight still settle (and are
    recorded), and usage not yet exported to Stripe is kept; the exporter trims the stream
    after exporting. A re-created budget for the same customer picks the account up again.
    Raises RedisUnavailable (the finalizer stays until Redis is back).
    """
    ref = object_ref(body)
    customer = raw_customer_id(body)
    if customer is None:
        return [EventSpec("Normal", "Deleted", "no valid customerId: nothing was configured")]
    owner = await redis_call(store.owner_of(customer))
    if owner != ref:
        holder = f"CustomerBudget {owner}" if owner else "no budget"
        return [
            EventSpec(
                "Normal",
                "Deleted",
                f"customer {customer} is claimed by {holder}, not by this one: nothing to revoke",
            )
        ]
    removed = await redis_call(store.revoke_customer(customer, f"CustomerBudget {ref} was deleted"))
    if stripe is not None:
        await redis_call(stripe.unlink(customer))
    return [
        EventSpec(
            "Normal",
            "Revoked",
            f"customer {customer}: {_plural(removed, 'API key')} revoked and the account"
            " suspended; ledger entries not yet exported are kept",
        )
    ]


# --------------------------------------------------------------------------- PriceBooks


def secret_names(body: Mapping[str, Any]) -> set[str]:
    """Names of the Secrets a budget body references (for the Secret index), even if invalid."""
    names = set()
    for key in (body.get("spec") or {}).get("apiKeys") or []:
        if isinstance(key, Mapping):
            ref = key.get("secretRef")
            if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
                names.add(ref["name"])
    return names


def pricebook_names(body: Mapping[str, Any]) -> set[str]:
    names = (body.get("spec") or {}).get("priceBooks") or []
    return {name for name in names if isinstance(name, str)}


__all__ = [
    "Account",
    "EventSpec",
    "KeyResolution",
    "KeyedLocks",
    "KubernetesUnavailable",
    "Problem",
    "Reconciled",
    "RedisUnavailable",
    "RetryableError",
    "SecretReader",
    "StripeHooks",
    "Thresholds",
    "budget_state",
    "check_pricebooks",
    "evaluate_thresholds",
    "finalize_budget",
    "parse_budget",
    "pricebook_names",
    "reconcile_budget",
    "refresh_budget",
    "resolve_keys",
    "secret_names",
    "status_patch",
]
