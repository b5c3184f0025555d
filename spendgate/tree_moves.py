"""Moving a budget (and its subtree) to another place: another parent, out of its tree (a new
root), or into a tree. The algorithm and its guarantees are in docs/ledger.md ("Moving a
budget").

A move inside one tree keeps every key name (``sg:{root}@id``): one script in the tree's slot
re-points the budget and carries its subtree's holds from the ancestors it leaves to the ones
it joins, then ``sg:tree`` is updated. A move to another root renames every key of the
subtree (another hash slot), so it is a sequence of steps recorded in ``sg:moves``: fence the
old place, copy, arrive (holds added at the new ancestors, fence lifted), switch ``sg:tree``,
depart (holds dropped at the old ancestors, old keys deleted, tombstones left). Each step is
idempotent and the record names the last one done, so running the move again after a crash
at any point finishes it (``resume``) with no money lost or counted twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import keys as rkeys
from .keys import decode_ancestors, encode_ancestors, for_customer
from .ledger import IDEMPOTENCY_TTL_MS, Ledger, _load_script
from .money import format_amount
from .tree_rules import subtree_depth_problem

log = logging.getLogger("spendgate.tree_moves")

MOVE_LOCK_S = 60  # a move holds its lock at most this long (a crashed process's expires)
MOVE_LOCK_WAIT_S = 10  # how long another apply waits for a running move to finish
STEPS = ("planned", "fenced", "copied", "arrived", "switched")  # then the record is deleted
MOVE_SCRIPTS = ("within", "room", "fence", "arrive", "depart")
# Keys under a budget's tree tag that move with it, besides its 7 level keys: the ledger's
# trimmed totals, and its idempotency keys (requests and funding).
# Keys of a budget beyond the scripts' level keys: the ledger's trim base, the counters of
# spendgate.accounting (unreconciled charges, abnormal-spend state and buckets) and, found by
# SCAN, idempotency keys and hourly refusal counts.
EXTRA_SUFFIXES = ("ledger:base", "unreconciled", "abnormal", "spend:m", "spend:h")
SCANNED_PATTERNS = ("req:*", "fund:*", "refusals:*")


class MoveRefused(ValueError):
    """The move would break a cap at the new place; nothing was changed."""


@dataclass(frozen=True)
class MovePlan:
    moved: str  # the budget whose parent changes
    old: dict[str, tuple[str, ...]]  # every budget of the subtree -> its ancestors before
    new: dict[str, tuple[str, ...]]  # ... and after
    step: str = "planned"

    @property
    def within(self) -> bool:
        """Same root before and after: no key changes its name."""
        before, after = self.old[self.moved], self.new[self.moved]
        return bool(before) and bool(after) and before[-1] == after[-1]

    @property
    def leaving(self) -> tuple[str, ...]:
        return tuple(a for a in self.old[self.moved] if a not in self.new[self.moved])

    @property
    def joining(self) -> tuple[str, ...]:
        return tuple(a for a in self.new[self.moved] if a not in self.old[self.moved])

    def encode(self) -> str:
        return json.dumps(
            {"moved": self.moved, "old": self.old, "new": self.new, "step": self.step},
            sort_keys=True,
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> MovePlan:
        data = json.loads(raw)
        return cls(
            data["moved"],
            {k: tuple(v) for k, v in data["old"].items()},
            {k: tuple(v) for k, v in data["new"].items()},
            data["step"],
        )


@dataclass
class MoveResult:
    moved: tuple[str, ...]  # the budgets whose place changed (the moved one first)
    holds: int = 0  # holds in flight carried to the new place
    held: int = 0  # their total, micro-units
    resumed: bool = False
    steps: list[str] = field(default_factory=list)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ancestor_keys(path: tuple[str, ...], names: tuple[str, ...], *, cfg: bool) -> list[str]:
    """cfg? acct holds of each of ``names``, ancestors on ``path`` (parent first)."""
    keys: list[str] = []
    for name in names:
        at = path.index(name)
        level = for_customer(name, path[at + 1 :])
        keys += [level.cfg, level.acct, level.holds] if cfg else [level.acct, level.holds]
    return keys


class TreeMoves:
    def __init__(self, redis: Any, ledger: Ledger) -> None:
        self.redis = redis
        self.ledger = ledger
        self._scripts = {
            name: redis.register_script(_load_script(f"move_{name}", "move_common"))
            for name in MOVE_SCRIPTS
        }

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        result = await self._scripts[name](keys=keys, args=args)
        return [_text(item) if isinstance(item, bytes) else item for item in result]

    def _now(self) -> int:
        return self.ledger.clock() if self.ledger.clock else 0

    # ----------------------------------------------------------------- planning

    async def subtree(self, customer_id: str) -> dict[str, tuple[str, ...]]:
        """The budgets below ``customer_id`` (any depth) -> their ancestors, from sg:tree."""
        below: dict[str, tuple[str, ...]] = {}
        async for cid, raw in self.redis.hscan_iter(rkeys.TREE, count=1000):
            ancestors = decode_ancestors(raw)
            if customer_id in ancestors:
                below[_text(cid)] = ancestors
        return below

    async def plan(self, customer_id: str, old: tuple[str, ...], new: tuple[str, ...]) -> MovePlan:
        before, after = {customer_id: old}, {customer_id: new}
        for cid, ancestors in (await self.subtree(customer_id)).items():
            at = ancestors.index(customer_id)
            before[cid] = ancestors
            after[cid] = (*ancestors[: at + 1], *new)
        return MovePlan(customer_id, before, after)

    # ----------------------------------------------------------------- running

    async def recorded(self, customer_id: str) -> tuple[str, ...] | None:
        """A budget's ancestors as Redis has them; None if it has no account anywhere."""
        recorded = await self.redis.hget(rkeys.TREE, customer_id)
        if recorded is not None:
            return decode_ancestors(recorded)
        exists = await self.redis.exists(for_customer(customer_id).acct)
        return () if exists else None

    async def place(self, customer_id: str, parent: str | None) -> tuple[str, ...]:
        """Put ``customer_id`` under ``parent`` (None: a root or single budget), moving it with
        its subtree if it has an account elsewhere; returns its ancestors (parent first).

        Under the moves' lock, so the place is read when no move runs: a budget's place comes
        from its parent's, which a move of an ancestor may be changing."""
        async with self._lock():
            await self._resume()
            recorded = await self.recorded(customer_id)
            new: tuple[str, ...] = ()
            if parent is not None:
                new = (parent, *decode_ancestors(await self.redis.hget(rkeys.TREE, parent)))
            if recorded is None:  # a new budget: its place is recorded before its keys exist
                if new:
                    await self.redis.hset(rkeys.TREE, customer_id, encode_ancestors(new))
                return new
            if recorded == new:
                return new
            if customer_id in new:
                raise MoveRefused(f"spec.parent: budgets form a cycle through {customer_id!r}")
            plan = await self.plan(customer_id, recorded, new)
            problem = subtree_depth_problem(
                customer_id, new, {cid: anc for cid, anc in plan.old.items() if cid != customer_id}
            )
            if problem:
                raise MoveRefused(problem)
            await self._check_room(plan)
            await self.redis.hset(rkeys.MOVES, customer_id, plan.encode())
            await self._run(plan)
            return new

    async def resume(self) -> list[MoveResult]:
        """Finish every move recorded in sg:moves (interrupted: a crash, a lost connection)."""
        if not await self.redis.exists(rkeys.MOVES):
            return []
        async with self._lock():
            return await self._resume()

    async def _resume(self) -> list[MoveResult]:
        results = []
        for raw in (await self.redis.hgetall(rkeys.MOVES)).values():
            plan = MovePlan.decode(raw)
            log.info("resuming a move", extra={"customer": plan.moved, "step": plan.step})
            result = await self._run(plan)
            result.resumed = True
            results.append(result)
        return results

    def _lock(self) -> Any:
        """One move at a time (its steps are idempotent, not safe to interleave, and a budget's
        place depends on its ancestors'); a crashed holder's lock expires after
        ``MOVE_LOCK_S``."""
        return self.redis.lock(
            rkeys.MOVE_LOCK, timeout=MOVE_LOCK_S, blocking_timeout=MOVE_LOCK_WAIT_S
        )

    async def pending(self) -> list[str]:
        """The budgets whose move is recorded and not finished."""
        return sorted(_text(cid) for cid in await self.redis.hkeys(rkeys.MOVES))

    async def _run(self, plan: MovePlan) -> MoveResult:
        result = MoveResult(tuple(plan.old))
        steps: list[tuple[str, Callable[[MovePlan, MoveResult], Awaitable[None]]]]
        if plan.within:
            steps = [("planned", self._within), ("arrived", self._switch)]
        else:
            steps = [
                ("planned", self._fence),
                ("fenced", self._copy),
                ("copied", self._arrive),
                ("arrived", self._switch),
                ("switched", self._depart),
            ]
        for index, (after, action) in enumerate(steps):
            if STEPS.index(plan.step) > STEPS.index(after):
                continue
            await action(plan, result)
            result.steps.append(action.__name__.lstrip("_"))
            following = steps[index + 1][0] if index + 1 < len(steps) else None
            plan = await self._advance(plan, following)
        await self._announce(plan)
        log.info(
            "budget moved",
            extra={
                "customer": plan.moved,
                "parent": ",".join(plan.new[plan.moved]) or "-",
                "budgets": len(plan.old),
                "holds": result.holds,
            },
        )
        return result

    async def _advance(self, plan: MovePlan, step: str | None) -> MovePlan:
        """Record the step reached (None: the move is done, its record deleted)."""
        if step is None:
            await self.redis.hdel(rkeys.MOVES, plan.moved)
            return plan
        plan = replace(plan, step=step)
        await self.redis.hset(rkeys.MOVES, plan.moved, plan.encode())
        return plan

    async def _announce(self, plan: MovePlan) -> None:
        for cid in plan.old:
            self.ledger.tree.forget(cid)
            await self.redis.publish(rkeys.CONFIG_CHANNEL, f"customer:{cid}")

    # ----------------------------------------------------------------- steps

    async def _check_room(self, plan: MovePlan) -> None:
        """Refuse a move whose holds in flight do not fit a level it joins (before any step,
        with the error the user sees; the moving script checks again, atomically)."""
        if not plan.joining:
            return
        old = for_customer(plan.moved, plan.old[plan.moved])
        holds = await self.redis.hvals(old.holds)
        total = sum(int(_text(value).split("|")[0]) for value in holds)
        keys = _ancestor_keys(plan.new[plan.moved], plan.joining, cfg=True)
        result = await self._script("room", keys, [self._now(), total])
        if result[0] == "no_room":
            self._refuse(plan, int(result[1]), int(result[2]), total, len(holds))

    def _refuse(self, plan: MovePlan, at: int, available: int, total: int, count: int) -> None:
        level = plan.joining[at - 1]
        raise MoveRefused(
            f"spec.parent: moving {plan.moved!r} under {plan.new[plan.moved][0]!r} would carry"
            f" {count} holds in flight ({format_amount(total)}) to {level!r}, which has"
            f" {format_amount(available)} available; nothing was moved (retry once they settle)"
        )

    async def _within(self, plan: MovePlan, result: MoveResult) -> None:
        old, new = plan.old[plan.moved], plan.new[plan.moved]
        own = for_customer(plan.moved, old)
        keys = [own.cfg, own.holds]
        keys += _ancestor_keys(old, plan.leaving, cfg=False)
        keys += _ancestor_keys(new, plan.joining, cfg=True)
        args = [self._now(), plan.moved, old[0], new[0], len(plan.leaving), len(plan.joining)]
        answer = await self._script("within", keys, args)
        if answer[0] == "no_room":
            await self.redis.hdel(rkeys.MOVES, plan.moved)
            self._refuse(plan, int(answer[1]), int(answer[2]), int(answer[3]), int(answer[4]))
        if answer[0] == "conflict":
            await self.redis.hdel(rkeys.MOVES, plan.moved)
            raise MoveRefused(
                f"spec.parent: {plan.moved!r} is under {answer[1]!r} in its levels, not under"
                f" {old[0]!r} as sg:tree says; nothing was moved"
            )
        if answer[0] == "ok":
            result.held, result.holds = int(answer[1]), int(answer[2])

    async def _fence(self, plan: MovePlan, result: MoveResult) -> None:
        cfgs = [for_customer(cid, anc).cfg for cid, anc in plan.old.items()]
        await self._script("fence", cfgs, [self._marker(plan)])

    def _marker(self, plan: MovePlan) -> str:
        new = plan.new[plan.moved]
        return new[-1] if new else plan.moved

    def _names(self, plan: MovePlan, cid: str) -> list[tuple[str, str]]:
        old, new = for_customer(cid, plan.old[cid]), for_customer(cid, plan.new[cid])
        pairs = list(zip(old.level_keys(), new.level_keys(), strict=True))
        pairs += [(f"{old.tag}:{s}", f"{new.tag}:{s}") for s in EXTRA_SUFFIXES]
        return pairs

    async def _idempotency_keys(self, plan: MovePlan, cid: str) -> list[tuple[str, str]]:
        old, new = for_customer(cid, plan.old[cid]), for_customer(cid, plan.new[cid])
        pairs = []
        for pattern in SCANNED_PATTERNS:
            async for name in self.redis.scan_iter(match=f"{old.tag}:{pattern}", count=1000):
                name = _text(name)
                pairs.append((name, new.tag + name[len(old.tag) :]))
        return pairs

    async def _copy(self, plan: MovePlan, result: MoveResult) -> None:
        """Every key of the fenced subtree to its new name (DUMP/RESTORE: exact, any type, the
        ledger's entry ids kept); run again, it overwrites the same copies."""
        for cid in plan.old:
            for old_name, new_name in [
                *self._names(plan, cid),
                *await self._idempotency_keys(plan, cid),
            ]:
                payload = await self.redis.dump(old_name)
                if payload is None:
                    await self.redis.delete(new_name)
                    continue
                ttl = await self.redis.pttl(old_name)
                await self.redis.restore(new_name, max(ttl, 0), payload, replace=True)

    async def _arrive(self, plan: MovePlan, result: MoveResult) -> None:
        new = plan.new[plan.moved]
        own = for_customer(plan.moved, new)
        keys = [own.holds, *(for_customer(cid, plan.new[cid]).cfg for cid in plan.new)]
        keys += _ancestor_keys(new, plan.joining, cfg=True)
        args = [self._now(), plan.moved, new[0] if new else "", len(plan.new)]
        answer = await self._script("arrive", keys, args)
        if answer[0] == "no_room":  # the new place filled up since _check_room: undo
            await self._undo(plan)
            self._refuse(plan, int(answer[1]), int(answer[2]), int(answer[3]), int(answer[4]))
        if answer[0] == "ok":
            result.held, result.holds = int(answer[1]), int(answer[2])

    async def _undo(self, plan: MovePlan) -> None:
        """Before arrive: delete the copies, lift the fence at the old place."""
        for cid in plan.old:
            copies = [new for _, new in self._names(plan, cid)]
            copies += [new for _, new in await self._idempotency_keys(plan, cid)]
            for name in copies:  # one by one: on a cluster they may be in several slots
                await self.redis.delete(name)
            await self.redis.hdel(for_customer(cid, plan.old[cid]).cfg, "moved")
        await self.redis.hdel(rkeys.MOVES, plan.moved)

    async def _switch(self, plan: MovePlan, result: MoveResult) -> None:
        for cid, ancestors in plan.new.items():
            if ancestors:
                await self.redis.hset(rkeys.TREE, cid, encode_ancestors(ancestors))
            else:
                await self.redis.hdel(rkeys.TREE, cid)
            self.ledger.tree.forget(cid)

    async def _depart(self, plan: MovePlan, result: MoveResult) -> None:
        old = plan.old[plan.moved]
        own = for_customer(plan.moved, old)
        doomed: list[str] = []
        cfgs: list[str] = []
        for cid in plan.old:
            names = [name for name, _ in self._names(plan, cid)]
            cfgs.append(names[0])
            doomed += names[1:]
        keys = [own.cfg, own.holds, *_ancestor_keys(old, plan.leaving, cfg=False)]
        keys += [*doomed, *cfgs]
        args = [plan.moved, len(plan.leaving), len(doomed), self._marker(plan)]
        await self._script("depart", keys, [*args, IDEMPOTENCY_TTL_MS])
        for cid in plan.old:
            for name, _ in await self._idempotency_keys(plan, cid):
                await self.redis.delete(name)
