"""The sidecar when a budget moves to another parent (spendgate.tree_moves): it forgets the
budget's cached place on the move's ``customer:<id>`` message, and its next request is held and
charged at the new parent. /echo costs a flat 0.01."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.budget_trees import crashing_move
from tests.support.sidecar_env import budget, data_plane

PROJ_KEY = "sk-test-proj-0123456789abcdef00"


def child(name: str, parent: str, limit: str = "1.00") -> dict[str, Any]:
    manifest = budget(name, "0", period="month")
    del manifest["spec"]["balance"]
    manifest["spec"].update(parent=parent, mode="capped", limit=limit)
    return manifest


async def echo(plane: Any, key: str) -> int:
    response = await plane.client.post(
        "/echo", data=b"{}", headers={"Authorization": f"Bearer {key}"}
    )
    await plane.settled()
    return response.status


async def test_a_moved_budget_is_charged_at_its_new_parent(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(child("team-a", "acme"), "sk-test-team-a-0123456789abcdef")
        await plane.apply_budget(child("team-b", "acme"), "sk-test-team-b-0123456789abcdef")
        await plane.apply_budget(child("proj", "team-a", "0.50"), PROJ_KEY)
        assert await echo(plane, PROJ_KEY) == 200
        tree = plane.sidecar.ledger.tree
        assert tree.cached("proj") == ("team-a", "acme")
        await plane.apply_budget(child("proj", "team-b", "0.50"), PROJ_KEY)
        for _ in range(200):
            if tree.cached("proj") is None:
                break
            await asyncio.sleep(0.01)
        assert tree.cached("proj") is None  # forgotten on the move's message
        assert await echo(plane, PROJ_KEY) == 200
        assert tree.cached("proj") == ("team-b", "acme")
        assert (await plane.account("team-a")).charged == 10_000
        assert (await plane.account("team-b")).charged == 10_000
        assert (await plane.account("acme")).charged == 20_000


async def test_a_budget_stuck_in_a_move_is_refused_503_never_served(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(child("team-a", "acme"), "sk-test-team-a-0123456789abcdef")
        await plane.apply_budget(budget("other", "5.00"), "sk-test-other-0123456789abcdef")
        await plane.apply_budget(child("proj", "team-a", "0.50"), PROJ_KEY)
        with crashing_move(plane.store.moves), pytest.raises(ConnectionError):
            await plane.apply_budget(child("proj", "other", "0.50"), PROJ_KEY)
        response = await plane.client.post(
            "/echo", data=b"{}", headers={"Authorization": f"Bearer {PROJ_KEY}"}
        )
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (503, "budget_moving")
        assert response.headers["Retry-After"] == "1"
        await plane.apply_budget(child("proj", "other", "0.50"), PROJ_KEY)  # finished
        assert await echo(plane, PROJ_KEY) == 200
        assert (await plane.account("other")).charged == 10_000
        assert (await plane.account("acme")).charged == 0
