"""Redis key names: the one place that knows the layout.

Every key of one customer carries the hash tag ``{customerId}`` so a script touching them all
runs on one slot, on a single Redis, Sentinel or Redis Cluster alike. A budget in a tree (one
with a parent) carries its root's tag instead, ``sg:{root}@customerId:...``, so that one script
reaches every level of the tree; the root keeps its own ``sg:{root}:...`` keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .models import CUSTOMER_ID_PATTERN

PREFIX = "sg"
API_KEYS = f"{PREFIX}:keys"  # hash: sha256(api key) -> "customerId\tkeyName"
PRICEBOOKS = f"{PREFIX}:pricebooks"  # hash: "namespace/name" -> PriceBook spec JSON
CUSTOMERS = f"{PREFIX}:customers"  # hash: customerId -> "namespace/name" of its budget
BUDGET_REFS = f"{PREFIX}:budgetrefs"  # hash: "namespace/name" -> customerId (CUSTOMERS reversed)
CONFIG_CHANNEL = f"{PREFIX}:config"  # pub/sub: invalidation messages
SWEEP_LOCK = f"{PREFIX}:sweep"  # string: the sidecar sweeping expired holds this interval
TREE = f"{PREFIX}:tree"  # hash: customerId of a budget with a parent -> "parent,...,root"
MAX_TREE_DEPTH = 4  # levels, the root included
MOVES = f"{PREFIX}:moves"  # hash: customerId of a budget being moved -> its move plan (JSON)
MOVE_LOCK = f"{PREFIX}:moving"  # string (lock): the one process moving or placing a budget
STRIPE_EXPORT_CURSORS = f"{PREFIX}:stripe:export"  # hash: customerId -> last exported entry id

_CUSTOMER_RE = re.compile(CUSTOMER_ID_PATTERN)


def check_customer_id(customer_id: str) -> str:
    if not isinstance(customer_id, str) or not _CUSTOMER_RE.match(customer_id):
        raise ValueError(
            f"{customer_id!r} is not a valid customer id (letters, digits, '.', '_', '-';"
            " at most 63 characters)"
        )
    return customer_id


def encode_ancestors(ancestors: tuple[str, ...]) -> str:
    return ",".join(ancestors)


def decode_ancestors(raw: bytes | str | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    text = raw.decode() if isinstance(raw, bytes) else raw
    return tuple(part for part in text.split(",") if part)


@dataclass(frozen=True)
class CustomerKeys:
    customer_id: str
    root: str | None = None  # the tree's root, for a budget with a parent

    @property
    def tag(self) -> str:
        if self.root is not None and self.root != self.customer_id:
            return f"{PREFIX}:{{{self.root}}}@{self.customer_id}"
        return f"{PREFIX}:{{{self.customer_id}}}"

    def level_keys(self) -> list[str]:
        """The 7 keys a script reads of an ancestor level, in ``prelude.lua``'s order."""
        return [
            self.cfg,
            self.acct,
            self.holds,
            self.deadlines,
            self.rate,
            self.suspensions,
            self.ledger,
        ]

    @property
    def cfg(self) -> str:
        return f"{self.tag}:cfg"

    @property
    def acct(self) -> str:
        return f"{self.tag}:acct"

    @property
    def holds(self) -> str:
        return f"{self.tag}:holds"

    @property
    def deadlines(self) -> str:
        return f"{self.tag}:holddl"

    @property
    def rate(self) -> str:
        return f"{self.tag}:rl"

    @property
    def suspensions(self) -> str:
        return f"{self.tag}:susp"

    @property
    def ledger(self) -> str:
        return f"{self.tag}:ledger"

    def request(self, request_id: str) -> str:
        return f"{self.tag}:req:{request_id}"

    def funding(self, funding_id: str) -> str:
        return f"{self.tag}:fund:{funding_id}"

    def refusals(self, hour_ms: int) -> str:
        """Refusal counts of one hour (``spendgate.accounting.refusals``)."""
        return f"{self.tag}:refusals:{hour_ms}"

    @property
    def unreconciled(self) -> str:
        """Charges the sidecars could not settle yet (``spendgate.accounting.settlement``)."""
        return f"{self.tag}:unreconciled"

    def script_keys(self, idempotency_key: str) -> list[str]:
        """KEYS for the ledger scripts, in the order ``prelude.lua`` names them."""
        return [*self.level_keys(), idempotency_key]


def for_customer(customer_id: str, ancestors: tuple[str, ...] = ()) -> CustomerKeys:
    """The keys of a budget; ``ancestors`` (parent first, root last) for one in a tree."""
    root = check_customer_id(ancestors[-1]) if ancestors else None
    return CustomerKeys(check_customer_id(customer_id), root)


def tree_script_keys(
    customer_id: str, ancestors: tuple[str, ...], idempotency: str | None = None
) -> tuple[CustomerKeys, list[str]]:
    """KEYS for a ledger script on a budget and every ancestor (parent first, root last).

    ``idempotency`` is the suffix of the idempotency key (``req:<id>``, ``fund:<id>``)."""
    own = for_customer(customer_id, ancestors)
    idem = f"{own.tag}:{idempotency}" if idempotency is not None else own.cfg
    keys = own.script_keys(idem)
    for index, ancestor in enumerate(ancestors):
        keys += for_customer(ancestor, ancestors[index + 1 :]).level_keys()
    return own, keys


def hash_api_key(api_key: str) -> str:
    """The only form of an API key that leaves the process: its SHA-256, hex."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
