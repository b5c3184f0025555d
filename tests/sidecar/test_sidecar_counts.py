"""A count the bound reads (``n`` images) lowered to what the balance pays for, when the rule's
``expression.clampField`` allows it; refused with 402 otherwise. Real sidecar, real Redis, the
stand-in images endpoint."""

from __future__ import annotations

from typing import Any

from tests.sidecar.test_sidecar_media import (
    AUTH,
    HD_WIDE,
    media_pricebook,
    served,
    usage_entries,
    use_pricebook,
)
from tests.support.sidecar_env import data_plane

HD = {"prompt": "a cat", "n": 10, "size": "1792x1024", "quality": "hd"}
ROUTE = "POST /v1/images/generations"


def clamping_pricebook(field: str | None = "n") -> dict[str, Any]:
    manifest = media_pricebook()
    for rule in manifest["spec"]["rules"]:
        if rule["name"] == "images" and field is not None:
            rule["expression"]["clampField"] = field
    return manifest


async def test_ten_hd_images_on_a_balance_for_three_are_clamped_to_three(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.40") as plane:
        await use_pricebook(plane, clamping_pricebook())
        resp = await plane.client.post("/v1/images/generations", json=HD, headers=AUTH)
        assert resp.status == 200, await resp.text()
        assert len((await resp.json())["data"]) == 3  # the model was asked for 3
        assert resp.headers["X-Spendgate-Count-Limit"] == "3; field=n; reason=balance"
        assert resp.headers["X-Spendgate-Cost"] == "0.36"
        await plane.settled()
        (entry,) = await usage_entries(plane)
        assert (int(entry["cost"]), int(entry["absorbed"])) == (3 * HD_WIDE, 0)
        account = await plane.account()
        assert (account.balance, account.held) == (400_000 - 3 * HD_WIDE, 0)


async def test_without_clamping_the_same_request_is_refused_before_the_model(
    redis_url: str,
) -> None:
    async with data_plane(redis_url, acme_balance="0.40") as plane:
        await use_pricebook(plane, clamping_pricebook(None))
        resp = await plane.client.post("/v1/images/generations", json=HD, headers=AUTH)
        assert resp.status == 402
        assert (await resp.json())["error"]["code"] == "insufficient_balance"
        assert "X-Spendgate-Count-Limit" not in resp.headers
        assert served(plane, ROUTE) == 0
        account = await plane.account()
        assert (account.balance, account.held) == (400_000, 0)


async def test_a_balance_below_one_image_is_refused_even_with_clamping(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.119999") as plane:
        await use_pricebook(plane, clamping_pricebook())
        resp = await plane.client.post("/v1/images/generations", json=HD, headers=AUTH)
        assert resp.status == 402
        assert served(plane, ROUTE) == 0


async def test_a_balance_that_pays_for_all_of_them_changes_nothing(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="1.20") as plane:
        await use_pricebook(plane, clamping_pricebook())
        resp = await plane.client.post("/v1/images/generations", json=HD, headers=AUTH)
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 10
        assert "X-Spendgate-Count-Limit" not in resp.headers
        await plane.settled()
        assert (await plane.account()).balance == 0
