"""spendgate.models: manifests in, typed specs out, and every mistake named by its field path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from spendgate.models import (
    API_VERSION,
    BudgetState,
    CustomerBudget,
    CustomerBudgetSpec,
    ManifestError,
    Mode,
    Per,
    PriceBook,
    PriceBookSpec,
    RateLimit,
    parse_resource,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def budget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "CustomerBudget",
        "metadata": {"name": "acme", "namespace": "team-a"},
        "spec": {"customerId": "acme", "currency": "USD", **spec},
    }


def pricebook(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "PriceBook",
        "metadata": {"name": "llm"},
        "spec": {
            "currency": "USD",
            "rules": list(rules) or [{"name": "all", "price": {"flat": "0.01"}}],
            **spec,
        },
    }


def problems(manifest: Any) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_resource(manifest, source="test.yaml")
    assert str(caught.value).startswith("test.yaml: ")
    return caught.value.problems


# --------------------------------------------------------------------------- valid manifests


def test_examples_parse() -> None:
    documents = []
    for name in ("budgets.yaml", "pricebook.yaml"):
        documents += [
            doc
            for doc in yaml.safe_load_all((EXAMPLES / name).read_text())
            if doc and doc.get("apiVersion") == API_VERSION
        ]
    parsed = [parse_resource(doc) for doc in documents]
    kinds = sorted(type(p).__name__ for p in parsed)
    assert kinds == ["CustomerBudget"] * 4 + ["PriceBook"]


def test_budget_fields_and_defaults() -> None:
    resource = parse_resource(
        budget(
            balance="5.00",
            rateLimits=[{"requests": 600, "per": "minute"}, {"cost": "2.00", "per": "hour"}],
            apiKeys=[{"name": "prod", "secretRef": {"name": "acme-keys"}}],
            policy={"maxRequestCost": "0.50"},
        )
    )
    assert isinstance(resource, CustomerBudget)
    assert resource.ref == "team-a/acme"
    spec = resource.spec
    assert spec.mode is Mode.prepaid
    assert spec.balance == 5_000_000
    assert [(r.kind, r.amount, r.per) for r in spec.rate_limits] == [
        ("requests", 600, Per.minute),
        ("cost", 2_000_000, Per.hour),
    ]
    assert spec.api_keys[0].secret_ref.key == "api-key"
    assert spec.policy.max_request_cost == 500_000
    assert spec.policy.alert_thresholds == [50, 80, 100]
    assert spec.policy.suspended is False


def test_budget_round_trips_through_manifest() -> None:
    manifest = budget(
        balance="5.5",
        limit="100",
        period="month",
        rateLimits=[{"cost": "0.25", "per": "second", "burst": 50}],
    )
    resource = parse_resource(manifest)
    dumped = resource.to_manifest()
    assert dumped["spec"]["balance"] == "5.50"
    assert dumped["spec"]["rateLimits"] == [{"cost": "0.25", "per": "second", "burst": 50}]
    assert parse_resource(dumped) == resource


def test_capped_budget() -> None:
    spec = parse_resource(budget(mode="capped", limit="100", period="month")).spec
    assert isinstance(spec, CustomerBudgetSpec)
    assert (spec.mode, spec.limit, spec.period) == (Mode.capped, 100_000_000, "month")


def test_yaml_integers_are_whole_units() -> None:
    assert parse_resource(budget(balance=10)).spec.balance == 10_000_000  # type: ignore[union-attr]


def test_per_milliseconds() -> None:
    assert [p.milliseconds for p in Per] == [1_000, 60_000, 3_600_000, 86_400_000]


def test_rate_limit_kinds() -> None:
    assert RateLimit.model_validate({"requests": 5, "per": "second"}).kind == "requests"
    cost = RateLimit.model_validate({"cost": "1.5", "per": "day"})
    assert (cost.kind, cost.amount) == ("cost", 1_500_000)


def test_budget_state_values() -> None:
    assert {s.value for s in BudgetState} >= {
        "Active",
        "Exhausted",
        "Suspended",
        "PendingPaymentMethod",
    }


# --------------------------------------------------------------------------- envelope errors


def test_not_a_mapping() -> None:
    assert problems(["kind", "CustomerBudget"]) == ["expected a mapping, got list"]


def test_unknown_kind() -> None:
    manifest = budget()
    manifest["kind"] = "CustomerBudgets"
    assert problems(manifest) == ["kind: 'CustomerBudgets' is not one of CustomerBudget, PriceBook"]


def test_wrong_api_version() -> None:
    manifest = budget()
    manifest["apiVersion"] = "spendgate.dev/v1"
    assert problems(manifest) == ["apiVersion: 'spendgate.dev/v1' must be 'spendgate.dev/v1alpha1'"]


def test_bad_metadata_name() -> None:
    manifest = budget()
    manifest["metadata"]["name"] = "Acme_Corp"
    [problem] = problems(manifest)
    assert problem.startswith("metadata.name: 'Acme_Corp' does not match")


# --------------------------------------------------------------------------- budget errors


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"rateLimits": [{"requests": 1, "per": "second"}, {"requests": 2, "per": "week"}]},
            "spec.rateLimits[1].per: must be one of 'second', 'minute', 'hour' or 'day'",
        ),
        ({"mode": "capped"}, "spec: mode 'capped' needs both limit and period"),
        ({"mode": "capped", "limit": "10"}, "spec: mode 'capped' needs both limit and period"),
        ({"mode": "capped", "period": "day"}, "spec: mode 'capped' needs both limit and period"),
        (
            {"mode": "capped", "limit": "10", "period": "day", "balance": "5"},
            "spec: balance is for mode 'prepaid'; capped budgets spend up to limit",
        ),
        ({"limit": "10"}, "spec: a prepaid spend cap (limit) needs a period"),
        ({"period": "day"}, "spec: period is only meaningful together with limit"),
        ({"mode": "postpaid"}, "spec.mode: must be one of 'prepaid' or 'capped'"),
        (
            {"mode": "capped", "limit": "10", "period": "year"},
            "spec.period: must be one of 'day', 'week' or 'month'",
        ),
        (
            {
                "apiKeys": [
                    {"name": "prod", "secretRef": {"name": "a"}},
                    {"name": "ci", "secretRef": {"name": "b"}},
                    {"name": "prod", "secretRef": {"name": "c"}},
                ]
            },
            "spec: apiKeys names must be unique; repeated: prod",
        ),
        (
            {"rateLimits": [{"requests": 1, "cost": "1", "per": "second"}]},
            "spec.rateLimits[0]: give exactly one of requests or cost",
        ),
        (
            {"rateLimits": [{"per": "second"}]},
            "spec.rateLimits[0]: give exactly one of requests or cost",
        ),
        ({"rateLimits": [{"requests": 5}]}, "spec.rateLimits[0].per: required field is missing"),
        ({"balance": "-1"}, "spec.balance: '-1' is negative; amounts here must be zero or more"),
        (
            {"policy": {"maxRequestCost": "0"}},
            "spec.policy.maxRequestCost: must be greater than zero",
        ),
        ({"limit": "0", "period": "day"}, "spec.limit: must be greater than zero"),
        ({"bogus": 1}, "spec.bogus: unknown field"),
        ({"policy": {"suspend": True}}, "spec.policy.suspend: unknown field"),
        (
            {"policy": {"alertThresholds": [80, 50]}},
            "spec.policy.alertThresholds: thresholds must be increasing and unique",
        ),
        (
            {"policy": {"alertThresholds": [50, 150]}},
            "spec.policy.alertThresholds: [1] 150 is not a percentage between 1 and 100",
        ),
        (
            {"policy": {"onPaymentFailure": {"action": "grace"}}},
            "spec.policy.onPaymentFailure: action 'grace' needs gracePeriod (for example \"72h\")",
        ),
        (
            {"policy": {"onPaymentFailure": {"action": "suspend", "gracePeriod": "1h"}}},
            "spec.policy.onPaymentFailure: gracePeriod is only used with action 'grace'",
        ),
    ],
)
def test_budget_errors_name_the_field(spec: dict[str, Any], expected: str) -> None:
    assert problems(budget(**spec)) == [expected]


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"balance": 1.5}, "spec.balance: "),
        ({"balance": "1.1234567"}, "spec.balance: "),
        ({"balance": "12 USD"}, "spec.balance: "),
        ({"balance": "99999999999"}, "spec.balance: "),
        ({"currency": "usd$"}, "spec.currency: "),
        ({"customerId": "a{b}"}, "spec.customerId: "),
        ({"customerId": "x" * 64}, "spec.customerId: "),
        ({"customerId": "a:b"}, "spec.customerId: "),
        ({"rateLimits": [{"requests": 0, "per": "second"}]}, "spec.rateLimits[0].requests: "),
        ({"rateLimits": [{"requests": 1.5, "per": "second"}]}, "spec.rateLimits[0].requests: "),
        ({"rateLimits": [{"cost": "0", "per": "second"}]}, "spec.rateLimits[0].cost: "),
        (
            {"rateLimits": [{"requests": 1, "per": "second", "burst": 0}]},
            "spec.rateLimits[0].burst: ",
        ),
        (
            {"apiKeys": [{"name": "Prod_Key", "secretRef": {"name": "s"}}]},
            "spec.apiKeys[0].name: ",
        ),
        ({"apiKeys": [{"name": "prod"}]}, "spec.apiKeys[0].secretRef: "),
        (
            {
                "apiKeys": [
                    {
                        "name": "prod",
                        "secretRef": {"name": "s"},
                        "rateLimits": [{"requests": 1, "per": "ms"}],
                    }
                ]
            },
            "spec.apiKeys[0].rateLimits[0].per: ",
        ),
        ({"stripe": {"customerId": "acme"}}, "spec.stripe.customerId: "),
        ({"rateLimits": [{"requests": 1, "per": "second"}] * 9}, "spec.rateLimits: "),
    ],
)
def test_budget_field_paths(spec: dict[str, Any], path: str) -> None:
    [problem] = problems(budget(**spec))
    assert problem.startswith(path), problem


def test_float_amount_asks_for_quotes() -> None:
    [problem] = problems(budget(balance=0.1))
    assert "quote amounts in YAML" in problem


def test_missing_fields() -> None:
    manifest = budget()
    del manifest["spec"]["customerId"]
    del manifest["spec"]["currency"]
    assert sorted(problems(manifest)) == [
        "spec.currency: required field is missing",
        "spec.customerId: required field is missing",
    ]


def test_every_problem_is_reported() -> None:
    found = problems(
        budget(
            currency="dollars!",
            rateLimits=[{"requests": 1, "per": "second"}, {"requests": 2, "per": "fortnight"}],
            policy={"maxRequestCost": "-1"},
        )
    )
    assert len(found) == 3
    assert any(p.startswith("spec.currency: ") for p in found)
    assert any(p.startswith("spec.rateLimits[1].per: must be one of") for p in found)
    assert any(p.startswith("spec.policy.maxRequestCost: ") for p in found)


def test_spec_models_are_frozen() -> None:
    spec = parse_resource(budget(balance="1")).spec
    with pytest.raises(ValueError):
        spec.balance = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- price books


def test_pricebook_fields() -> None:
    resource = parse_resource(
        pricebook(
            {
                "name": "chat",
                "match": {
                    "methods": ["post"],
                    "path": "/v1/chat/completions",
                    "models": ["llama-*"],
                },
                "price": {
                    "flat": "0.0001",
                    "perMillionInputTokens": "0.50",
                    "perMillionOutputTokens": "1.50",
                },
                "maximum": "0.50",
                "timeout": "10m",
            }
        )
    )
    assert isinstance(resource, PriceBook)
    rule = resource.spec.rules[0]
    assert rule.match.methods == ["POST"]
    assert rule.price.flat == 100
    assert rule.max_cost == 500_000
    assert rule.timeout == 600_000
    assert rule.estimate.output_tokens == 256
    assert resource.spec.unmatched == "deny"


def test_flat_only_rule_needs_no_maximum() -> None:
    book = parse_resource(pricebook({"name": "ping", "price": {"flat": "0.01"}}))
    assert isinstance(book.spec, PriceBookSpec)
    assert book.spec.rules[0].max_cost == 10_000


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            [{"name": "a", "price": {"perMillionInputTokens": "1"}}],
            "spec.rules[0]: a rule with token or time prices needs a maximum",
        ),
        (
            [{"name": "a", "price": {"perSecond": "0.001"}}],
            "spec.rules[0]: a rule with token or time prices needs a maximum",
        ),
        (
            [{"name": "a", "price": {"flat": "1"}, "maximum": "0.5"}],
            "spec.rules[0]: maximum must be at least the flat price",
        ),
        (
            [{"name": "a", "price": {"flat": "1"}}, {"name": "a", "price": {"flat": "2"}}],
            "spec: rule names must be unique; repeated: a",
        ),
        (
            [{"name": "a", "price": {"flat": "1"}, "timeout": "0s"}],
            "spec.rules[0]: timeout must be positive",
        ),
        (
            [
                {"name": "a", "price": {"flat": "1"}},
                {"name": "b", "match": {"methods": ["POST", "FETCH"]}, "price": {"flat": "1"}},
            ],
            "spec.rules[1].match.methods: [1] 'FETCH' must be one of DELETE, GET, HEAD, OPTIONS,"
            " PATCH, POST, PUT",
        ),
        (
            [{"name": "a", "match": {"path": "/a", "pathPrefix": "/b"}, "price": {"flat": "1"}}],
            "spec.rules[0].match: give path or pathPrefix, not both",
        ),
        (
            [{"name": "a", "price": {"flat": "1"}, "onUpstreamError": "charge"}],
            "spec.rules[0].onUpstreamError: must be one of 'free' or 'metered'",
        ),
    ],
)
def test_pricebook_errors_name_the_field(rules: list[dict[str, Any]], expected: str) -> None:
    assert problems(pricebook(*rules)) == [expected]


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ({"name": "a", "price": {"flat": "1"}, "timeout": "5x"}, "spec.rules[0].timeout: "),
        ({"name": "a", "price": {"flat": "-1"}}, "spec.rules[0].price.flat: "),
        ({"name": "a", "price": {"flat": 0.5}}, "spec.rules[0].price.flat: "),
        (
            {"name": "a", "match": {"path": "v1"}, "price": {"flat": "1"}},
            "spec.rules[0].match.path: ",
        ),
        (
            {"name": "a", "match": {"methods": []}, "price": {"flat": "1"}},
            "spec.rules[0].match.methods: ",
        ),
        ({"name": "A", "price": {"flat": "1"}}, "spec.rules[0].name: "),
        ({"name": "a"}, "spec.rules[0]: give price (flat, tokens, seconds) or expression"),
        (
            {"name": "a", "price": {"flat": "1"}, "estimate": {"outputTokens": -1}},
            "spec.rules[0].estimate.outputTokens: ",
        ),
    ],
)
def test_pricebook_field_paths(rule: dict[str, Any], path: str) -> None:
    [problem] = problems(pricebook(rule))
    assert problem.startswith(path), problem


def test_pricebook_needs_rules() -> None:
    manifest = pricebook()
    manifest["spec"]["rules"] = []
    [problem] = problems(manifest)
    assert problem.startswith("spec.rules: ")


def test_find_rule_first_match_wins() -> None:
    book = parse_resource(
        pricebook(
            {
                "name": "big",
                "match": {"path": "/v1/chat/completions", "models": ["*-70b"]},
                "price": {"flat": "0.01"},
            },
            {"name": "chat", "match": {"pathPrefix": "/v1/chat"}, "price": {"flat": "0.001"}},
            {"name": "models", "match": {"methods": ["GET"], "path": "/v1/models"}, "price": {}},
        )
    ).spec
    assert isinstance(book, PriceBookSpec)
    find = book.find_rule
    assert find("POST", "/v1/chat/completions", "llama-70b").name == "big"  # type: ignore[union-attr]
    assert find("post", "/v1/chat/completions", "llama-8b").name == "chat"  # type: ignore[union-attr]
    assert find("POST", "/v1/chat/completions", None).name == "chat"  # type: ignore[union-attr]
    assert find("GET", "/v1/models", None).name == "models"  # type: ignore[union-attr]
    assert find("POST", "/v1/models", None) is None
    assert find("GET", "/v1/chat/completions", None) is None
    assert find("POST", "/v1/embeddings", None) is None


def test_model_globs_are_case_sensitive() -> None:
    book = parse_resource(
        pricebook({"name": "a", "match": {"models": ["gpt-*"]}, "price": {"flat": "1"}})
    ).spec
    assert isinstance(book, PriceBookSpec)
    assert book.find_rule("POST", "/x", "gpt-4") is not None
    assert book.find_rule("POST", "/x", "GPT-4") is None


def test_parse_does_not_mutate_input() -> None:
    manifest = budget(balance="1", rateLimits=[{"requests": 1, "per": "second"}])
    before = copy.deepcopy(manifest)
    parse_resource(manifest)
    assert manifest == before
