"""The sidecar with budget trees: a refusal by a budget above the key's own names that budget
and shows none of its figures (they count its other children's spend); a key's own spend cap
is refused as the key's. /echo costs a flat 0.01."""

from __future__ import annotations

from typing import Any

from tests.support.sidecar_env import budget, data_plane

TEAM_KEY = "sk-test-team-a-0123456789abcdef"
PROJ_KEY = "sk-test-proj-0123456789abcdef00"
CI_KEY = "sk-test-proj-ci-0123456789abcdef"


def child(name: str, parent: str, period: str = "month", **spec: Any) -> dict[str, Any]:
    manifest = budget(name, "0", period=period, **spec)
    del manifest["spec"]["balance"]
    manifest["spec"].update(parent=parent, mode="capped")
    return manifest


async def echo(plane: Any, key: str) -> tuple[int, dict[str, Any]]:
    response = await plane.client.post(
        "/echo", data=b"{}", headers={"Authorization": f"Bearer {key}"}
    )
    body = await response.json()
    await plane.settled()
    return response.status, body


async def test_a_refusal_above_the_key_names_the_budget_and_no_figures(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="10.00") as plane:
        await plane.apply_budget(child("team-a", "acme", limit="0.02"), TEAM_KEY)
        await plane.apply_budget(child("proj", "team-a", limit="1.00", period="day"), PROJ_KEY)
        assert (await echo(plane, TEAM_KEY))[0] == 200
        assert (await echo(plane, PROJ_KEY))[0] == 200
        status, body = await echo(plane, PROJ_KEY)
        assert status == 402
        assert body["error"]["code"] == "spend_limit_reached"
        assert body["error"]["message"] == "Budget 'team-a' spend limit for this period reached."
        # team-a's own key sees its own figures, as a single budget does.
        status, body = await echo(plane, TEAM_KEY)
        assert status == 402 and "your spend limit for this period has 0.00 left" in str(body)
        await plane.ledger.suspend("team-a", "spec", "suspended in the CustomerBudget spec")
        status, body = await echo(plane, PROJ_KEY)
        assert (status, body["error"]["message"]) == (
            403, "Budget 'team-a' is suspended; contact your provider."
        )  # fmt: skip
        assert (await plane.account("acme")).charged == 20_000  # both levels' requests


async def test_a_keys_own_cap_is_refused_as_the_keys(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        capped_key = {"name": "main", "secretRef": {"name": "proj-keys"}, "limit": "0.01"}
        manifest = child("proj", "acme", limit="1.00", apiKeys=[{**capped_key, "period": "day"}])
        await plane.apply_budget(manifest, CI_KEY)
        assert (await echo(plane, CI_KEY))[0] == 200
        status, body = await echo(plane, CI_KEY)
        assert status == 402
        assert (
            "this API key's spend limit for this period has 0.00 left" in body["error"]["message"]
        )
