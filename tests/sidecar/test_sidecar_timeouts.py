"""A rule's timeout bounds the whole exchange, streams included, so no hold outlives it."""

from __future__ import annotations

import asyncio
import copy
import time

from spendgate.models import parse_resource
from tests.sidecar.test_sidecar_streaming import content_event, sse_app
from tests.support.sidecar_env import PRICEBOOK, data_plane


async def test_a_stream_longer_than_the_rule_timeout_ends_with_an_error_event(
    redis_url: str,
) -> None:
    events = [content_event(i) for i in range(40)]  # 40 x 0.1 s: far beyond a 1 s timeout
    async with data_plane(redis_url, upstream_app=sse_app(events, interval_s=0.1)) as plane:
        pricebook = copy.deepcopy(PRICEBOOK)
        pricebook["spec"]["rules"][0]["timeout"] = "1s"
        await plane.store.apply_pricebook(parse_resource(pricebook))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the sidecar hears of the new prices over pub/sub
        started = time.monotonic()
        resp = await plane.post_chat(max_tokens=50, stream=True)
        body = await resp.read()
        elapsed = time.monotonic() - started
        assert resp.status == 200
        assert 0.9 < elapsed < 2.5
        assert body.endswith(b"data: [DONE]\n\n")
        assert b'"code": "upstream_timeout"' in body
        assert body.count(b"tok") < 40
        await plane.settled()
        account = await plane.account()
        assert account.held == 0
        assert account.balance == 10_000_000  # chat: onUpstreamError free
