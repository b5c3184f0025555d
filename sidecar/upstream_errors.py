"""The model's error answers that are not JSON (a proxy's HTML page, a ``text/plain`` 413)
reach the client in the OpenAI error shape, with the model's status and a short excerpt."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from . import errors

EXCERPT_BYTES = 2048


def is_foreign_error(upstream: aiohttp.ClientResponse) -> bool:
    if upstream.status < 400:
        return False
    media = upstream.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return not (media == "application/json" or media.endswith("+json"))


async def foreign_error(upstream: aiohttp.ClientResponse) -> web.Response:
    """The error in our shape; reads at most :data:`EXCERPT_BYTES` of the model's body."""
    excerpt = ""
    try:
        raw = await upstream.content.read(EXCERPT_BYTES)
        excerpt = " ".join(raw.decode("utf-8", "replace").split())[:300]
    except (TimeoutError, aiohttp.ClientError):
        pass
    status = upstream.status
    message = f"The model answered {status} {upstream.reason or ''}".rstrip()
    message += f": {excerpt}" if excerpt else "."
    headers = {}
    if "Retry-After" in upstream.headers:
        headers["Retry-After"] = upstream.headers["Retry-After"]
    return errors.error_response(
        status, errors.error_type_for(status), "upstream_error", message, headers=headers
    )
