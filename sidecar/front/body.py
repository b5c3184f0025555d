"""Reading a request body safely: its size, its ``Content-Encoding``, and its JSON.

Every way a body can be wrong ends as a :class:`BodyRefused` carrying a 4xx in the OpenAI
error shape; nothing here lets a parser's exception escape as a 500.

- Size: at most ``limit`` bytes as sent, and at most ``limit`` bytes once decoded.
- ``Content-Encoding``: ``identity``, ``gzip`` (``x-gzip``) and ``deflate`` (zlib or raw), one
  coding at most; anything else is 415 with ``Accept-Encoding``. A body that does not decode
  is 400. The decoded body is what the model receives (without ``Content-Encoding``).
- JSON: bodies typed JSON (``application/json``, ``application/*+json``) or sent without a
  ``Content-Type`` must be valid JSON objects nested at most :data:`MAX_JSON_DEPTH` deep.
  Bodies of any other type are opaque (priced by size), unless they parse as a JSON object:
  then they are priced as JSON, so a mislabelled body cannot choose a cheaper rule.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from spendgate.pricing import BadRequestBody, RequestFacts, inspect_body

from .. import errors

MAX_JSON_DEPTH = 64
THREAD_ABOVE = 1024 * 1024  # larger bodies are inspected off the event loop
ACCEPTED_ENCODINGS = "gzip, deflate, identity"

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS_CLOSERS = bytes.maketrans(b"{}", b"[]")


class BodyRefused(Exception):
    """A body the sidecar will not forward; ``response`` says why."""

    def __init__(self, outcome: str, response: web.Response, code: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.response = response
        self.code = code


def _bad(code: str, message: str) -> BodyRefused:
    return BodyRefused("bad_request", errors.bad_request(code, message), code)


def too_large(limit: int, what: str = "Request body") -> BodyRefused:
    return BodyRefused(
        "too_large",
        errors.error_response(
            413, "invalid_request_error", "request_too_large",
            f"{what} is larger than {limit} bytes.",
        ),
        "request_too_large",
    )  # fmt: skip


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body as the model will receive it: size-checked and decoded."""
    coding = _content_coding(request)
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except web.RequestPayloadError as error:  # truncated or malformed chunked framing
        raise _bad("invalid_body", f"The request body could not be read: {error}.") from None
    return decode(raw, coding, limit)


def _content_coding(request: web.Request) -> str:
    codings = [
        c.strip().lower()
        for c in request.headers.getall("Content-Encoding", [])
        for c in c.split(",")
        if c.strip() and c.strip().lower() != "identity"
    ]
    if not codings:
        return "identity"
    coding = codings[0]
    if len(codings) > 1 or coding not in ("gzip", "x-gzip", "deflate"):
        raise BodyRefused(
            "bad_request",
            errors.error_response(
                415, "invalid_request_error", "unsupported_content_encoding",
                f"Content-Encoding {', '.join(codings)!r} is not accepted; send one of "
                f"{ACCEPTED_ENCODINGS}.",
                headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
            ),
            "unsupported_content_encoding",
        )  # fmt: skip
    return "gzip" if coding == "x-gzip" else coding


def decode(raw: bytes, coding: str, limit: int) -> bytes:
    """``raw`` decoded from ``coding``; never more than ``limit`` bytes are produced."""
    if coding == "identity" or not raw:
        return raw
    if coding == "gzip":
        return _inflate(raw, zlib.MAX_WBITS | 16, coding, limit)
    try:  # "deflate" is zlib-wrapped by the RFC, raw deflate by some clients: accept both
        return _inflate(raw, zlib.MAX_WBITS, coding, limit)
    except BodyRefused as refused:
        if refused.code == "request_too_large":
            raise
        return _inflate(raw, -zlib.MAX_WBITS, coding, limit)


def _inflate(raw: bytes, wbits: int, coding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as error:
        raise _bad("invalid_encoding", f"The body is not valid {coding} data: {error}.") from None
    if len(body) > limit:
        raise too_large(limit, f"Request body decoded from {coding}")
    if not inflater.eof or inflater.unused_data:
        raise _bad(
            "invalid_encoding",
            f"The body is not valid {coding} data: "
            + ("it ends early." if not inflater.eof else "data follows its end."),
        )
    return body


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("", "application/json"):
        return True
    kind, _, subtype = media.partition("/")
    return kind == "application" and subtype.endswith("+json")


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether arrays and objects in ``body`` nest deeper than ``limit`` (strings skipped)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Drop escaped backslashes, then escaped quotes; what lies between quotes is then a string.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    brackets = outside_strings.translate(_OPENERS_CLOSERS, _NOT_BRACKETS)
    if b"[" * (limit + 1) in brackets:
        return True  # the common bomb: a long run of openers
    levels = 0  # each round removes the innermost pairs, one level of nesting
    while levels <= limit:
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False  # balanced and done, or unbalanced (the JSON parser says so)
        brackets, levels = shorter, levels + 1
    return True


async def inspect(body: bytes, content_type: str) -> RequestFacts:
    """:func:`request_facts`, in a worker thread for large bodies."""
    if len(body) > THREAD_ABOVE:
        return await asyncio.to_thread(request_facts, body, content_type)
    return request_facts(body, content_type)


def request_facts(body: bytes, content_type: str) -> RequestFacts:
    """What pricing needs from the body; a body typed JSON must be a valid JSON object."""
    if not body:
        return RequestFacts()
    if is_json_type(content_type):
        return _json_facts(body)
    if body.lstrip()[:1] == b"{":
        try:
            return _json_facts(body)
        except BodyRefused as refused:
            if refused.code != "invalid_json":
                raise  # a JSON object the model would read: its fields must be right
            # not JSON after all: an opaque body
    return inspect_body(body, "application/octet-stream")


def _json_facts(body: bytes) -> RequestFacts:
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise _bad("invalid_json", f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels.")
    try:
        return inspect_body(body, "application/json")
    except BadRequestBody as error:
        # Raised while handling the JSON parser's error: a syntax error; otherwise the shape.
        syntax = isinstance(error.__context__, ValueError)
        raise _bad("invalid_json" if syntax else "invalid_body", _sentence(error)) from None
    except (ValueError, RecursionError) as error:  # from the parser itself (e.g. huge integers)
        reason = _sentence(error)
        raise _bad("invalid_json", f"The request body is not valid JSON: {reason}") from None


def _sentence(error: Exception) -> str:
    text = (str(error).splitlines() or [type(error).__name__])[0][:300]
    return text + ("" if text.endswith(".") else ".")
