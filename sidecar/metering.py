"""Watching a model's response go by: SSE events, token usage, without changing a byte."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy

from spendgate.models import UsageHeaders

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
# An event carries output when one of these fields holds a non-empty string. Role-only and
# finish chunks carry none; this avoids parsing the JSON of every event.
_HAS_OUTPUT = re.compile(rb'"(?:content|text|arguments|reasoning_content)"\s*:\s*"(?!")')
_MAX_JSON_COPY = 4 * 1024 * 1024
_MAX_PARTIAL_EVENT = 1024 * 1024


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    source: str  # "header", "body", "counted" or "estimate"


def _usage_from_object(payload: Any) -> tuple[int, int] | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if prompt < 0 or completion < 0:
        return None
    return prompt, completion


def usage_from_headers(
    headers: CIMultiDictProxy[str], names: UsageHeaders
) -> tuple[int, int] | None:
    raw_in = headers.get(names.input_tokens)
    raw_out = headers.get(names.output_tokens)
    if raw_in is None and raw_out is None:
        return None
    try:
        tokens_in, tokens_out = int(raw_in or 0), int(raw_out or 0)
    except ValueError:
        return None
    if tokens_in < 0 or tokens_out < 0:
        return None
    return tokens_in, tokens_out


class ResponseTap:
    """Follows a response body: splits SSE into events, counts them, finds ``usage``.

    ``feed`` returns the bytes that may be sent now. For SSE these are whole events (a partial
    event waits for its end, so a stream can be cut between events); otherwise the chunk itself.
    Concatenated, the returned pieces are exactly the upstream bytes.
    """

    def __init__(self, content_type: str, content_encoding: str) -> None:
        content_type = content_type.lower()
        self.sse = "text/event-stream" in content_type and not content_encoding
        self._json = "json" in content_type and not content_encoding
        self._partial = b""
        self._json_copy = bytearray()
        self.events = 0  # data events that carried output (not [DONE], not a usage-only chunk)
        self.usage: tuple[int, int] | None = None
        self.done = False
        self.body: Any = None  # the parsed JSON body, when it was JSON and small enough
        self.last_event_data: bytes | None = None  # data of the last SSE event before [DONE]

    def feed(self, chunk: bytes) -> list[tuple[bytes, int]]:
        """Pieces to send, each with the count of output events up to and including it."""
        if not self.sse:
            if self._json and len(self._json_copy) + len(chunk) <= _MAX_JSON_COPY:
                self._json_copy += chunk
            elif self._json:
                self._json = False  # too large to inspect; usage falls back to estimates
                self._json_copy = bytearray()
            return [(chunk, self.events)]
        buffer = self._partial + chunk
        pieces = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            event = buffer[start : match.end()]
            self._inspect_event(event)
            pieces.append((event, self.events))
            start = match.end()
        self._partial = buffer[start:]
        if len(self._partial) > _MAX_PARTIAL_EVENT:
            # Not SSE as we know it: pass it through rather than buffering without bound.
            pieces.append((self._partial, self.events))
            self._partial = b""
        return pieces

    def finish(self) -> bytes:
        """The bytes still held back (an unterminated last event); parses a JSON body."""
        rest, self._partial = self._partial, b""
        if self.sse and rest:
            self._inspect_event(rest)
        if self._json and self._json_copy:
            try:
                self.body = json.loads(self._json_copy)
            except (ValueError, UnicodeDecodeError, RecursionError):
                self.body = None
            self.usage = _usage_from_object(self.body)
        return rest

    def _inspect_event(self, event: bytes) -> None:
        data = b"".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data:
            return
        if data.strip() == b"[DONE]":
            self.done = True
            return
        self.last_event_data = data
        if _HAS_USAGE.search(data):
            try:
                payload = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                payload = None
            usage = _usage_from_object(payload)
            if usage is not None:
                self.usage = usage
                if not payload.get("choices"):
                    return
        if _HAS_OUTPUT.search(data):
            self.events += 1


def response_payload(tap: ResponseTap | None) -> dict[str, Any] | None:
    """The answer as a price expression reads it: a JSON body, or a stream's last JSON event."""
    if tap is None:
        return None
    if tap.sse:
        if tap.last_event_data is None:
            return None
        try:
            payload = json.loads(tap.last_event_data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    else:
        payload = tap.body
    return payload if isinstance(payload, dict) else None


def sse_error_event(type_: str, code: str, message: str) -> bytes:
    payload = json.dumps({"error": {"type": type_, "code": code, "message": message}})
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()
