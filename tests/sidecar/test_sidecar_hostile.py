"""Hostile and malformed requests: every one a clear 4xx in the OpenAI shape, never a 5xx."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from typing import Any

import pytest
from aiohttp import web

from tests.support.sidecar_env import ACME_KEY, DataPlane, data_plane

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


async def _error(resp: Any) -> dict[str, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message"}
    return body["error"]


def _upstream_calls(plane: DataPlane) -> int:
    from spendgate.sidecar.standin import STATE

    assert plane.upstream.app is not None
    return sum(plane.upstream.app[STATE].requests.values())


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes as they are; return all the server answers before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def _status_and_headers(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# ------------------------------------------------------------------------------- JSON bodies


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,  # RecursionError in json.loads before
        b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}",  # deeper than the limit of 64
        b'{"max_tokens": ' + b"7" * 5000 + b"}",  # int() digit limit: ValueError before
        b'{"model": "x", "n": ' + b"9" * 4400 + b"}",
        b"\xff\xfe\x00garbage",
        b"",  # an empty body is forwarded as it is; the model decides (see below)
    ],
)
async def test_unparsable_json_is_400_invalid_json(redis_url: str, body: bytes) -> None:
    async with data_plane(redis_url) as plane:
        resp = await plane.client.post("/echo", data=body, headers=JSON)
        if body == b"":
            assert resp.status == 200
            return
        assert resp.status == 400, await resp.text()
        assert (await _error(resp))["code"] == "invalid_json"
        assert _upstream_calls(plane) == 0
        assert (await plane.account()).held == 0


async def test_json_of_the_wrong_shape_is_400_invalid_body(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        for body in (b"[1, 2]", b'"text"', b'{"max_tokens": -3}', b'{"model": 5}'):
            resp = await plane.client.post("/echo", data=body, headers=JSON)
            assert resp.status == 400, body
            assert (await _error(resp))["code"] == "invalid_body", body
        assert _upstream_calls(plane) == 0


async def test_json_sent_as_another_type_is_still_priced_as_json(redis_url: str) -> None:
    """curl -d sends form-urlencoded; a mislabelled JSON body must not escape its price."""
    async with data_plane(redis_url) as plane:
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            bad = await plane.client.post(
                "/echo", data=b'{"max_tokens": -3}', headers={**AUTH, "Content-Type": content_type}
            )
            assert bad.status == 400
            assert (await _error(bad))["code"] == "invalid_body"
        # Not JSON at all, and not typed JSON: an opaque body, forwarded as it is.
        resp = await plane.client.post(
            "/echo", data=b"{just text", headers={**AUTH, "Content-Type": "text/plain"}
        )
        assert resp.status == 200
        assert (await resp.json())["body"] == "{just text"


# -------------------------------------------------------------------------- Content-Encoding


async def test_gzip_and_deflate_bodies_reach_the_model_decoded(redis_url: str) -> None:
    payload = json.dumps({"model": "standin", "messages": [{"role": "user", "content": "hi"}]})
    encoded = {
        "gzip": gzip.compress(payload.encode()),
        "x-gzip": gzip.compress(payload.encode()),
        "deflate": zlib.compress(payload.encode()),
    }
    raw_deflate = zlib.compressobj(wbits=-15)
    encoded_raw = raw_deflate.compress(payload.encode()) + raw_deflate.flush()
    async with data_plane(redis_url) as plane:
        cases = [*encoded.items(), ("deflate", encoded_raw), ("identity", payload.encode())]
        for coding, data in cases:
            resp = await plane.client.post(
                "/echo", data=data, headers={**JSON, "Content-Encoding": coding}
            )
            assert resp.status == 200, (coding, await resp.text())
            echoed = await resp.json()
            assert echoed["json"] == json.loads(payload), coding
            assert "content-encoding" not in echoed["headers"]


@pytest.mark.parametrize(
    ("coding", "data", "status", "code"),
    [
        ("gzip", b'{"model": "not gzip"}', 400, "invalid_encoding"),
        ("gzip", gzip.compress(b'{"a": 1}')[:-6], 400, "invalid_encoding"),  # truncated
        ("gzip", gzip.compress(b'{"a": 1}') + b"trailing", 400, "invalid_encoding"),
        ("deflate", b"\x00\x01\x02garbage", 400, "invalid_encoding"),
        ("gzip", gzip.compress(b" " * 3_000_000), 413, "request_too_large"),  # a small bomb
        ("br", b"\x0b\x02\x80{}\x03", 415, "unsupported_content_encoding"),
        ("zstd", b"(\xb5/\xfd", 415, "unsupported_content_encoding"),
        ("gzip, gzip", gzip.compress(gzip.compress(b"{}")), 415, "unsupported_content_encoding"),
    ],
)
async def test_bad_or_unknown_encodings_are_refused(
    redis_url: str, coding: str, data: bytes, status: int, code: str
) -> None:
    limit = lambda s: s.__class__(**{**s.__dict__, "max_body_bytes": 1_000_000})  # noqa: E731
    async with data_plane(redis_url, settings=limit) as plane:
        resp = await plane.client.post(
            "/echo", data=data, headers={**JSON, "Content-Encoding": coding}
        )
        assert resp.status == status, await resp.text()
        assert (await _error(resp))["code"] == code
        if status == 415:
            assert resp.headers["Accept-Encoding"] == "gzip, deflate, identity"
        assert _upstream_calls(plane) == 0


async def test_truncated_chunked_body_is_400_not_500(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        assert plane.client.port is not None
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ACME_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5\r\n{\"a\":\r\nZZ\r\n"
        )  # fmt: skip
        status, headers, _ = _status_and_headers(await raw_exchange(plane.client.port, request))
        assert status == 400
        assert headers["server"] == "spendgate"


# ---------------------------------------------------------------------------- request targets


@pytest.mark.parametrize(
    "target",
    [
        b"http://other.host/v1/chat/completions",
        b"http://127.0.0.1:1/echo",
        b"/echo/../v1/chat/completions",
        b"/v1/%2e%2e/echo",
    ],
)
async def test_targets_other_than_plain_paths_are_400(redis_url: str, target: bytes) -> None:
    async with data_plane(redis_url) as plane:
        assert plane.client.port is not None
        request = (
            b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ACME_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        )  # fmt: skip
        status, headers, body = _status_and_headers(await raw_exchange(plane.client.port, request))
        assert status == 400
        assert json.loads(body)["error"]["code"] == "invalid_request_target"
        assert headers["x-spendgate-request-id"]
        assert _upstream_calls(plane) == 0


def test_upstream_url_is_built_from_the_configured_base_and_the_path_only() -> None:
    from unittest.mock import Mock

    from spendgate.sidecar.front.targets import UpstreamBase

    base = UpstreamBase("http://127.0.0.1:8000/prefix/")
    url = base.url_for(Mock(raw_path="//evil.example/x@other?q=%20&k"))
    assert (url.host, url.port) == ("127.0.0.1", 8000)
    assert url.raw_path == "/prefix//evil.example/x@other"
    assert url.raw_query_string == "q=%20&k"
    with pytest.raises(ValueError):
        base.url_for(Mock(raw_path="http://other.host/x"))


# ---------------------------------------------------------------------- protocol errors, logs

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GET /echo HTTP/1.1\r\nX-API-Key: sk-secret-\x01-0123456789\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
]


async def test_malformed_http_gets_json_400_and_few_log_lines(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with data_plane(redis_url) as plane:
        port = plane.client.port
        assert port is not None
        answers = []
        for _ in range(30):
            for request in MALFORMED:
                answers.append(await raw_exchange(port, request))
        for raw in answers:
            if not raw:
                continue  # the TLS hello may be dropped without an answer
            status, headers, body = _status_and_headers(raw)
            assert status == 400, raw[:200]
            assert headers["server"] == "spendgate"
            assert headers["x-spendgate-request-id"]
            assert json.loads(body)["error"]["code"] == "malformed_request"
        # Still serving.
        assert (await plane.client.post("/echo", data=b"{}", headers=AUTH)).status == 200
    lines = [r for r in caplog.records if r.name.startswith(("aiohttp", "spendgate.sidecar"))]
    assert not [r for r in lines if r.exc_info], "a traceback was logged"
    protocol = [r for r in lines if r.name == "spendgate.sidecar.protocol"]
    assert 1 <= len(protocol) <= 40, f"{len(protocol)} lines for {len(answers)} bad requests"
    assert any(getattr(r, "suppressed", 0) for r in protocol) or len(protocol) < 21
    assert "sk-secret" not in caplog.text


async def test_no_server_version_banner(redis_url: str) -> None:
    async with data_plane(redis_url) as plane:
        for resp in (
            await plane.post_chat(),
            await plane.client.post("/echo"),
            await plane.client.options("/v1/chat/completions"),
        ):
            assert resp.headers["Server"] == "spendgate"
        assert (await plane.probes.get("/healthz")).headers["Server"] == "spendgate"


# ------------------------------------------------------------------------- upstream errors


async def test_upstream_text_error_is_relayed_in_the_openai_shape(redis_url: str) -> None:
    async def too_large(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=413, text="Request Entity Too Large\n\nmax 1 MiB")

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", too_large)
    async with data_plane(redis_url, upstream_app=upstream) as plane:
        resp = await plane.post_chat()
        assert resp.status == 413
        error = await _error(resp)
        assert error["code"] == "upstream_error"
        assert "413" in error["message"] and "max 1 MiB" in error["message"]
        assert resp.headers["X-Spendgate-Request-Id"]
        await plane.settled()
        assert (await plane.account()).held == 0


# ---------------------------------------------------------------------------------- CORS


async def test_preflight_is_answered_without_a_key_and_never_forwarded(redis_url: str) -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with data_plane(redis_url) as plane:
        resp = await plane.client.options("/v1/chat/completions", headers=preflight)
        assert resp.status == 204
        assert "Access-Control-Allow-Origin" not in resp.headers  # no origins allowed
        assert _upstream_calls(plane) == 0
    allow = lambda s: s.__class__(**{**s.__dict__, "cors_origins": ("https://app.example",)})  # noqa: E731
    async with data_plane(redis_url, settings=allow) as plane:
        resp = await plane.client.options("/v1/chat/completions", headers=preflight)
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        other = await plane.client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "Access-Control-Allow-Origin" not in other.headers
        served = await plane.post_chat(headers={"Origin": "https://app.example"})
        assert served.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "X-Spendgate-Request-Id" in served.headers["Access-Control-Expose-Headers"]
        assert _upstream_calls(plane) == 1


async def test_a_body_the_model_refuses_as_too_large_is_413_in_the_openai_shape(
    redis_url: str,
) -> None:
    async def read(request: web.Request) -> web.Response:
        await request.read()  # aiohttp answers 413 in text/plain past client_max_size
        return web.json_response({})

    upstream = web.Application(client_max_size=1024 * 1024)
    upstream.router.add_route("*", "/{tail:.*}", read)
    async with data_plane(redis_url, upstream_app=upstream) as plane:
        for size in (2, 6):
            body = json.dumps({"model": "standin", "input": "x" * (size * 1024 * 1024)})
            resp = await plane.client.post("/echo", data=body, headers=JSON)
            assert resp.status == 413, await resp.text()
            assert (await _error(resp))["code"] == "upstream_error"
