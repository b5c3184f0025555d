"""CORS: ``OPTIONS`` is answered by the sidecar, never forwarded, never asks for a key.

With no allowed origins (the default) a preflight gets 204 and no ``Access-Control-*``
headers, so browsers on other sites cannot call the API (an API key in a web page is a leaked
key). Origins listed in ``--cors-origin`` (or ``*``) get the preflight answered for any method
and the request headers they ask for, and their responses expose the spendgate headers.
"""

from __future__ import annotations

from aiohttp import web

from .context import REQUEST_ID_HEADER

ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSED_HEADERS = ", ".join(
    (REQUEST_ID_HEADER, "Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
)
PREFLIGHT_MAX_AGE_S = 600


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        return self.any_origin or origin.rstrip("/").lower() in self.origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        # Echo the origin (never "*"): credentials (Authorization) are allowed with it.
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def preflight(self, request: web.Request) -> web.Response:
        """The answer to any ``OPTIONS`` request."""
        headers = {"Allow": ALLOWED_METHODS}
        origin = request.headers.get("Origin")
        if self.allows(origin) and "Access-Control-Request-Method" in request.headers:
            assert origin is not None
            asked = request.headers.get("Access-Control-Request-Headers", "")
            headers.update(self._origin_headers(origin))
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            headers["Access-Control-Allow-Headers"] = asked[:1000] or "Authorization, Content-Type"
            headers["Access-Control-Allow-Credentials"] = "true"
            headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        elif origin:
            headers["Vary"] = "Origin"
        return web.Response(status=204, headers=headers)

    def decorate(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Adds the CORS headers to an actual (non-preflight) response for an allowed origin."""
        origin = request.headers.get("Origin")
        if self.allows(origin):
            assert origin is not None
            response.headers.update(self._origin_headers(origin))
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
