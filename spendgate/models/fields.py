"""The building blocks of the resource models: patterns, amount and duration types, CEL rules
for the CRD schemas, and the base model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

from ..durations import format_duration, parse_duration
from ..money import (
    CURRENCY_RE,
    MAX_MICROS,
    MICROS_PER_UNIT,
    format_amount,
    parse_amount,
    validate_currency,
)

GROUP = "spendgate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Customer ids become part of Redis keys (inside a hash tag), Kubernetes label values and Stripe
# metadata, so they are restricted to a conservative alphabet with no braces or colons.
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
KEY_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# The CRD schemas (``spendgate.crd``) are generated from these models. What the validators below
# check in Python is declared for the API server too: formats as OpenAPI patterns and bounds,
# cross-field rules as CEL (``x-kubernetes-validations``) next to the validator that enforces
# them. Patterns use RE2 syntax (the API server is written in Go) and ``[0-9]``, never ``\d``.
#
# Amounts are ``x-kubernetes-int-or-string``: a decimal string ("12.50", at most 6 decimals) or a
# YAML integer of whole units (``balance: 10``), exactly what ``parse_amount`` accepts. Floats
# (``balance: 0.1``) are refused by both. Not expressible in a pattern: the upper bound of
# decimal strings (``MAX_MICROS``), which the operator reports instead.
AMOUNT_PATTERN = r"^[+]?[0-9]{1,15}([.][0-9]{1,6})?$"
# Durations are int-or-string too: "500ms", "30s", "5m", "72h", "1h30m", "2d", or integer seconds.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d))+$"
# ... and a duration that must not be zero has a non-zero digit in some part.
POSITIVE_DURATION_PATTERN = (
    r"^([0-9]+(ms|s|m|h|d))*[0-9]*[1-9][0-9]*(ms|s|m|h|d)([0-9]+(ms|s|m|h|d))*$"
)
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# KEY_NAME_PATTERN allows at most 63 characters; the CRD says so as maxLength too, which bounds the
# cost the API server estimates for CEL rules comparing names.
_NAME_SCHEMA: dict[str, Any] = {"maxLength": 63}


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules ``(expression, message)`` for the CRD schema of the model or field they sit on.

    ``self`` is the object (or field value) at that place. Optional fields are tested with
    ``has()`` so a rule never depends on API-server defaulting.
    """
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


def _int_or_string(
    pattern: str, minimum: int, maximum: int, text: str, max_length: int | None = None
) -> dict[str, Any]:
    """An int-or-string schema: ``pattern``/``maxLength`` apply to strings, the bounds to ints."""
    return {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": pattern,
        **({"maxLength": max_length} if max_length else {}),
        "minimum": minimum,
        "maximum": maximum,
        "description": text,
    }


def _nonzero_amount(field: str) -> str:
    """CEL: an optional Amount field is present and not zero; CEL reads decimals with double()."""
    return f"(has({field}) && (type({field}) == int ? {field} != 0 : double({field}) != 0.0))"


class ManifestError(ValueError):
    """A manifest that does not describe a valid resource; ``str()`` names every bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _amount(value: Any) -> int:
    return parse_amount(value)


def _positive_amount(value: Any) -> int:
    micros = _amount(value)
    if micros <= 0:
        raise ValueError("must be greater than zero")
    return micros


def _serialize_amount(micros: int) -> str:
    return format_amount(micros)


_MAX_UNITS = MAX_MICROS // MICROS_PER_UNIT
_MAX_SECONDS = 366 * 86_400
_AMOUNT_TEXT = 'A decimal amount with at most 6 decimals, like "12.50", or whole units.'
_DURATION_TEXT = 'A duration like "500ms", "30s", "5m", "72h" or "1h30m", or whole seconds.'

Amount = Annotated[
    int,
    BeforeValidator(_amount),
    PlainSerializer(_serialize_amount, str),
    WithJsonSchema(_int_or_string(AMOUNT_PATTERN, 0, _MAX_UNITS, _AMOUNT_TEXT, 23)),
]
PositiveAmount = Annotated[
    int,
    BeforeValidator(_positive_amount),
    PlainSerializer(_serialize_amount, str),
    WithJsonSchema(
        _int_or_string(AMOUNT_PATTERN, 1, _MAX_UNITS, _AMOUNT_TEXT + " Greater than zero.", 23)
        | cel(("type(self) == int ? self > 0 : double(self) > 0.0", "must be greater than zero"))
    ),
]
DurationMs = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, str),
    WithJsonSchema(_int_or_string(DURATION_PATTERN, 0, _MAX_SECONDS, _DURATION_TEXT)),
]
# Validated like DurationMs; the model validators refuse zero, the CRD schema says so too.
PositiveDurationMs = Annotated[
    int,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, str),
    WithJsonSchema(
        _int_or_string(POSITIVE_DURATION_PATTERN, 1, _MAX_SECONDS, _DURATION_TEXT + " Not zero.")
    ),
]
Currency = Annotated[
    str,
    BeforeValidator(validate_currency),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": CURRENCY_RE.pattern,
            "description": 'An ISO 4217 code like "USD" or a lower-case unit like "credits".',
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        str_strip_whitespace=True,
    )

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
