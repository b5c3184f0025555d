"""Structured logging: one JSON object per line, with secrets masked before anything is written.

``log.info("reserved", extra={"customer": "acme", "cost": "0.02"})`` becomes
``{"ts": "...", "level": "info", "logger": "...", "msg": "reserved", "customer": "acme", ...}``.
The redaction filter sits on the handler, so it covers every logger that propagates to root.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS = [
    # Authorization headers: keep the scheme, drop the credential.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # Stripe secrets and restricted keys, webhook signing secrets.
    (re.compile(r"\b(sk_live_|sk_test_|rk_live_|rk_test_|whsec_)[A-Za-z0-9]+"), r"\1" + REDACTED),
    # OpenAI-style keys, including our own sk-demo-... examples.
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-" + REDACTED),
    # Passwords in URLs: redis://user:secret@host -> redis://user:[REDACTED]@host
    (re.compile(r"(\w+://[^/\s:@]*):[^@\s/]+@"), r"\1:" + REDACTED + "@"),
    # key=value / "key": "value" pairs whose name says secret.
    (
        re.compile(
            r"(?i)\b((?:x-)?api[-_]?key|authorization|password|secret|token)"
            r"(\"?\s*[:=]\s*\"?)(?!bearer\b|basic\b)([^\s\",;]+)"
        ),
        r"\1\2" + REDACTED,
    ),
]
_SECRET_FIELD = re.compile(r"(?i)(^|[-_])(api[-_]?key|authorization|password|secret|token)$")

# Attributes every LogRecord has; anything else on a record came in through ``extra``. kopf
# puts its whole OperatorSettings (a page of repr) on each of its records: not a log field.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "settings",
}
# kopf's object loggers: the object is in the message already ("[ns/name] ...") for text.
_TEXT_SKIPPED = {"k8s_skip", "k8s_ref"}


class FieldSafeLogger(logging.Logger):
    """A logger on which no ``extra`` field can break the log call.

    The standard ``Logger.makeRecord`` raises ``KeyError`` for a field named like a LogRecord
    attribute (``created``, ``name``, ``msg``, ...), which turns a log line into a crash of the
    code that wrote it. Here such a field is kept under its name with a trailing underscore.
    """

    def makeRecord(
        self,
        name: str,
        level: int,
        fn: str,
        lno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        extra: Mapping[str, object] | None = None,
        sinfo: str | None = None,
    ) -> logging.LogRecord:
        if extra:
            extra = {(f"{key}_" if key in _RESERVED else key): v for key, v in extra.items()}
        return super().makeRecord(name, level, fn, lno, msg, args, exc_info, func, extra, sinfo)


# Every spendgate module gets its logger at import, after the package has imported this one.
logging.setLoggerClass(FieldSafeLogger)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any, name: str = "") -> Any:
    """Mask secrets in a field value; fields named like a secret are masked whole."""
    if name and _SECRET_FIELD.search(name) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Rewrites the record in place: message rendered and masked, extra fields masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for name, value in extra_fields(record).items():
            setattr(record, name, redact_value(value, name))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``: the text format keeps the structured
    fields (which pod, which budget, which error) that the JSON format has."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(
            f"{k}={_text_value(v)}"
            for k, v in extra_fields(record).items()
            if k not in _TEXT_SKIPPED
        )
        if not fields:
            return text
        head, newline, rest = text.partition("\n")  # a traceback stays below the fields
        return f"{head} {fields}{newline}{rest}"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def setup_logging(level: str | int = "INFO", json: bool = True) -> logging.Handler:
    """Log to stderr through the root logger (its handlers replaced); returns the handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "redact",
    "redact_value",
    "setup_logging",
]
