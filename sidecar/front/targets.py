"""Request targets: only origin-form (``/path?query``) is served, and the upstream URL is built
from the configured upstream and the path and query alone.

Absolute-form (``POST http://other.host/... HTTP/1.1``), authority-form and asterisk-form
targets are refused, as are paths with dot segments (``/a/../b``, also percent-encoded): the
model might resolve them to another route than the one priced.
"""

from __future__ import annotations

import re

from aiohttp import web
from yarl import URL

from .. import errors

_DOT_SEGMENT = re.compile(r"(?i)/(?:\.|%2e){1,2}(?=/|$|\?)")


def target_problem(raw_target: str) -> str | None:
    """Why ``raw_target`` (the request line's target) is refused, or None."""
    if not raw_target.startswith("/"):
        form = " (absolute-form targets are not accepted)" if "://" in raw_target else ""
        return f"The request target must be a path such as /v1/chat/completions{form}."
    path = raw_target.split("?", 1)[0]
    if _DOT_SEGMENT.search(path):
        return "The request path must not contain '.' or '..' segments."
    return None


def refuse_target(request: web.Request) -> web.Response | None:
    problem = target_problem(request.raw_path)
    if problem is None:
        return None
    return errors.bad_request("invalid_request_target", problem)


class UpstreamBase:
    """The model's base URL; :meth:`url_for` appends a request's path and query to it."""

    def __init__(self, upstream: str) -> None:
        base = URL(upstream.rstrip("/"))
        if not base.is_absolute() or base.scheme not in ("http", "https"):
            raise ValueError(f"upstream {upstream!r}: expected an http(s) URL")
        self.base = base
        self._prefix = base.raw_path.rstrip("/")

    def url_for(self, request: web.BaseRequest) -> URL:
        path, _, query = request.raw_path.partition("?")
        if not path.startswith("/"):  # refused earlier; never let it choose the host
            raise ValueError("request target is not origin-form")
        return URL.build(
            scheme=self.base.scheme,
            authority=self.base.raw_authority,
            path=self._prefix + path,
            query_string=query,
            encoded=True,
        )
