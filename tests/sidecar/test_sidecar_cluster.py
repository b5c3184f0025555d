"""The sidecar on Redis Cluster: same behaviour, keys of many customers spread over shards."""

from __future__ import annotations

import asyncio

import pytest

from spendgate.keys import hash_api_key
from tests.support.sidecar_env import OTHER_KEY, budget, data_plane

pytestmark = pytest.mark.cluster


async def test_sidecar_meters_and_refuses_on_redis_cluster(redis_cluster_url: str) -> None:
    async with data_plane(redis_cluster_url, cluster=True, acme_balance="0.10") as plane:
        resp = await plane.post_chat(max_tokens=4)  # 0.05
        assert resp.status == 200
        await plane.settled()
        assert (await plane.account()).balance == 50_000
        assert (await plane.post_chat(max_tokens=8)).status == 402  # needs 0.09

        # Configuration changes reach the sidecar through pub/sub on the cluster too.
        await plane.apply_budget(budget("other", "1.00"), OTHER_KEY)
        for _ in range(50):
            if hash_api_key(OTHER_KEY) in plane.sidecar.config.keys:
                break
            await asyncio.sleep(0.02)
        assert (await plane.post_chat(OTHER_KEY, max_tokens=1)).status == 200
        await plane.settled()
        assert (await plane.account("other")).spent == 20_000
