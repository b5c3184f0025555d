"""Soft limits through the sidecar. Downgrade: once a budget level's downgrade soft limit is
reached, a request for a model whose rule names ``downgradeTo`` is sent as that cheaper model,
priced and charged as it, and the response says so; before it, and for models without a
downgrade, nothing changes (on a single Redis and the 3-master Cluster). Throttle: a 429 that
says the budget is throttled."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.sidecar_env import ACME_KEY, budget, data_plane, pricebook

UNIT = 1_000_000
TEAM_KEY = "sk-test-team-0123456789abcdef00"


def rule(name: str, flat: str, per_token: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path": "/v1/chat/completions", "models": [name]},
        # flat + per output token (per million: x 1e6); the stand-in answers max_tokens tokens
        "price": {"flat": flat, "perMillionOutputTokens": str(int(float(per_token) * 1e6))},
        "maximum": "5.00",
        "timeout": "5s",
        **fields,
    }


PRICEBOOK = pricebook(
    rule("big", "0.10", "0.10", downgradeTo="small"),
    rule("small", "0.01", "0.01"),
    rule("other", "0.10", "0.10"),
)
BIG_COST = 100_000 + 2 * 100_000  # two output tokens
SMALL_COST = 10_000 + 2 * 10_000


async def chat(plane: Any, model: str, key: str = ACME_KEY) -> Any:
    response = await plane.post_chat(key, model=model, max_tokens=2)
    body = await response.json()
    await plane.settled()
    return response, body


def last_usage(entries: list[dict[str, str]]) -> dict[str, str]:
    return next(entry for entry in reversed(entries) if entry["type"] == "usage")


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_a_reached_downgrade_sends_and_charges_the_cheaper_model(
    cluster: bool, redis_url: str, redis_cluster_url: str
) -> None:
    url = redis_cluster_url if cluster else redis_url
    async with data_plane(url, pricebook=PRICEBOOK, cluster=cluster) as plane:
        soft = {"softLimits": [{"action": "downgrade", "below": "9.80"}]}
        await plane.apply_budget(budget("acme", "10.00", policy=soft), ACME_KEY)
        response, body = await chat(plane, "big")  # 10.00 left: above 9.80
        assert response.status == 200 and body["model"] == "big"
        assert "X-Spendgate-Downgraded" not in response.headers
        assert (await plane.account()).charged == BIG_COST  # 9.70 left: below 9.80

        response, body = await chat(plane, "big")
        assert response.status == 200, body
        assert body["model"] == "small"  # what the model server was asked for
        assert response.headers["X-Spendgate-Downgraded"] == "small; from=big; budget=acme"
        assert response.headers["X-Spendgate-Cost-Limit"] != "5.00"
        account = await plane.account()
        assert account.charged == BIG_COST + SMALL_COST
        usage = last_usage(await plane.ledger.ledger_entries("acme"))
        assert (usage["model"], usage["rule"]) == ("small", "small")
        registry = plane.sidecar.metrics.registry
        assert registry.get_sample_value("spendgate_downgrades_total", {"rule": "big"}) == 1

        response, body = await chat(plane, "other")  # its rule names no downgrade
        assert body["model"] == "other" and "X-Spendgate-Downgraded" not in response.headers


async def test_a_parents_downgrade_applies_to_its_children(redis_url: str) -> None:
    async with data_plane(redis_url, pricebook=PRICEBOOK) as plane:
        soft = {"softLimits": [{"action": "downgrade", "at": 1}]}
        await plane.apply_budget(
            budget("acme", "10.00", limit="10.00", period="month", policy=soft), ACME_KEY
        )
        team = budget("team", "0", parent="acme", mode="capped", limit="5.00", period="month")
        del team["spec"]["balance"]
        await plane.apply_budget(team, TEAM_KEY)
        response, body = await chat(plane, "big", TEAM_KEY)  # 0 % of acme's limit
        assert body["model"] == "big"
        response, body = await chat(plane, "big", TEAM_KEY)  # 3 %: acme's soft limit applies
        assert body["model"] == "small"
        assert response.headers["X-Spendgate-Downgraded"] == "small; from=big; budget=acme"


async def test_a_downgrade_that_would_hold_more_is_not_taken(redis_url: str) -> None:
    priced_by_expression = {  # not comparable when the PriceBook is applied; 1.00 a request
        "name": "small",
        "match": {"path": "/v1/chat/completions", "models": ["small"]},
        "expression": {"bound": "prices.request", "prices": {"request": "1.00"}},
    }
    book = pricebook(PRICEBOOK["spec"]["rules"][0], priced_by_expression)
    async with data_plane(redis_url, pricebook=book) as plane:
        soft = {"softLimits": [{"action": "downgrade", "below": "100.00"}]}
        await plane.apply_budget(budget("acme", "10.00", policy=soft), ACME_KEY)
        response, body = await chat(plane, "big")  # as "small" it would hold 1.00, not 0.30
        assert response.status == 200 and body["model"] == "big"
        assert "X-Spendgate-Downgraded" not in response.headers
        assert (await plane.account()).charged == BIG_COST


async def test_a_reached_throttle_is_a_429_that_says_so(redis_url: str) -> None:
    one_a_day = [{"requests": 1, "per": "day"}]
    throttle = {"action": "throttle", "below": "9.80", "rateLimits": one_a_day}
    async with data_plane(redis_url, pricebook=PRICEBOOK) as plane:
        soft = {"softLimits": [throttle]}
        await plane.apply_budget(budget("acme", "10.00", policy=soft), ACME_KEY)
        for _ in range(3):  # 10.00, 9.97, 9.94 left: unthrottled
            assert (await chat(plane, "small"))[0].status == 200
        assert (await chat(plane, "big"))[0].status == 200  # 9.61 left: throttled from now on
        assert (await chat(plane, "small"))[0].status == 200  # the day's one request
        response, body = await chat(plane, "small")
        assert response.status == 429
        assert body["error"]["message"].startswith(
            "Rate limit reached for this customer or key (throttled: a soft limit of its spend"
            " is reached); retry after"
        )
