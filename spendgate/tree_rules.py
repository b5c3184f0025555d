"""The rules of budget trees, checked where a budget is applied (``spendgate apply``, the
operator through ``ConfigStore``): the parent exists in the budget's namespace, no cycle, at
most ``MAX_TREE_DEPTH`` levels (a moved budget's subtree included), one currency per tree, a
child's cap within its parent's.

Every problem is one line ``field: message`` naming the ``spec`` field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .keys import MAX_TREE_DEPTH
from .models import CustomerBudget
from .money import format_amount


@dataclass(frozen=True)
class Level:
    """What the rules need of one budget, from the input or from Redis."""

    ref: str  # namespace/name
    customer_id: str
    currency: str
    limit: int  # 0: no cap
    period: str  # "" without a cap
    parent: str | None  # the parent's ref, for a budget of the input
    ancestors: tuple[str, ...] | None = None  # customerIds above it, for a budget in Redis


def parent_ref(budget: CustomerBudget) -> str | None:
    parent = budget.spec.parent
    return f"{budget.metadata.namespace}/{parent}" if parent else None


def level_of(budget: CustomerBudget) -> Level:
    spec = budget.spec
    period = spec.period.value if spec.period else ""
    return Level(
        budget.ref, spec.customer_id, spec.currency, spec.limit or 0, period, parent_ref(budget)
    )


@dataclass(frozen=True)
class Placement:
    """Where a budget goes: its ancestors' customerIds (parent first), or the problems."""

    ancestors: tuple[str, ...]
    problems: list[str]


async def gather_levels(
    budgets: list[CustomerBudget],
    known: Mapping[str, Level],
    fetch: Callable[[str], Awaitable[Level | None]],
) -> dict[str, Level | None]:
    """The applied budgets (``fetch``: ref -> Level from Redis) the budgets' trees reach above
    the ``known`` ones (the input)."""
    fetched: dict[str, Level | None] = {}
    for budget in budgets:
        ref, seen = parent_ref(budget), {budget.ref}
        while ref is not None and ref not in seen:
            seen.add(ref)
            if ref in known:
                ref = known[ref].parent
                continue
            if ref not in fetched:
                fetched[ref] = await fetch(ref)
            break  # an applied budget knows its ancestors
    return fetched


def place(
    budget: CustomerBudget, find: Callable[[str], Level | None], *, partial: bool = False
) -> Placement:
    """Walk from ``budget`` to its root through ``find`` (ref -> Level) and check the rules.

    ``partial``: a parent ``find`` does not know may be in Redis; check only what is known."""
    spec = budget.spec
    ref = parent_ref(budget)
    if ref is None:
        return Placement((), [])
    chain: list[Level] = []
    seen = [budget.ref]
    known_above: tuple[str, ...] | None = None
    while ref is not None:
        if ref in seen:
            cycle = " -> ".join([*seen[seen.index(ref) :], ref])
            return Placement((), [f"spec.parent: budgets form a cycle ({cycle})"])
        level = find(ref)
        if level is None and partial:
            return Placement((), [])
        if level is None:
            where = "the input" if not chain else f"the input (parent of {chain[-1].ref})"
            return Placement(
                (), [f"spec.parent: CustomerBudget {ref} is neither in {where} nor applied"]
            )
        chain.append(level)
        seen.append(ref)
        if level.ancestors is not None:  # applied: everything above it is known
            known_above = level.ancestors
            break
        ref = level.parent
    ancestors = tuple(level.customer_id for level in chain) + (known_above or ())
    problems: list[str] = []
    depth = len(ancestors) + 1
    if depth > MAX_TREE_DEPTH:
        problems.append(
            f"spec.parent: the tree would be {depth} levels deep"
            f" ({' -> '.join((spec.customer_id, *ancestors))}); at most {MAX_TREE_DEPTH}"
        )
    if spec.customer_id in ancestors:
        problems.append(f"spec.parent: budgets form a cycle through {spec.customer_id!r}")
    parent = chain[0]
    if parent.currency != spec.currency:
        problems.append(
            f"spec.currency: {spec.currency!r} is not the currency of parent {parent.ref}"
            f" ({parent.currency!r}); a tree counts one currency"
        )
    period = spec.period.value if spec.period else ""
    if spec.limit and parent.limit and period == parent.period and spec.limit > parent.limit:
        problems.append(
            f"spec.limit: {format_amount(spec.limit)} per {period} is above parent"
            f" {parent.ref}'s limit of {format_amount(parent.limit)} per {period}"
        )
    return Placement(ancestors, problems)


def subtree_depth_problem(
    customer_id: str, ancestors: tuple[str, ...], below: Mapping[str, tuple[str, ...]]
) -> str | None:
    """A budget moving to ``ancestors`` takes the budgets ``below`` it (customerId -> their
    ancestors now) along: the deepest of them must stay within ``MAX_TREE_DEPTH`` levels."""
    height = max((path.index(customer_id) + 1 for path in below.values()), default=0)
    depth = len(ancestors) + 1 + height
    if depth <= MAX_TREE_DEPTH:
        return None
    return (
        f"spec.parent: moving {customer_id!r} under {ancestors[0]!r} with the {len(below)}"
        f" budgets below it would make the tree {depth} levels deep; at most {MAX_TREE_DEPTH}"
    )


def parents_first(budgets: list[CustomerBudget]) -> list[CustomerBudget]:
    """The budgets ordered so that a parent in the list comes before its children (stable)."""
    by_ref = {budget.ref: budget for budget in budgets}
    ordered: list[CustomerBudget] = []
    placed: set[str] = set()

    def visit(budget: CustomerBudget, path: set[str]) -> None:
        if budget.ref in placed or budget.ref in path:
            return  # a cycle is reported by place()
        ref = parent_ref(budget)
        if ref in by_ref:
            visit(by_ref[ref], path | {budget.ref})
        placed.add(budget.ref)
        ordered.append(budget)

    for budget in budgets:
        visit(budget, set())
    return ordered
