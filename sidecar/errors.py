"""Refusals in the OpenAI error shape: ``{"error": {"type", "code", "message"}}``."""

from __future__ import annotations

import json
import math

from aiohttp import web

from spendgate.ledger import Outcome, RateInfo, Reservation
from spendgate.money import format_amount


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


def refusal(reservation: Reservation) -> web.Response:
    """The response for a reservation the ledger refused."""
    outcome = reservation.outcome
    if outcome is Outcome.rate_limited:
        headers = rate_limit_headers(reservation.rate)
        headers["Retry-After"] = retry_after_seconds(reservation.retry_after_ms or 0)
        return error_response(
            429, "rate_limit_error", "rate_limit_exceeded",
            "Rate limit reached for this customer or key; retry after "
            f"{headers['Retry-After']} s.",
            headers=headers,
        )  # fmt: skip
    if outcome in (Outcome.insufficient, Outcome.cap_reached):
        what = "balance" if outcome is Outcome.insufficient else "spend limit for this period"
        return error_response(
            402, "insufficient_quota", "insufficient_balance"
            if outcome is Outcome.insufficient else "spend_limit_reached",
            f"Your {what} does not cover this request (needs "
            f"{format_amount(reservation.estimate)}, available "
            f"{format_amount(max(0, reservation.available or 0))}).",
        )  # fmt: skip
    if outcome is Outcome.cost_cap:
        return error_response(
            402, "insufficient_quota", "request_cost_limit",
            f"This request may cost up to {format_amount(reservation.estimate)}, more than "
            f"the per-request limit of {format_amount(reservation.available or 0)}; "
            "lower max_tokens.",
        )  # fmt: skip
    if outcome is Outcome.suspended:
        return error_response(
            403, "permission_error", "account_suspended",
            "This account is suspended; contact your provider.",
        )  # fmt: skip
    if outcome is Outcome.unknown_customer:
        return invalid_key()
    if outcome is Outcome.currency_mismatch:
        return error_response(
            500, "server_error", "billing_misconfigured",
            "This model's prices are in a different currency than your budget.",
        )  # fmt: skip
    return error_response(
        409, "invalid_request_error", "duplicate_request", "Duplicate request id."
    )
