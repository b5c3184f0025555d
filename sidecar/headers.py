"""Which headers cross the sidecar, in which direction, and how the API key is found."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from spendgate.config_store import KeyOwner

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
# The body is forwarded decoded (see front/body.py), so its coding no longer applies.
DECODED_BODY_HEADERS = frozenset({"content-encoding"})
OWN_PREFIX = "x-spendgate-"
_MIN_KEY_LENGTH, _MAX_KEY_LENGTH = 8, 512


def extract_api_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The presented key, "" for a malformed credential, None when there is none."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    else:
        key = headers.get("X-API-Key", None)
        if key is None:
            return None
        key = key.strip()
    if not _MIN_KEY_LENGTH <= len(key) <= _MAX_KEY_LENGTH or not key.isprintable() or " " in key:
        return ""
    return key


def forward_headers(request: web.Request, owner: KeyOwner, request_id: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in CREDENTIAL_HEADERS or lower in DECODED_BODY_HEADERS:
            continue
        if lower.startswith(OWN_PREFIX):
            continue
        headers[name] = value
    headers["X-Spendgate-Customer"] = owner.customer_id
    headers["X-Spendgate-Key"] = owner.key_name
    headers["X-Spendgate-Request-Id"] = request_id
    if request.remote:
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
    return headers


def response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in upstream.headers.items():
        if name.lower() in HOP_BY_HOP and name.lower() != "content-length":
            continue
        headers[name] = value
    return headers
