"""Refusals in the OpenAI error shape: ``{"error": {"type", "code", "message"}}``."""

from __future__ import annotations

import json
import math

from aiohttp import web

from spendgate.ledger import Outcome, RateInfo, Reservation
from spendgate.money import format_amount
from spendgate.script_config import is_throttle_limit


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


def bad_request(code: str, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return error_response(400, "invalid_request_error", code, message, headers=headers)


def error_type_for(status: int) -> str:
    """The OpenAI error type that goes with an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


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


def _shortfall(outcome: Outcome, estimate: int, available: int) -> str:
    """The 402 message, with the real figures (``available`` is below zero when overdrawn)."""
    cost = f"This request may cost up to {format_amount(estimate)}"
    if outcome is Outcome.insufficient:
        if available < 0:
            return f"{cost}; your balance, less requests in flight, is {format_amount(available)}."
        return f"{cost}; {format_amount(available)} of your balance is available."
    if available < 0:
        return (
            f"{cost}; your spend limit for this period is exceeded by {format_amount(-available)}."
        )
    return f"{cost}; your spend limit for this period has {format_amount(available)} left."


def _throttled(reservation: Reservation) -> str:
    """Why a rate limit refused, when it is a throttle soft limit's."""
    if not is_throttle_limit(reservation.limit_id):
        return ""
    return " (throttled: a soft limit of its spend is reached)"


def _above(reservation: Reservation, customer: str) -> str:
    """The budget above the customer's own (in its tree) that refused, or "". Its figures are
    not shown: they count its other children's spend too."""
    level = reservation.level
    return level if level not in ("", "key", customer) else ""


def _level_refusal(reservation: Reservation, level: str) -> web.Response:
    outcome = reservation.outcome
    if outcome is Outcome.rate_limited:
        headers = rate_limit_headers(reservation.rate)
        headers["Retry-After"] = retry_after_seconds(reservation.retry_after_ms or 0)
        return error_response(
            429, "rate_limit_error", "rate_limit_exceeded",
            f"Rate limit of budget '{level}' reached{_throttled(reservation)}; retry after"
            f" {headers['Retry-After']} s.",
            headers=headers,
        )  # fmt: skip
    if outcome is Outcome.suspended:
        return error_response(
            403, "permission_error", "account_suspended",
            f"Budget '{level}' is suspended; contact your provider.",
        )  # fmt: skip
    if outcome is Outcome.cap_reached:
        return error_response(
            402, "insufficient_quota", "spend_limit_reached",
            f"Budget '{level}' spend limit for this period reached.",
        )  # fmt: skip
    return error_response(
        402, "insufficient_quota", "insufficient_balance",
        f"Budget '{level}' balance is insufficient for this request.",
    )  # fmt: skip


def refusal(reservation: Reservation, customer: str = "") -> web.Response:
    """The response for a reservation the ledger refused; ``customer`` is the budget of the
    request's key (a refusal by a budget above it in its tree names that budget)."""
    outcome = reservation.outcome
    above = _above(reservation, customer)
    if above and outcome in (
        Outcome.rate_limited, Outcome.suspended, Outcome.cap_reached, Outcome.insufficient
    ):  # fmt: skip
        return _level_refusal(reservation, above)
    if outcome is Outcome.rate_limited:
        headers = rate_limit_headers(reservation.rate)
        headers["Retry-After"] = retry_after_seconds(reservation.retry_after_ms or 0)
        return error_response(
            429, "rate_limit_error", "rate_limit_exceeded",
            f"Rate limit reached for this customer or key{_throttled(reservation)}; retry"
            f" after {headers['Retry-After']} s.",
            headers=headers,
        )  # fmt: skip
    if outcome in (Outcome.insufficient, Outcome.cap_reached):
        return error_response(
            402, "insufficient_quota", "insufficient_balance"
            if outcome is Outcome.insufficient else "spend_limit_reached",
            _shortfall(outcome, reservation.estimate, reservation.available or 0)
            if reservation.level != "key" else
            f"This request may cost up to {format_amount(reservation.estimate)}; this API key's"
            f" spend limit for this period has {format_amount(reservation.available or 0)} left.",
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
