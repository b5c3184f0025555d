"""Refusals in the OpenAI error shape: ``{"error": {"type", "code", "message"}}``."""

from __future__ import annotations

import json
import math

from aiohttp import web

from spendgate.ledger import RateInfo


def error_response(
    status: int,
    type_: str,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = json.dumps({"error": {"type": type_, "code": code, "message": message}})
    return web.Response(
        status=status, text=body, content_type="application/json", headers=headers or {}
    )


def rate_limit_headers(rate: RateInfo | None) -> dict[str, str]:
    if rate is None:
        return {}
    return {
        "RateLimit-Limit": str(rate.limit),
        "RateLimit-Remaining": str(max(0, rate.remaining)),
        "RateLimit-Reset": str(max(0, math.ceil(rate.reset_ms / 1000))),
    }


def retry_after_seconds(milliseconds: int) -> str:
    return str(max(1, math.ceil(milliseconds / 1000)))


def missing_key() -> web.Response:
    return error_response(
        401,
        "invalid_request_error",
        "missing_api_key",
        "No API key provided. Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
        headers={"WWW-Authenticate": 'Bearer realm="spendgate"'},
    )


def invalid_key() -> web.Response:
    return error_response(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided.",
        headers={"WWW-Authenticate": 'Bearer realm="spendgate", error="invalid_token"'},
    )


def store_unavailable() -> web.Response:
    return error_response(
        503,
        "server_error",
        "billing_unavailable",
        "The billing store is unavailable; the request was not sent to the model.",
        headers={"Retry-After": "1"},
    )
