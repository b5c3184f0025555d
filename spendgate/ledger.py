"""The ledger: balances, holds, rate limits and usage records in Redis, changed only by Lua.

Each operation is one script and one round trip: atomic, and idempotent by request id or
funding id. The same code runs on a single Redis and on Redis Cluster because every key a
script touches carries the customer's hash tag (see ``spendgate.keys``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

from redis.exceptions import MaxConnectionsError

from .backpressure import CallLimiter, LocalExhaustion
from .budget_tree import TreeIndex
from .credits import Credit, credit_result
from .keys import CustomerKeys, for_customer, tree_script_keys
from .models import CustomerBudgetSpec, Mode
from .script_channel import ClusterRedirect, ClusterScriptChannel, ScriptChannel
from .script_config import budget_config

IDEMPOTENCY_TTL_MS = 7 * 86_400_000
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class LedgerError(RuntimeError):
    """A ledger call that was refused for a reason other than money (bad arguments, etc.)."""


class TreeMoving(LedgerError):
    """The budget's levels do not match ``sg:tree`` after the bounded retries: a move of it is
    in progress (or did not finish). Nothing was changed; the caller may retry later."""


class Outcome(StrEnum):
    reserved = "ok"
    duplicate = "duplicate"
    unknown_customer = "unknown_customer"
    currency_mismatch = "currency_mismatch"
    suspended = "suspended"
    cost_cap = "cost_cap"
    insufficient = "insufficient"
    cap_reached = "cap_reached"
    rate_limited = "rate_limited"


_STALE_TREE = ("unknown_customer", "moved")  # the keys named were not where the budget lives
# Between a move's steps a budget's place in ``sg:tree`` lags its levels: read it again after
# these pauses (about 1.3 s in all), then give up.
MOVE_RETRY_PAUSES_S = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.5)


@dataclass(frozen=True)
class RateInfo:
    """The tightest rate limit after this request, for ``RateLimit-*`` headers."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Reservation:
    """``estimate`` is the amount held when reserved, the least amount asked for otherwise."""

    outcome: Outcome
    request_id: str
    estimate: int = 0
    available: int | None = None
    deadline_ms: int | None = None
    rate: RateInfo | None = None
    retry_after_ms: int | None = None
    limit_id: str | None = None
    detail: str = ""
    level: str = ""  # for a tree: the customerId of the level that refused, "key" for a key's cap
    downgraded: str = ""  # the customerId of the level whose downgrade soft limit applied

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.reserved


@dataclass(frozen=True)
class Extension:
    ok: bool
    hold: int = 0
    available: int | None = None
    reason: str = ""
    level: str = ""  # for a tree: the customerId of the level that refused, "key" for a key's cap


@dataclass(frozen=True)
class Settlement:
    duplicate: bool
    balance: int | None = None
    held: int | None = None
    spent: int | None = None
    entry_id: str | None = None
    charged: int = 0  # the cost, capped at the hold (or at what was available without one)
    absorbed: int = 0  # the cost above that bound: never charged, recorded


@dataclass(frozen=True)
class Usage:
    """What a request used; stored on the ledger entry next to its cost."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    upstream_ms: int = 0
    outcome: str = "ok"
    pod: str = ""
    rule: str = ""

    def fields(self) -> list[str]:
        return [
            "model", self.model,
            "input_tokens", str(self.input_tokens),
            "output_tokens", str(self.output_tokens),
            "upstream_ms", str(self.upstream_ms),
            "outcome", self.outcome,
            "pod", self.pod,
            "rule", self.rule,
        ]  # fmt: skip


@dataclass(frozen=True)
class Account:
    customer_id: str
    configured: bool
    currency: str | None
    mode: str | None
    limit: int
    period: str | None
    balance: int
    held: int
    spent: int  # this period, the subtree's: the budget's own spend and its descendants'
    period_start_ms: int
    funded: int
    charged: int
    expired_holds: int
    absorbed: int = 0
    suspensions: dict[str, str] = field(default_factory=dict)
    descendants_spent: int = 0  # this period, what the budget's descendants spent

    @property
    def own_spent(self) -> int:
        """What the budget's own keys spent this period."""
        return self.spent - self.descendants_spent

    @property
    def available(self) -> int:
        if self.mode == Mode.capped:
            return self.limit - self.spent - self.held
        available = self.balance - self.held
        if self.limit:
            available = min(available, self.limit - self.spent - self.held)
        return available


