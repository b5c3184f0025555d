"""Reading a request body once: model, the prompt's text pieces, the output limit, streaming."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The fields that carry an output limit, in the order a server reads them when several are sent.
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Fields whose content a server renders into the prompt (chat, completions, responses, tools).
_PROMPT_FIELDS = ("messages", "prompt", "input", "instructions", "system")
_STRUCTURED_FIELDS = ("tools", "functions", "tool_choice", "response_format", "text")


class BadRequestBody(ValueError):
    """The request body is not the JSON the route expects."""


@dataclass(frozen=True)
class Prompt:
    """What a model will read: text rendered verbatim, plus literal token ids."""

    texts: tuple[str, ...] = ()
    token_ids: int = 0  # prompts sent as arrays of token ids: counted exactly
    messages: int = 0
    raw: bytes = b""  # a body that is not JSON: all of it may be prompt


@dataclass(frozen=True)
class RequestFacts:
    """What pricing needs to know about a request, read once from its body."""

    model: str | None = None
    prompt: Prompt = field(default_factory=Prompt)
    max_tokens: int | None = None  # the output limit the client asked for
    output_fields: tuple[str, ...] = ()  # which limit fields it used
    stream: bool = False
    include_usage: bool = False
    document: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def is_json(self) -> bool:
        return self.document is not None


def _structured(value: Any) -> str:
    """Structured parts (tool schemas, tool calls, content parts) as a template may render
    them: JSON, indented, non-ASCII escaped; the most verbose rendering templates use."""
    return json.dumps(value, indent=4, ensure_ascii=True)


class _PromptReader:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids = 0
        self.messages = 0

    def value(self, value: Any) -> None:
        if isinstance(value, str):
            self.texts.append(value)
        elif isinstance(value, list) and value and all(_is_token_id(v) for v in value):
            self.token_ids += len(value)
        elif isinstance(value, list):
            for item in value:
                self.item(item)
        elif isinstance(value, dict):
            self.item(value)
        elif value is not None:
            self.texts.append(_structured(value))

    def item(self, item: Any) -> None:
        """One message, content part or input item."""
        if not isinstance(item, dict):
            self.value(item)
            return
        if "role" in item or item.get("type") == "message":
            self.messages += 1
        for key, value in item.items():
            if key in ("content", "text", "input_text") or (
                key in ("role", "name") and isinstance(value, str)
            ):
                self.value(value)
            elif key == "type" and isinstance(value, str):
                continue  # a part's kind is not rendered
            else:
                self.texts.append(_structured({key: value}))


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequestBody(f"{name} must be a non-negative integer, got {value!r}")
    return value


def inspect_body(body: bytes, content_type: str) -> RequestFacts:
    """Read model, prompt, output limit and streaming flags from a request body."""
    if not body:
        return RequestFacts()
    if "json" not in content_type.lower():
        return RequestFacts(prompt=Prompt(raw=body))
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequestBody(f"request body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise BadRequestBody("request body must be a JSON object")
    model = parsed.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestBody(f"model must be a string, got {type(model).__name__}")
    reader = _PromptReader()
    for name in _PROMPT_FIELDS:
        if name in parsed:
            reader.value(parsed[name])
    for name in _STRUCTURED_FIELDS:
        if parsed.get(name) is not None:
            reader.texts.append(_structured(parsed[name]))
    limits = {name: _limit(parsed, name) for name in OUTPUT_LIMIT_FIELDS}
    used = tuple(name for name, value in limits.items() if value is not None)
    max_tokens = limits[used[0]] if used else None
    options = parsed.get("stream_options")
    return RequestFacts(
        model=model,
        prompt=Prompt(tuple(reader.texts), reader.token_ids, reader.messages),
        max_tokens=max_tokens,
        output_fields=used,
        stream=parsed.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        document=parsed,
    )


def with_output_limit(facts: RequestFacts, path: str, limit: int) -> bytes:
    """The request body with its output limit set to ``limit``: every limit field the client
    sent, or the one its API reads (``max_output_tokens`` for the Responses API)."""
    if facts.document is None:
        raise ValueError("only a JSON body has an output limit to set")
    document = dict(facts.document)
    names = facts.output_fields
    if not names:
        route = path.rstrip("/")
        responses_api = route.endswith("/responses") or (
            not route.endswith("completions")
            and "input" in document
            and "messages" not in document
            and "prompt" not in document
        )
        names = ("max_output_tokens",) if responses_api else ("max_tokens",)
    for name in names:
        document[name] = limit
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def with_field(facts: RequestFacts, name: str, value: int | str) -> bytes:
    """The JSON request body with its field ``name`` set to ``value`` (a lowered count, a
    downgraded model)."""
    if facts.document is None:
        raise ValueError("only a JSON body has fields to set")
    document = {**facts.document, name: value}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
