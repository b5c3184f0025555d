"""What a price expression reads: the request body as fields, the response as JSON.

Bodies are parsed here, without a web framework: JSON objects, ``multipart/form-data`` (the
OpenAI audio and image-edit uploads) and URL-encoded forms. A form's file part becomes
``{"filename", "content_type", "bytes"}``, so an expression can price an upload by its size
without the file being copied into the expression's input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import parse_qsl

MAX_FORM_FIELDS = 256
MAX_FORM_FIELD_BYTES = 64 * 1024


class BodyError(ValueError):
    """A request body that says it is JSON or a form and is not."""


def _media_type(content_type: str) -> tuple[str, Message]:
    header = Message()
    header["content-type"] = content_type or "application/octet-stream"
    return header.get_content_type(), header


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """A JSON object, or None when the bytes are not one."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _multipart(body: bytes, header: Message) -> dict[str, Any]:
    """Fields of a multipart form, found by index: a large file part is never copied."""
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BodyError("multipart body without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, Any] = {}
    position = body.find(delimiter)
    if position < 0:
        raise BodyError("multipart body does not contain its boundary")
    while True:
        position += len(delimiter)
        if body.startswith(b"--", position):
            return fields  # the closing delimiter
        if len(fields) >= MAX_FORM_FIELDS:
            raise BodyError(f"form has more than {MAX_FORM_FIELDS} fields")
        head_end = body.find(b"\r\n\r\n", position)
        data_end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if data_end < 0:
            raise BodyError("multipart part without a header block or a closing boundary")
        headers = BytesHeaderParser().parsebytes(body[position:head_end].lstrip(b"\r\n"))
        _form_field(fields, headers, body, head_end + 4, data_end)
        position = data_end + 2


def _form_field(
    fields: dict[str, Any], headers: Message, body: bytes, start: int, end: int
) -> None:
    name = headers.get_param("name", header="content-disposition")
    if not isinstance(name, str):
        return
    filename = headers.get_param("filename", header="content-disposition")
    if isinstance(filename, str):
        fields[name] = {
            "filename": filename,
            "content_type": headers.get_content_type(),
            "bytes": end - start,
        }
    elif end - start <= MAX_FORM_FIELD_BYTES:
        try:
            fields[name] = body[start:end].decode()
        except UnicodeDecodeError:
            raise BodyError(f"form field {name!r} is not UTF-8 text") from None


def parse_request_body(body: bytes, content_type: str) -> dict[str, Any]:
    """The request's fields: a JSON object's members or a form's fields; {} for other bodies."""
    if not body:
        return {}
    media_type, header = _media_type(content_type)
    if media_type == "application/json" or media_type.endswith("+json"):
        parsed = parse_json_object(body)
        if parsed is None:
            raise BodyError("request body is not a JSON object")
        return parsed
    if media_type == "multipart/form-data":
        return _multipart(body, header)
    if media_type == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError) as error:
            raise BodyError(f"form body cannot be read: {error}") from None
        return dict(pairs)
    return {}


def with_defaults(fields: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The request's fields over the rule's defaults; a field sent as null takes its default."""
    merged = dict(defaults)
    merged.update((name, value) for name, value in fields.items() if value is not None)
    return merged


def named_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The headers a rule names (``names`` lower-case), present ones only.

    ``headers`` is looked up by each name; pass a case-insensitive mapping (as web frameworks
    provide) or one keyed by lower-case names.
    """
    picked = {}
    for name in names:
        value = headers.get(name)
        if value is not None:
            picked[name] = value
    return picked


__all__ = [
    "BodyError",
    "named_headers",
    "parse_json_object",
    "parse_request_body",
    "with_defaults",
]