def _load_script(name: str, *helpers: str) -> str:
    """``prelude.lua``, then each of ``helpers``, then the script ``name``."""
    package = resources.files("spendgate.lua")
    parts = ["prelude", *helpers, name]
    return "\n".join(package.joinpath(f"{part}.lua").read_text() for part in parts)


SCRIPT_NAMES = ("reserve", "extend", "settle", "release", "credit", "configure", "sweep")


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
        raise LedgerError(f"invalid request/funding id {request_id!r}")
    return request_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """Async access to the ledger scripts on a ``redis.asyncio`` client (single or cluster).

    ``clock`` (milliseconds) replaces Redis' own TIME; tests use it to step across rate-limit
    windows, hold deadlines and period boundaries. In production Redis' clock is the only one.
    """

    def __init__(
        self,
        redis: Any,
        *,
        clock: Callable[[], int] | None = None,
        channel: ScriptChannel | ClusterScriptChannel | None = None,
        limiter: CallLimiter | None = None,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.channel = channel  # a pipelined hot-path connection; redis-py otherwise
        self.limiter = limiter  # bounds the calls in flight (the sidecar's pool size)
        self._scripts = {name: redis.register_script(_load_script(name)) for name in SCRIPT_NAMES}
        self.tree = TreeIndex(redis)
        self.move_retry_pauses_s = MOVE_RETRY_PAUSES_S

    def _now(self) -> int:
        return self.clock() if self.clock else 0

    async def load_scripts(self) -> None:
        """Load every script into Redis (all nodes on a cluster); readiness depends on it."""
        for name, script in self._scripts.items():
            sha = await self.redis.script_load(script.script)
            if sha != script.sha:
                raise LedgerError(f"script {name} loaded with unexpected sha {sha}")

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        if self.limiter is None:
            return await self._call(name, keys, args)
        async with self.limiter.slot():
            return await self._call(name, keys, args)

    async def keys_of(self, customer_id: str) -> CustomerKeys:
        """The keys of a budget, wherever it sits in its tree."""
        return for_customer(customer_id, await self.tree.ancestors(customer_id))

    async def _run_tree(
        self, name: str, customer_id: str, idempotency: str | None, args: list[Any]
    ) -> tuple[list[Any], tuple[str, ...]]:
        """Run a script on a budget and every ancestor; returns the result and the path used
        (the budget first). A stale view of the tree (a budget applied or moved since) is read
        again, a bounded number of times (a move in progress)."""
        ancestors = await self.tree.ancestors(customer_id)
        _, keys = tree_script_keys(customer_id, ancestors, idempotency)
        result = await self._run(name, keys, args)
        for pause_s in self.move_retry_pauses_s:
            if not result or result[0] not in _STALE_TREE:
                break
            fresh = await self.tree.ancestors(customer_id, fresh=True)
            if fresh == ancestors:
                if result[0] != "moved":
                    break  # unknown where it is, too: a customer not configured
                await asyncio.sleep(pause_s)  # a move in progress (spendgate.tree_moves)
            ancestors = fresh
            _, keys = tree_script_keys(customer_id, ancestors, idempotency)
            result = await self._run(name, keys, args)
        if result and result[0] == "moved":
            raise TreeMoving(
                f"customer {customer_id!r}: its tree in Redis ({', '.join(ancestors) or 'none'})"
                " does not match its configuration (a move that did not finish?); re-apply the"
                " budget"
            )
        return result, (customer_id, *ancestors)

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        script = self._scripts[name]
        try:
            if self.channel is not None:
                try:
                    result = await self.channel.evalsha(script.sha, script.script, keys, args)
                except ClusterRedirect:  # a slot in migration: redis-py follows ASK
                    result = await script(keys=keys, args=args)
            else:
                result = await script(keys=keys, args=args)
        except MaxConnectionsError as error:  # a full pool is backpressure, not a dead Redis
            raise LocalExhaustion(f"Redis connection pool exhausted: {error}") from None
        return [_text(item) if isinstance(item, bytes) else item for item in result]

    # ----------------------------------------------------------------- request path

    async def reserve(
        self,
        customer_id: str,
        request_id: str,
        estimate: int,
        *,
        key_id: str,
        currency: str,
        ttl_ms: int,
        minimum: int | None = None,
        downgrade: tuple[int, int] | None = None,
    ) -> Reservation:
        """Hold ``estimate``; with ``minimum``, hold as much as is available down to it.

        ``downgrade`` is the (estimate, minimum) of the cheaper model the request would be sent
        to while a downgrade soft limit of its budget is reached; ``downgraded`` in the result
        says when it was (the amounts held are then that model's)."""
        minimum = self._check_amounts(estimate, minimum)
        rid = check_request_id(request_id)
        args = [self._now(), rid, key_id, estimate, currency, ttl_ms, minimum, customer_id]
        if downgrade is not None:
            args += [downgrade[0], self._check_amounts(*downgrade)]
        result, path = await self._run_tree("reserve", customer_id, f"req:{rid}", args)
        outcome = Outcome(result[0])
        if outcome is Outcome.reserved:
            rate = RateInfo(*result[4:7]) if result[4] >= 0 else None
            downgraded = path[result[9] - 1] if result[9] > 0 else ""
            return Reservation(
                outcome, rid, result[8], available=result[3], deadline_ms=result[7], rate=rate,
                downgraded=downgraded,
            )  # fmt: skip
        estimate = minimum
        if outcome is Outcome.rate_limited:
            return Reservation(
                outcome,
                rid,
                estimate,
                retry_after_ms=result[1],
                rate=RateInfo(result[2], result[3], result[4]),
                limit_id=result[5],
                level=_level(path, result, 6),
            )
        if outcome in (Outcome.insufficient, Outcome.cap_reached):
            return Reservation(
                outcome, rid, estimate, available=result[1], level=_level(path, result, 3)
            )
        if outcome is Outcome.suspended:
            detail = f"{result[1]}: {result[2]}"
            return Reservation(outcome, rid, estimate, detail=detail, level=_level(path, result, 3))
        if outcome is Outcome.currency_mismatch:
            return Reservation(
                outcome, rid, estimate, detail=result[1], level=_level(path, result, 2)
            )
        if outcome is Outcome.cost_cap:
            return Reservation(outcome, rid, estimate, available=result[1])
        return Reservation(outcome, rid, estimate)

    @staticmethod
    def _check_amounts(estimate: int, minimum: int | None) -> int:
        """``minimum`` (``estimate`` when None), checked against ``estimate``."""
        if estimate < 0:
            raise LedgerError(f"estimate must not be negative, got {estimate}")
        minimum = estimate if minimum is None else minimum
        if not 0 <= minimum <= estimate:
            raise LedgerError(f"minimum must be within 0..{estimate}, got {minimum}")
        return minimum

    async def extend(
        self, customer_id: str, request_id: str, extra: int, *, ttl_ms: int
    ) -> Extension:
        if extra <= 0:
            raise LedgerError(f"extension must be positive, got {extra}")
        rid = check_request_id(request_id)
        args = [self._now(), rid, extra, ttl_ms, customer_id]
        result, path = await self._run_tree("extend", customer_id, f"req:{rid}", args)
        if result[0] == "ok":
            return Extension(True, hold=result[1], available=result[2])
        if result[0] == "insufficient":
            level = _level(path, result, 3)
            return Extension(False, available=result[1], reason="insufficient", level=level)
        return Extension(False, reason=result[0])

    async def settle(
        self,
        customer_id: str,
        request_id: str,
        cost: int,
        *,
        key_id: str = "",
        usage: Usage | None = None,
    ) -> Settlement:
        if cost < 0:
            raise LedgerError(f"cost must not be negative, got {cost}")
        rid = check_request_id(request_id)
        args = [self._now(), rid, cost, key_id, IDEMPOTENCY_TTL_MS, *(usage or Usage()).fields()]
        if self.tree.path(customer_id)[1:] or await self.tree.ancestors(customer_id):
            args += ["budget", customer_id]  # entries of a tree name the budget of the key
        result, _ = await self._run_tree("settle", customer_id, f"req:{rid}", args)
        if result[0] == "duplicate":
            return Settlement(duplicate=True)
        return Settlement(
            False, result[1], result[2], result[3], _text(result[4]), result[5], result[6]
        )

    async def release(self, customer_id: str, request_id: str) -> int | None:
        """Free a hold without charging; returns the amount freed, None if already final."""
        rid = check_request_id(request_id)
        args = [self._now(), rid, IDEMPOTENCY_TTL_MS]
        result, _ = await self._run_tree("release", customer_id, f"req:{rid}", args)
        return None if result[0] == "duplicate" else int(result[1])

    async def sweep(self, customer_id: str, max_holds: int = 500) -> tuple[int, int]:
        """Release up to ``max_holds`` expired holds; returns (released, still expired)."""
        args = [self._now(), max_holds]
        result, _ = await self._run_tree("sweep", customer_id, "req:sweep", args)
        return int(result[1]), int(result[2])

    # ----------------------------------------------------------------- money in

    async def fund(
        self, customer_id: str, funding_id: str, amount: int, *, source: str = "", note: str = ""
    ) -> Credit:
        """Add prepaid money once per ``funding_id``; refused for a capped customer."""
        if amount <= 0:
            raise LedgerError(f"funding amount must be positive, got {amount}")
        return await self._credit("fund", customer_id, funding_id, amount, source, note, True)

    async def adjust(
        self,
        customer_id: str,
        adjustment_id: str,
        amount: int,
        *,
        source: str = "",
        note: str = "",
        allow_negative: bool = False,
    ) -> Credit:
        """Add or remove money once per ``adjustment_id``. An adjustment that would take the
        balance below zero is refused (:class:`NegativeBalance`) unless ``allow_negative``:
        money Stripe took back (refunds, disputes, ended grants) is gone either way."""
        if amount == 0:
            raise LedgerError("an adjustment of zero changes nothing")
        return await self._credit(
            "adjust", customer_id, adjustment_id, amount, source, note, allow_negative
        )

    async def _credit(
        self,
        kind: str,
        customer_id: str,
        funding_id: str,
        amount: int,
        source: str,
        note: str,
        allow_negative: bool,
    ) -> Credit:
        fid = check_request_id(funding_id)
        flag = "1" if allow_negative else "0"
        args = [self._now(), fid, amount, kind, flag, "source", source, "note", note]

        async def write(keys: CustomerKeys) -> list[Any]:
            return await self._run("credit", keys.script_keys(keys.funding(fid)), args)

        result = await self._at_place(customer_id, write)
        return credit_result(kind, customer_id, fid, amount, result)

    # ----------------------------------------------------------------- configuration

    async def configure(self, spec: CustomerBudgetSpec, parent: str | None = None) -> int:
        """Write a budget's configuration; returns the balance change its opening balance made.

        ``parent`` is the parent budget's customerId, for a budget in a tree (whose place is
        recorded in ``sg:tree`` first, by ``ConfigStore``)."""
        spec_balance = spec.balance if spec.balance is not None else -1
        config = budget_config(spec)
        if parent is not None:
            config["parent"] = parent
        pairs: list[str] = []
        for name, value in config.items():
            pairs += [name, value]
        args = [self._now(), spec_balance, "1" if spec.policy.suspended else "0", *pairs]

        async def write(keys: CustomerKeys) -> list[Any]:
            return await self._run("configure", keys.script_keys(keys.cfg), args)

        return int((await self._at_place(spec.customer_id, write))[1])

    async def suspend(self, customer_id: str, source: str, reason: str) -> None:
        async def write(keys: CustomerKeys) -> list[Any]:
            await self.redis.hset(keys.suspensions, source, reason)
            return ["moved" if await self.redis.hexists(keys.cfg, "moved") else "ok"]

        await self._at_place(customer_id, write)

    async def unsuspend(self, customer_id: str, source: str) -> None:
        async def write(keys: CustomerKeys) -> list[Any]:
            await self.redis.hdel(keys.suspensions, source)
            return ["moved" if await self.redis.hexists(keys.cfg, "moved") else "ok"]

        await self._at_place(customer_id, write)

    async def _at_place(
        self, customer_id: str, write: Callable[[CustomerKeys], Awaitable[list[Any]]]
    ) -> list[Any]:
        """A write (configuration, suspension, credit) at the budget's current place, read now:
        a place fenced or left by a move (``moved``) is read again and written again, bounded."""
        result = ["moved"]
        for pause_s in (0.0, *self.move_retry_pauses_s):
            await asyncio.sleep(pause_s)
            ancestors = await self.tree.ancestors(customer_id, fresh=True)
            result = await write(for_customer(customer_id, ancestors))
            if result[0] != "moved":
                return result
        raise TreeMoving(f"customer {customer_id!r}: a move of its budget did not finish")

    # ----------------------------------------------------------------- reading

    async def account(self, customer_id: str) -> Account:
        keys = await self.keys_of(customer_id)
        cfg = await self.redis.hgetall(keys.cfg)
        acct = await self.redis.hgetall(keys.acct)
        suspensions = await self.redis.hgetall(keys.suspensions)
        return account_from_hashes(customer_id, cfg, acct, suspensions)

    async def ledger_entries(self, customer_id: str, count: int = 100) -> list[dict[str, str]]:
        keys = await self.keys_of(customer_id)
        entries = await self.redis.xrange(keys.ledger, count=count)
        return [
            {"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in entries
        ]

    async def holds(self, customer_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall((await self.keys_of(customer_id)).holds)
        return {_text(rid): int(_text(value).split("|")[0]) for rid, value in raw.items()}


def _level(path: tuple[str, ...], result: list[Any], index: int) -> str:
    """The level a refusal names (1 = the budget, 2 its parent, ..., 0 = the key's cap); ""
    for a single budget's own refusal."""
    if len(result) <= index:
        return ""
    at = int(result[index])
    if at == 0:
        return "key"
    if len(path) == 1:
        return ""
    return path[at - 1] if 0 < at <= len(path) else ""


def account_from_hashes(
    customer_id: str,
    cfg: Mapping[Any, Any],
    acct: Mapping[Any, Any],
    suspensions: Mapping[Any, Any],
) -> Account:
    cfg = {_text(k): _text(v) for k, v in cfg.items()}
    acct = {_text(k): _text(v) for k, v in acct.items()}

    def number(source: dict[str, str], name: str) -> int:
        return int(source.get(name) or 0)

    return Account(
        customer_id=customer_id,
        configured=bool(cfg),
        currency=cfg.get("currency"),
        mode=cfg.get("mode"),
        limit=number(cfg, "limit"),
        period=cfg.get("period") or None,
        balance=number(acct, "balance"),
        held=number(acct, "held"),
        spent=number(acct, "spent"),
        period_start_ms=number(acct, "pstart"),
        funded=number(acct, "funded"),
        charged=number(acct, "charged"),
        expired_holds=number(acct, "expired"),
        absorbed=number(acct, "absorbed"),
        suspensions={_text(k): _text(v) for k, v in suspensions.items()},
        descendants_spent=number(acct, "dspent"),
    )
