"""Money in and out by hand or from Stripe: what ``fund``/``adjust`` return, and their refusals.

``credit.lua`` applies a credit once per funding id and remembers what the id was used for.
A call that repeats the same type and amount replays (``Credit.duplicate``); any other use of
the id raises :class:`IdempotencyConflict`, naming both amounts -- the way Stripe refuses an
idempotency key reused with different parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .money import format_amount

_RECORD_RE = re.compile(r"^(?P<amount>-?\d+)@(?P<entry>[^@]*)(?:@(?P<kind>[a-z]+))?$")


@dataclass(frozen=True)
class Credit:
    duplicate: bool
    balance: int
    entry_id: str


class CreditRefused(Exception):
    """A fund/adjust the ledger refused; nothing changed. ``str()`` says why, with amounts."""

    def __init__(self, customer_id: str, message: str) -> None:
        self.customer_id = customer_id
        super().__init__(message)


class IdempotencyConflict(CreditRefused):
    """The funding id was already used for a different amount or type."""

    def __init__(
        self,
        customer_id: str,
        funding_id: str,
        kind: str,
        amount: int,
        used: UsedId,
    ) -> None:
        self.funding_id = funding_id
        self.used = used
        what = used.kind or "a credit"
        used_for = f"{what} of {signed(used.amount)}" if used.amount is not None else what
        entry = f", ledger entry {used.entry_id}" if used.entry_id else ""
        super().__init__(
            customer_id,
            f"id {funding_id!r} was already used for {used_for} ({customer_id}{entry}); this"
            f" {kind} is {signed(amount)}. An id is applied once: use a new id for a new"
            " change, or repeat the identical call to check it was applied",
        )


class CappedAccount(CreditRefused):
    """A capped (post-paid) customer spends up to a limit per period; a balance does nothing."""

    def __init__(self, customer_id: str, kind: str) -> None:
        super().__init__(
            customer_id,
            f"customer {customer_id!r} is capped (post-paid): it spends up to its limit per"
            f" period and has no prepaid balance, so a {kind} would change nothing it may"
            " spend; change spec.limit of its CustomerBudget instead",
        )


class NegativeBalance(CreditRefused):
    """An adjustment that would take the balance below zero, without ``allow_negative``."""

    def __init__(self, customer_id: str, amount: int, balance: int) -> None:
        self.balance = balance
        super().__init__(
            customer_id,
            f"adjusting {customer_id} by {signed(amount)} would take its balance from"
            f" {format_amount(balance)} to {format_amount(balance + amount)}; a negative"
            " balance must be allowed explicitly (spendgate adjust --allow-negative)",
        )


@dataclass(frozen=True)
class UsedId:
    """What a funding id was used for, from its idempotency record."""

    amount: int | None
    entry_id: str
    kind: str  # "" for records written before the type was kept


def signed(micros: int) -> str:
    return ("+" if micros > 0 else "") + format_amount(micros)


def parse_record(record: str) -> UsedId:
    match = _RECORD_RE.match(record)
    if match is None:
        return UsedId(None, "", "")
    return UsedId(int(match["amount"]), match["entry"], match["kind"] or "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def credit_result(
    kind: str, customer_id: str, funding_id: str, amount: int, result: Sequence[Any]
) -> Credit:
    """``credit.lua``'s reply as a Credit, or the refusal it means."""
    status, balance = _text(result[0]), int(result[1])
    if status == "conflict":
        used = parse_record(_text(result[2]))
        raise IdempotencyConflict(customer_id, funding_id, kind, amount, used)
    if status == "capped":
        raise CappedAccount(customer_id, kind)
    if status == "negative":
        raise NegativeBalance(customer_id, amount, balance)
    if status == "duplicate":
        return Credit(True, balance, parse_record(_text(result[2])).entry_id)
    return Credit(False, balance, _text(result[2]))


__all__ = [
    "CappedAccount",
    "Credit",
    "CreditRefused",
    "IdempotencyConflict",
    "NegativeBalance",
    "UsedId",
    "credit_result",
    "parse_record",
    "signed",
]
