"""The resources as a whole (metadata, spec, status) and parsing manifests into them."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .budget import CustomerBudgetSpec, CustomerBudgetStatus
from .fields import API_VERSION, DNS_SUBDOMAIN_PATTERN, ManifestError, _Model
from .pricebook import PriceBookSpec


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    namespace: str = Field(default="default", pattern=DNS_SUBDOMAIN_PATTERN, max_length=63)
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CustomerBudget(_Model):
    """One paying customer: API keys, a prepaid balance or a capped spend, rate limits, policy."""

    api_version: Literal["spendgate.dev/v1alpha1"] = API_VERSION
    kind: Literal["CustomerBudget"] = "CustomerBudget"
    metadata: ObjectMeta
    spec: CustomerBudgetSpec
    status: CustomerBudgetStatus | None = None

    @property
    def ref(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class PriceBook(_Model):
    """How a model deployment charges: rules that match requests and price them."""

    api_version: Literal["spendgate.dev/v1alpha1"] = API_VERSION
    kind: Literal["PriceBook"] = "PriceBook"
    metadata: ObjectMeta
    spec: PriceBookSpec
    status: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


# --------------------------------------------------------------------------- parsing


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _format_loc(loc: tuple[int | str, ...]) -> str:
    """``spec.rules[0].price``; a key that is not a plain name is quoted: ``price['']``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "function-plain")):
            continue
        elif not _PLAIN_KEY.match(part):
            text += f"[{part[:64]!r}]"
        else:
            text += f".{part}" if text else str(part)
    return text


format_loc = _format_loc  # the same field paths for problems found outside the models


def _strip_prefix(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _enum_hint(error: Any) -> str:
    expected = (error.get("ctx") or {}).get("expected")
    if error["type"] == "enum" and expected:
        return f"must be one of {expected}"
    if error["type"] == "literal_error" and expected:
        return f"must be {expected}"
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"{error['input']!r} does not match {error['ctx']['pattern']}"
    return _strip_prefix(error["msg"])


def validation_problems(error: ValidationError) -> list[str]:
    """Turn a pydantic error into ``["spec.rateLimits[1].per: must be one of ..."]``."""
    problems = []
    for item in error.errors():
        loc = _format_loc(item["loc"])
        problems.append(f"{loc}: {_enum_hint(item)}" if loc else _enum_hint(item))
    return problems


ResourceModel = CustomerBudget | PriceBook
KINDS: dict[str, type[CustomerBudget] | type[PriceBook]] = {
    "CustomerBudget": CustomerBudget,
    "PriceBook": PriceBook,
}


def parse_resource(manifest: dict[str, Any], source: str = "<manifest>") -> ResourceModel:
    """Validate a CustomerBudget or PriceBook manifest; raise ManifestError naming each field."""
    if not isinstance(manifest, dict):
        raise ManifestError(source, [f"expected a mapping, got {type(manifest).__name__}"])
    kind = manifest.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError(source, [f"kind: {kind!r} is not one of {', '.join(KINDS)}"])
    api_version = manifest.get("apiVersion")
    if api_version != API_VERSION:
        raise ManifestError(source, [f"apiVersion: {api_version!r} must be {API_VERSION!r}"])
    try:
        return model.model_validate(manifest)
    except ValidationError as error:
        raise ManifestError(source, validation_problems(error)) from None
