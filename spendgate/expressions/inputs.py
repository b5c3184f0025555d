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
from email.policy import HTTP
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
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise BodyError("multipart body without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, Any] = {}
    parts = body.split(delimiter)
    if len(parts) < 3 and not body.startswith(delimiter):
        raise BodyError("multipart body does not contain its boundary")
    for part in parts[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        if len(fields) >= MAX_FORM_FIELDS:
            raise BodyError(f"form has more than {MAX_FORM_FIELDS} fields")
        head, separator, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise BodyError("multipart part without a header block")
        data = data.removesuffix(b"\r\n")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head)
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        filename = headers.get_param("filename", header="content-disposition")
        if isinstance(filename, str):
            fields[name] = {
                "filename": filename,
                "content_type": headers.get_content_type(),
                "bytes": len(data),
            }
        elif len(data) <= MAX_FORM_FIELD_BYTES:
            try:
                fields[name] = data.decode()
            except UnicodeDecodeError:
                raise BodyError(f"form field {name!r} is not UTF-8 text") from None
    return fields


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
