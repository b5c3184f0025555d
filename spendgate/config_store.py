"""Configuration in Redis: budgets, API key hashes and PriceBooks, with change notifications.

The operator (and ``spendgate apply`` outside Kubernetes) is the only writer; sidecars read it
and listen on ``sg:config`` to refresh their caches within a second of a change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import keys as rkeys
from .keys import decode_ancestors, hash_api_key
from .ledger import Ledger
from .models import CustomerBudget, PriceBook, PriceBookSpec
from .tree_moves import MoveRefused, TreeMoves
from .tree_rules import Level, gather_levels, place, subtree_depth_problem


class ConfigConflict(ValueError):
    """Applying this configuration would break an invariant (e.g. a customer id claimed twice)."""


class TreeConflict(ConfigConflict):
    """The budget's place in its tree breaks a rule (``spendgate.tree_rules``): its parent is
    missing, a cycle, too deep, another currency, a cap above the parent's, a move whose holds
    in flight do not fit the new parent."""


@dataclass(frozen=True)
class KeyOwner:
    customer_id: str
    key_name: str

    def encode(self) -> str:
        return f"{self.customer_id}\t{self.key_name}"

    @classmethod
    def decode(cls, raw: bytes | str) -> KeyOwner:
        text = raw.decode() if isinstance(raw, bytes) else raw
        customer_id, _, key_name = text.partition("\t")
        return cls(customer_id, key_name)


@dataclass(frozen=True)
class BudgetApplied:
    customer_id: str
    keys_added: int
    keys_removed: int
    balance_change: int


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key_index(customer_id: str) -> str:
    return f"{rkeys.for_customer(customer_id).tag}:keyhashes"


class ConfigStore:
    def __init__(self, redis: Any, ledger: Ledger | None = None) -> None:
        self.redis = redis
        self.ledger = ledger or Ledger(redis)
        self.moves = TreeMoves(redis, self.ledger)

    async def publish(self, message: str) -> None:
        await self.redis.publish(rkeys.CONFIG_CHANNEL, message)

    # ----------------------------------------------------------------- budgets

    async def owner_of(self, customer_id: str) -> str | None:
        owner = await self.redis.hget(rkeys.CUSTOMERS, customer_id)
        return _text(owner) if owner is not None else None

    async def apply_budget(
        self, budget: CustomerBudget, api_keys: dict[str, str], *, force: bool = False
    ) -> BudgetApplied:
        """Configure a customer and replace its key hashes.

        ``api_keys`` maps key names of ``spec.apiKeys`` to the plaintext keys read from their
        Secrets; only hashes are stored. Disabled keys are revoked.
        """
        spec = budget.spec
        owner = await self.owner_of(spec.customer_id)
        if owner is not None and owner != budget.ref and not force:
            raise ConfigConflict(
                f"customerId {spec.customer_id!r} is already claimed by CustomerBudget {owner};"
                f" {budget.ref} cannot use it too"
            )
        await self.moves.resume()  # a move that did not finish (of it, above it, anywhere)
        ancestors = await self.check_place(budget)
        wanted: dict[str, KeyOwner] = {}
        for key in spec.api_keys:
            if key.disabled:
                continue
            plaintext = api_keys.get(key.name)
            if not plaintext:
                raise ConfigConflict(f"spec.apiKeys[{key.name}]: no key material was provided")
            digest = hash_api_key(plaintext)
            existing = await self.redis.hget(rkeys.API_KEYS, digest)
            if existing is not None:
                holder = KeyOwner.decode(existing)
                if holder.customer_id != spec.customer_id:
                    raise ConfigConflict(
                        f"spec.apiKeys[{key.name}]: the same key is already in use by another"
                        " customer; every customer needs its own keys"
                    )
            wanted[digest] = KeyOwner(spec.customer_id, key.name)

        parent = ancestors[0] if ancestors else None
        recorded = await self.recorded_place(spec.customer_id)
        if recorded != ancestors or await self.redis.exists(rkeys.MOVES):
            try:  # new in a tree, moved, or a move is running: placed under the moves' lock
                ancestors = await self.moves.place(spec.customer_id, parent)
            except MoveRefused as error:
                raise TreeConflict(str(error)) from None
        await self.redis.hset(rkeys.CUSTOMERS, spec.customer_id, budget.ref)
        await self.redis.hset(rkeys.BUDGET_REFS, budget.ref, spec.customer_id)
        balance_change = await self.ledger.configure(spec, parent=parent)
        await self.ledger.unsuspend(spec.customer_id, "deleted")  # a re-created budget
        removed = await self._replace_keys(spec.customer_id, wanted)
        await self.publish(f"customer:{spec.customer_id}")
        return BudgetApplied(spec.customer_id, len(wanted), removed, balance_change)

    # ----------------------------------------------------------------- trees

    async def applied_level(self, ref: str) -> Level | None:
        """The tree rules' view of the applied budget ``namespace/name``, None if not applied."""
        indexed = await self.redis.hget(rkeys.BUDGET_REFS, ref)
        customer_id = _text(indexed) if indexed is not None else None
        if customer_id is None or await self.owner_of(customer_id) != ref:
            # Applied before the index existed (or a stale entry): look through every owner.
            owners = await self.list_customers()
            customer_id = next((cid for cid, owner in owners.items() if owner == ref), None)
        if customer_id is None:
            return None
        ancestors = decode_ancestors(await self.redis.hget(rkeys.TREE, customer_id))
        cfg = await self.redis.hmget(
            rkeys.for_customer(customer_id, ancestors).cfg, "currency", "limit", "period"
        )
        currency, limit, period = (_text(v) if v is not None else "" for v in cfg)
        return Level(ref, customer_id, currency, int(limit or 0), period, None, ancestors)

    async def recorded_place(self, customer_id: str) -> tuple[str, ...] | None:
        """A customer's ancestors as Redis has them; None if it has no account anywhere."""
        return await self.moves.recorded(customer_id)

    async def check_place(self, budget: CustomerBudget) -> tuple[str, ...]:
        """The budget's ancestors (parent first) by the tree rules, against Redis."""
        levels = await gather_levels([budget], {}, self.applied_level)
        placement = place(budget, levels.get)
        problems = list(placement.problems)
        if not problems:
            problem = await self.move_problem(budget.spec.customer_id, placement.ancestors)
            problems += [problem] if problem else []
        if problems:
            raise TreeConflict("; ".join(problems))
        return placement.ancestors

    async def move_problem(self, customer_id: str, ancestors: tuple[str, ...]) -> str | None:
        """For a budget applied elsewhere: whether its subtree fits under ``ancestors``."""
        recorded = await self.recorded_place(customer_id)
        if recorded is None or recorded == ancestors:
            return None
        return subtree_depth_problem(customer_id, ancestors, await self.moves.subtree(customer_id))

    async def _replace_keys(self, customer_id: str, wanted: dict[str, KeyOwner]) -> int:
        index = _key_index(customer_id)
        current = {_text(digest) for digest in await self.redis.smembers(index)}
        stale = current - set(wanted)
        if wanted:
            await self.redis.hset(
                rkeys.API_KEYS, mapping={digest: o.encode() for digest, o in wanted.items()}
            )
            await self.redis.sadd(index, *wanted)
        if stale:
            await self.redis.hdel(rkeys.API_KEYS, *stale)
            await self.redis.srem(index, *stale)
        for digest in stale | (set(wanted) - current):
            await self.publish(f"key:{digest}")
        return len(stale)

    async def revoke_customer(self, customer_id: str, reason: str) -> int:
        """Remove every key of a customer and freeze its account (budget deleted)."""
        removed = await self._replace_keys(customer_id, {})
        await self.ledger.suspend(customer_id, "deleted", reason)
        ref = await self.owner_of(customer_id)
        await self.redis.hdel(rkeys.CUSTOMERS, customer_id)
        if ref is not None:
            await self.redis.hdel(rkeys.BUDGET_REFS, ref)
        await self.publish(f"customer:{customer_id}")
        return removed

    async def list_customers(self) -> dict[str, str]:
        raw = await self.redis.hgetall(rkeys.CUSTOMERS)
        return {_text(k): _text(v) for k, v in raw.items()}

    # ----------------------------------------------------------------- keys

    async def lookup_key(self, digest: str) -> KeyOwner | None:
        raw = await self.redis.hget(rkeys.API_KEYS, digest)
        return KeyOwner.decode(raw) if raw is not None else None

    async def all_keys(self) -> dict[str, KeyOwner]:
        keys: dict[str, KeyOwner] = {}
        async for digest, raw in self.redis.hscan_iter(rkeys.API_KEYS, count=1000):
            keys[_text(digest)] = KeyOwner.decode(raw)
        return keys

    # ----------------------------------------------------------------- price books

    async def apply_pricebook(self, pricebook: PriceBook) -> None:
        payload = json.dumps(pricebook.spec.to_manifest(), sort_keys=True)
        await self.redis.hset(rkeys.PRICEBOOKS, pricebook.ref, payload)
        await self.publish(f"pricebook:{pricebook.ref}")

    async def delete_pricebook(self, ref: str) -> None:
        await self.redis.hdel(rkeys.PRICEBOOKS, ref)
        await self.publish(f"pricebook:{ref}")

    async def get_pricebook(self, ref: str) -> PriceBookSpec | None:
        raw = await self.redis.hget(rkeys.PRICEBOOKS, ref)
        if raw is None:
            return None
        return PriceBookSpec.model_validate(json.loads(raw))

    async def list_pricebooks(self) -> list[str]:
        return sorted(_text(ref) for ref in await self.redis.hkeys(rkeys.PRICEBOOKS))
