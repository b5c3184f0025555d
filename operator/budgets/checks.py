"""What a CustomerBudget refers to, checked: its spec, its API keys' Secrets, its PriceBooks.

Each problem found is a :class:`Problem` carrying the ``Ready=False`` reason it reports;
:func:`ready_condition` turns the problems of a reconciliation into the Ready condition (the
most fundamental reason names it, every message is kept). Messages name the field, never key
material.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from spendgate.config_store import ConfigStore
from spendgate.currency_check import currency_problems
from spendgate.keys import check_customer_id
from spendgate.manifests import MIN_KEY_LENGTH, Secret, parse_secret
from spendgate.models import CustomerBudget, ManifestError, parse_resource

from ..kube import conditions as cond
from ..kube.conditions import INVALID_SPEC, READY
from ..kube.objects import object_ref, plain
from ..kube.retry import redis_call

# Ready=False reasons, most fundamental first: the first one present names the condition.
CUSTOMER_ID_CONFLICT = "CustomerIdConflict"
API_KEY_CONFLICT = "ApiKeyConflict"
INVALID_TREE = "InvalidTree"  # spec.parent: missing, cycle, depth, currency, cap, no room to move
STRIPE_CUSTOMER_CONFLICT = "StripeCustomerConflict"
SECRET_MISSING = "SecretMissing"
SECRET_INVALID = "SecretInvalid"
PRICEBOOK_MISSING = "PriceBookMissing"
CURRENCY_MISMATCH = "CurrencyMismatch"
PROBLEM_ORDER = (
    INVALID_SPEC,
    CUSTOMER_ID_CONFLICT,
    INVALID_TREE,
    API_KEY_CONFLICT,
    SECRET_MISSING,
    SECRET_INVALID,
    PRICEBOOK_MISSING,
    CURRENCY_MISMATCH,
    STRIPE_CUSTOMER_CONFLICT,
)


class SecretReader(Protocol):
    """Reads a v1 Secret (the object as the API returns it); ``None`` if it does not exist.

    Raises :class:`KubernetesUnavailable` when the API cannot answer (retried later).
    """

    def __call__(self, namespace: str, name: str) -> Awaitable[dict[str, Any] | None]: ...


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def ready_condition(
    problems: Sequence[Problem], generation: int | None, now: datetime, summary: str
) -> cond.Condition:
    """``Ready=True`` (``Configured``, ``summary``) without problems, else ``Ready=False``."""
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


# --------------------------------------------------------------------------- the body


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
    """The PriceBooks named in ``spec.priceBooks`` exist (are configured) and share the currency;
    a budget that names none is in a currency at least one configured PriceBook charges in
    (:func:`spendgate.currency_check.currency_problems`, as ``spendgate apply`` checks it).

    Redis is asked, not the API server: what the sidecars will price with is what counts, and a
    PriceBook that exists but is invalid is not configured either.
    """
    if not budget.spec.price_books:
        currencies: dict[str, str] = {}
        for ref in await redis_call(store.list_pricebooks()):
            pricebook = await redis_call(store.get_pricebook(ref))
            if pricebook is not None:
                currencies[ref] = pricebook.currency
        return [Problem(CURRENCY_MISMATCH, text) for text in currency_problems(budget, currencies)]
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


__all__ = [
    "KeyResolution",
    "Problem",
    "SecretReader",
    "check_pricebooks",
    "parse_budget",
    "pricebook_names",
    "raw_customer_id",
    "ready_condition",
    "resolve_keys",
    "secret_names",
]
