"""Redis key names: the one place that knows the layout.

Every key of one customer carries the hash tag ``{customerId}`` so a script touching them all
runs on one slot, on a single Redis, Sentinel or Redis Cluster alike.
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
CONFIG_CHANNEL = f"{PREFIX}:config"  # pub/sub: invalidation messages
SWEEP_LOCK = f"{PREFIX}:sweep"  # string: the sidecar sweeping expired holds this interval
STRIPE_EXPORT_CURSORS = f"{PREFIX}:stripe:export"  # hash: customerId -> last exported entry id

_CUSTOMER_RE = re.compile(CUSTOMER_ID_PATTERN)


def check_customer_id(customer_id: str) -> str:
    if not isinstance(customer_id, str) or not _CUSTOMER_RE.match(customer_id):
        raise ValueError(
            f"{customer_id!r} is not a valid customer id (letters, digits, '.', '_', '-';"
            " at most 63 characters)"
        )
    return customer_id


@dataclass(frozen=True)
class CustomerKeys:
    customer_id: str

    @property
    def tag(self) -> str:
        return f"{PREFIX}:{{{self.customer_id}}}"

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

    def script_keys(self, idempotency_key: str) -> list[str]:
        """KEYS for the ledger scripts, in the order ``prelude.lua`` names them."""
        return [
            self.cfg,
            self.acct,
            self.holds,
            self.deadlines,
            self.rate,
            self.suspensions,
            self.ledger,
            idempotency_key,
        ]


def for_customer(customer_id: str) -> CustomerKeys:
    return CustomerKeys(check_customer_id(customer_id))


def hash_api_key(api_key: str) -> str:
    """The only form of an API key that leaves the process: its SHA-256, hex."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
