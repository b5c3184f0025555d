"""Input-token bounds against a real tokenizer (trained here with `tokenizers`, no download)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from spendgate.models import PriceRule
from spendgate.pricing import Prompt, RulePricing, Tokenizers, byte_bound, inspect_body

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Prices: 0.50 USD per million input tokens, 1.50 per million output tokens.",
    "Größe, naïve café, 東京, Привет мир, 🙂🚀 emoji and ünïcödé text.",
    "def main():\n    return {'key': [1, 2, 3]}\n",
] * 20


def train_byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


TOKENIZER = train_byte_level_bpe()


@pytest.fixture
def tokenizer_path(tmp_path: Path) -> str:
    path = tmp_path / "tokenizer.json"
    TOKENIZER.save(str(path))
    return str(path)


def rule(**fields: Any) -> PriceRule:
    return PriceRule.model_validate(
        {
            "name": "chat",
            "price": {"perMillionInputTokens": "1.00", "perMillionOutputTokens": "2.00"},
            "maximum": "10",
            "promptOverhead": {"perMessage": 4, "perRequest": 10},
            **fields,
        }
    )


def chat(*contents: str) -> bytes:
    messages = [{"role": "user", "content": text} for text in contents]
    return json.dumps({"model": "m", "messages": messages}).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_byte_bound_is_never_below_the_real_count(text: str) -> None:
    assert byte_bound(Prompt(texts=(text,))) >= len(TOKENIZER.encode(text).ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=6))
def test_rule_bound_covers_the_templated_prompt(contents: list[str]) -> None:
    """The whole chat, rendered with a Llama-3-like template, never exceeds the bound."""
    facts = inspect_body(chat(*contents), "application/json")
    bound = RulePricing(rule()).bound(facts)
    rendered = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>" for text in contents
    )
    real = len(TOKENIZER.encode(rendered).ids)
    assert bound.input_tokens >= real


def test_tokenizer_counts_exactly(tokenizer_path: str) -> None:
    texts = ["Hello, world! How are you today?", "東京 🙂 naïve"]
    facts = inspect_body(chat(*texts), "application/json")
    exact = RulePricing(rule(tokenizer=tokenizer_path), tokenizers=Tokenizers())
    counted = sum(len(TOKENIZER.encode(t, add_special_tokens=False).ids) for t in texts)
    role = len(TOKENIZER.encode("user", add_special_tokens=False).ids)
    assert exact.input_tokens(facts) == counted + 2 * role + 2 * 4 + 10
    by_bytes = RulePricing(rule()).input_tokens(facts)
    assert exact.input_tokens(facts) < by_bytes  # exact is tighter than the byte bound


def test_missing_or_broken_tokenizer_falls_back_to_the_byte_bound(tmp_path: Path) -> None:
    facts = inspect_body(chat("some text"), "application/json")
    by_bytes = RulePricing(rule()).input_tokens(facts)
    missing = RulePricing(rule(tokenizer=str(tmp_path / "absent.json")), tokenizers=Tokenizers())
    assert missing.input_tokens(facts) == by_bytes
    broken_path = tmp_path / "broken.json"
    broken_path.write_text("{not a tokenizer")
    broken = RulePricing(rule(tokenizer=str(broken_path)), tokenizers=Tokenizers())
    assert broken.input_tokens(facts) == by_bytes


def test_tokenizer_reloads_when_the_file_changes(tokenizer_path: str) -> None:
    cache = Tokenizers()
    first = cache.get(tokenizer_path)
    assert cache.get(tokenizer_path) is first
    train_byte_level_bpe(vocab_size=300).save(tokenizer_path)
    stat = os.stat(tokenizer_path)
    os.utime(tokenizer_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.get(tokenizer_path) is not first


def test_tokenizer_path_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        rule(tokenizer="models/tokenizer.json")
