"""Input tokens before the model has seen the request: an upper bound, or an exact count.

Byte-level BPE tokenizers (GPT-style, Llama 3, Qwen, Mistral's tekken, ...) never make a
token of less than one byte, and SentencePiece adds at most one piece (the dummy prefix) to a
text; so a text of n UTF-8 bytes is at most n + 1 tokens. With the model's own
``tokenizer.json`` the text is counted exactly instead. Either way the chat template's own
tokens (role headers, preambles) are covered by the rule's per-message and per-request
overheads.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from ..models import PromptOverhead
from .request import Prompt

log = logging.getLogger("spendgate.pricing")


class TokenizerUnavailable(RuntimeError):
    """A configured tokenizer.json cannot be loaded."""


def byte_bound(prompt: Prompt) -> int:
    """At most this many tokens, whatever byte-level or SentencePiece tokenizer reads it."""
    if prompt.raw:
        return len(prompt.raw) + 1
    return sum(len(text.encode("utf-8")) + 1 for text in prompt.texts) + prompt.token_ids


def with_overhead(tokens: int, prompt: Prompt, overhead: PromptOverhead) -> int:
    return tokens + overhead.per_request + overhead.per_message * prompt.messages


@dataclass
class _Loaded:
    tokenizer: Any
    mtime_ns: int


class Tokenizers:
    """``tokenizer.json`` files loaded once per path (reloaded when the file changes)."""

    def __init__(self) -> None:
        self._loaded: dict[str, _Loaded] = {}
        self._failed: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> Any:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError as error:
            raise TokenizerUnavailable(f"tokenizer {path}: {error.strerror}") from None
        with self._lock:
            loaded = self._loaded.get(path)
            if loaded is not None and loaded.mtime_ns == mtime:
                return loaded.tokenizer
            failed = self._failed.get(path)
            if failed is not None and failed[0] == mtime:
                raise TokenizerUnavailable(failed[1])
            try:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(path)
            except Exception as error:  # the library raises plain Exceptions for bad files
                message = f"tokenizer {path} cannot be loaded: {error}"
                self._failed[path] = (mtime, message)
                log.error("tokenizer unavailable", extra={"path": path, "error": str(error)})
                raise TokenizerUnavailable(message) from None
            self._loaded[path] = _Loaded(tokenizer, mtime)
            self._failed.pop(path, None)
            log.info("tokenizer loaded", extra={"path": path})
            return tokenizer

    def count(self, path: str, prompt: Prompt) -> int:
        """Exact tokens of the prompt's pieces (no special tokens: the overheads hold those)."""
        tokenizer = self.get(path)
        if prompt.raw:
            return byte_bound(prompt)  # not JSON: what the model reads of it is unknown
        texts = list(prompt.texts)
        if not texts:
            return prompt.token_ids
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return sum(len(encoding.ids) for encoding in encodings) + prompt.token_ids


TOKENIZERS = Tokenizers()
