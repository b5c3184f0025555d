"""The sidecar's admission path: keys, headers, refusals and bad input."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace

import pytest

from spendgate.keys import hash_api_key
from tests.support.sidecar_env import ACME_KEY, OTHER_KEY, PRICEBOOK, budget, data_plane

MICRO = 1_000_000


async def _error(resp) -> dict:  # type: ignore[no-untyped-def]
    body = await resp.json()
    assert set(body["error"]) == {"type", "code", "message"}
    return body["error"]


async def test_served_request_is_charged_its_real_cost(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.post_chat(max_tokens=5)
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 5
        await plane.settled()
        account = await plane.account()
        # 0.01 flat + 5 tokens x 0.01
        assert account.balance == 10 * MICRO - 60_000
        assert account.held == 0
        entries = [e for e in await plane.ledger.ledger_entries("acme") if e["type"] == "usage"]
        assert len(entries) == 1
        assert entries[0]["cost"] == "60000"
        assert entries[0]["output_tokens"] == "5"
        assert entries[0]["pod"] == "test-pod"
        assert entries[0]["request_id"] == resp.headers["X-Spendgate-Request-Id"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-unknown-0123456789"}, "invalid_api_key"),
        ({"X-API-Key": "sk-unknown-0123456789"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"Authorization": "Bearer "}, "invalid_api_key"),
        ({"Authorization": "Bearer short"}, "invalid_api_key"),
        ({"Authorization": "Bearer " + "x" * 600}, "invalid_api_key"),
        ({"Authorization": f"Bearer {ACME_KEY[:-1]}"}, "invalid_api_key"),
    ],
)
async def test_missing_unknown_and_malformed_keys_get_401(
    redis_url: str, headers: dict[str, str], code: str
) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.client.post("/echo", data=b"{}", headers=headers)
        assert resp.status == 401
        assert (await _error(resp))["code"] == code
        assert "WWW-Authenticate" in resp.headers
        assert plane.upstream.app is not None
        assert (await plane.account()).balance == 10 * MICRO


async def test_x_api_key_header_is_accepted(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.client.post("/echo", data=b"{}", headers={"X-API-Key": ACME_KEY})
        assert resp.status == 200


async def test_credential_is_stripped_and_identity_added(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.client.post(
            "/echo",
            data=b'{"hello": 1}',
            headers={
                "Authorization": f"Bearer {ACME_KEY}",
                "X-API-Key": ACME_KEY,
                "Content-Type": "application/json",
                # Attempts to impersonate another customer towards the model:
                "X-Spendgate-Customer": "victim",
                "x-spendgate-key": "admin",
                "X-Custom": "kept",
            },
        )
        assert resp.status == 200
        echoed = await resp.json()
        seen = echoed["headers"]
        assert "authorization" not in seen
        assert "x-api-key" not in seen
        assert seen["x-spendgate-customer"] == ["acme"]
        assert seen["x-spendgate-key"] == ["main"]
        assert seen["x-custom"] == ["kept"]
        assert ACME_KEY not in json.dumps(echoed)


async def test_header_injection_in_values_is_rejected(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        reader, writer = await asyncio.open_connection(
            plane.client.server.host, plane.client.server.port
        )
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ACME_KEY.encode()
            + b"\r\nX-Custom: a\rX-Spendgate-Customer: victim\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert b" 400 " in status_line
        assert (await plane.account()).balance == 10 * MICRO


async def test_insufficient_balance_gets_402_and_model_is_not_called(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.05") as plane:
        resp = await plane.post_chat(max_tokens=10)  # estimate 0.11 > 0.05
        assert resp.status == 402
        error = await _error(resp)
        assert error["code"] == "insufficient_balance"
        assert error["type"] == "insufficient_quota"
        assert "0.05" in error["message"]
        assert (await plane.account()).balance == 50_000


async def test_balance_pays_for_exactly_k_requests_then_402(redis_url: str) -> None:
    async with data_plane(redis_url, acme_balance="0.30") as plane:
        statuses = []
        for _ in range(5):
            resp = await plane.post_chat(max_tokens=4)  # 0.05 each, estimate 0.05
            statuses.append(resp.status)
            await plane.settled()
        assert statuses == [200] * 5
        assert (await plane.account()).balance == 50_000
        assert (await plane.post_chat(max_tokens=4)).status == 200
        await plane.settled()
        resp = await plane.post_chat(max_tokens=4)
        assert resp.status == 402
        assert (await plane.account()).balance == 0


async def test_suspended_customer_gets_403(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(budget("acme", "10.00", policy={"suspended": True}), ACME_KEY)
        resp = await plane.post_chat()
        assert resp.status == 403
        assert (await _error(resp))["code"] == "account_suspended"


async def test_rate_limited_gets_429_with_headers(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(
            budget("acme", "10.00", rateLimits=[{"requests": 2, "per": "minute"}]), ACME_KEY
        )
        first = await plane.post_chat(max_tokens=1)
        assert first.status == 200
        assert first.headers["RateLimit-Limit"] == "2"
        assert first.headers["RateLimit-Remaining"] == "1"
        assert (await plane.post_chat(max_tokens=1)).status == 200
        resp = await plane.post_chat(max_tokens=1)
        assert resp.status == 429
        assert (await _error(resp))["code"] == "rate_limit_exceeded"
        assert resp.headers["Retry-After"] == "30"  # one request per 30 s
        assert resp.headers["RateLimit-Limit"] == "2"
        assert resp.headers["RateLimit-Remaining"] == "0"
        assert int(resp.headers["RateLimit-Reset"]) > 0
        await plane.settled()
        assert (await plane.account()).spent == 2 * 20_000


async def test_per_request_cost_cap_lowers_the_output_limit_or_refuses(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(
            budget("acme", "10.00", policy={"maxRequestCost": "0.50"}), ACME_KEY
        )
        resp = await plane.post_chat(max_tokens=100)  # up to 1.01: lowered to what 0.50 pays
        assert resp.status == 200
        assert resp.headers["X-Spendgate-Output-Limit"] == "49; reason=balance"
        assert (await resp.json())["usage"]["completion_tokens"] == 49
        assert (await plane.post_chat(max_tokens=10)).status == 200
        await plane.apply_budget(
            budget("acme", "10.00", policy={"maxRequestCost": "0.10"}), ACME_KEY
        )
        resp = await plane.post_chat(max_tokens=100)  # even 16 tokens (0.17) cost too much
        assert resp.status == 402
        assert (await _error(resp))["code"] == "request_cost_limit"


async def test_malformed_json_body_gets_400(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        for body in (b"{not json", b"[1, 2]", b'{"max_tokens": -3}', b'{"model": 5}'):
            resp = await plane.client.post(
                "/v1/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"},
            )
            assert resp.status == 400, body
            code = "invalid_json" if body == b"{not json" else "invalid_body"
            assert (await _error(resp))["code"] == code
        assert (await plane.account()).held == 0


async def test_oversized_body_gets_413(redis_url: str) -> None:
    async with data_plane(redis_url, settings=lambda s: replace(s, max_body_bytes=1024)) as plane:
        resp = await plane.client.post(
            "/echo", data=b"x" * 4096, headers={"Authorization": f"Bearer {ACME_KEY}"}
        )
        assert resp.status == 413
        assert (await _error(resp))["code"] == "request_too_large"

        async def chunks():  # no Content-Length: the limit must hold while reading
            for _ in range(8):
                yield b"y" * 512

        resp = await plane.client.post(
            "/echo", data=chunks(), headers={"Authorization": f"Bearer {ACME_KEY}"}
        )
        assert resp.status == 413
        assert (await plane.account()).balance == 10 * MICRO


async def test_unpriced_route_is_refused(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.client.post(
            "/v1/images/generations", json={}, headers={"Authorization": f"Bearer {ACME_KEY}"}
        )
        assert resp.status == 404
        assert (await _error(resp))["code"] == "unpriced_route"


async def test_currency_mismatch_between_pricebook_and_budget(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.apply_budget(budget("acme", "10.00", currency="EUR"), ACME_KEY)
        resp = await plane.post_chat()
        assert resp.status == 500
        assert (await _error(resp))["code"] == "billing_misconfigured"
        assert (await plane.account()).held == 0


async def test_new_key_works_within_a_second_without_restart(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        assert (await plane.post_chat(OTHER_KEY)).status == 401
        await plane.apply_budget(budget("other", "1.00"), OTHER_KEY)
        await asyncio.sleep(0.5)
        assert hash_api_key(OTHER_KEY) in plane.sidecar.config.keys
        assert (await plane.post_chat(OTHER_KEY)).status == 200


async def test_revoked_key_stops_working_within_a_second(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        assert (await plane.post_chat()).status == 200
        await plane.store.revoke_customer("acme", "test")
        await asyncio.sleep(0.5)
        assert (await plane.post_chat()).status == 401


async def test_new_prices_apply_within_a_second(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        pricebook = json.loads(json.dumps(PRICEBOOK))
        pricebook["spec"]["rules"][3]["price"]["flat"] = "0.25"  # echo
        from spendgate.models import parse_resource

        await plane.store.apply_pricebook(parse_resource(pricebook))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        resp = await plane.client.post(
            "/echo", data=b"{}", headers={"Authorization": f"Bearer {ACME_KEY}"}
        )
        assert resp.status == 200
        await plane.settled()
        assert (await plane.account()).spent == 250_000


async def test_suspension_applies_to_the_next_request(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        assert (await plane.post_chat()).status == 200
        await plane.ledger.suspend("acme", "payment", "invoice.payment_failed")
        assert (await plane.post_chat()).status == 403
        await plane.ledger.unsuspend("acme", "payment")
        assert (await plane.post_chat()).status == 200


async def test_health_readiness_and_metrics(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        assert (await plane.probes.get("/healthz")).status == 200
        ready = await plane.probes.get("/readyz")
        assert ready.status == 200
        assert (await ready.json())["redis"] == "ok"
        await plane.post_chat(max_tokens=2)
        await plane.post_chat("sk-nobody-0123456789")
        await plane.settled()
        text = await (await plane.probes.get("/metrics")).text()
        assert 'spendgate_decisions_total{outcome="admitted"} 1.0' in text
        assert 'spendgate_decisions_total{outcome="invalid_key"} 1.0' in text
        assert 'spendgate_spend_micros_total{currency="USD"} 30000.0' in text
        assert "spendgate_added_latency_seconds_count 1.0" in text


async def test_readiness_fails_without_pricebook(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        await plane.store.delete_pricebook("default/default")
        await asyncio.sleep(0.3)
        ready = await plane.probes.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["pricebook"] == "missing"
        resp = await plane.post_chat()
        assert resp.status == 503


async def test_logs_never_contain_api_keys(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from spendgate.logs import JsonFormatter

    caplog.set_level(logging.DEBUG)
    async with data_plane(redis_url, acme_balance="0.02") as plane:
        await plane.post_chat(max_tokens=1)
        await plane.post_chat(max_tokens=50)  # 402
        await plane.post_chat(f"{ACME_KEY}x")  # unknown
        await plane.client.post("/echo", data=b"{}", headers={"X-API-Key": OTHER_KEY})
        await plane.settled()
    formatter = JsonFormatter()
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert caplog.records
    assert ACME_KEY not in text
    assert OTHER_KEY not in text
    assert ACME_KEY[:12] not in text
