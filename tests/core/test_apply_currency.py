"""``spendgate apply`` catches a budget whose currency no PriceBook charges in (``usd`` vs
``USD`` included), where both are known: the input and Redis. Nothing is applied then."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from spendgate.config_store import ConfigStore
from spendgate.currency_check import currency_problems
from spendgate.manifests import ApplyError, apply_resources, load_resources
from spendgate.models import parse_resource

KEY = "sk-test-0123456789abcdef"
SECRET = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Secret
    metadata: {{name: acme-keys}}
    stringData: {{api-key: "{KEY}"}}
    """)


def pricebook(name: str = "default", currency: str = "USD") -> str:
    return textwrap.dedent(f"""\
        apiVersion: spendgate.dev/v1alpha1
        kind: PriceBook
        metadata: {{name: {name}}}
        spec:
          currency: {currency}
          rules: [{{name: chat, price: {{flat: "0.01"}}}}]
        """)


def budget(currency: str = "USD", price_books: str = "") -> str:
    named = f"\n  priceBooks: {price_books}" if price_books else ""
    return (
        textwrap.dedent(f"""\
        apiVersion: spendgate.dev/v1alpha1
        kind: CustomerBudget
        metadata: {{name: acme}}
        spec:
          customerId: acme
          currency: {currency}
          balance: "10"
          apiKeys: [{{name: main, secretRef: {{name: acme-keys}}}}]""")
        + named
        + "\n"
    )


def docs(*parts: str) -> str:
    return "---\n".join(parts)


@pytest.fixture
def store(redis_client: Any) -> ConfigStore:
    return ConfigStore(redis_client)


async def apply(store: ConfigStore, text: str) -> list[str]:
    return await apply_resources(store, load_resources([("in.yaml", text)]))


async def refused(store: ConfigStore, text: str) -> str:
    before = await store.redis.dbsize()
    keys = sorted(await store.redis.keys("*"))
    with pytest.raises(ApplyError) as raised:
        await apply(store, text)
    assert await store.redis.dbsize() == before and sorted(await store.redis.keys("*")) == keys
    (problem,) = raised.value.problems
    return problem


async def test_lower_case_currency_against_the_inputs_pricebook(store: ConfigStore) -> None:
    problem = await refused(store, docs(pricebook(), SECRET, budget("usd")))
    assert problem == (
        "in.yaml document 3 (CustomerBudget default/acme): spec.currency: 'usd' is charged by no"
        " PriceBook (they charge in 'USD') -- did you mean 'USD'? currencies are compared"
        " exactly; every request of this customer would be refused"
    )


async def test_a_pricebook_already_in_redis_counts(store: ConfigStore) -> None:
    await apply(store, pricebook(currency="USD"))
    problem = await refused(store, docs(SECRET, budget("EUR")))
    assert "spec.currency: 'EUR' is charged by no PriceBook (they charge in 'USD')" in problem
    assert "did you mean" not in problem
    # The input's PriceBook replaces the stored one of the same name: then EUR matches.
    assert len(await apply(store, docs(pricebook(currency="EUR"), SECRET, budget("EUR")))) == 2


async def test_nothing_to_compare_with_yet_is_no_error(store: ConfigStore) -> None:
    assert await apply(store, docs(SECRET, budget("credits"))) == [
        "customerbudget default/acme configured (+10.00 opening balance, 1 key)"
    ]


async def test_named_pricebooks_must_exist_and_match(store: ConfigStore) -> None:
    await apply(store, docs(pricebook("llama", "USD"), pricebook("eu", "EUR")))
    problem = await refused(store, docs(SECRET, budget("USD", "[llama, missing]")))
    assert problem.endswith(
        "spec.priceBooks[1]: PriceBook default/missing is neither in the input nor configured"
        " in Redis (apply it first, or in the same command)"
    )
    problem = await refused(store, docs(SECRET, budget("USD", "[eu]")))
    assert "spec.priceBooks[0]: PriceBook default/eu charges in 'EUR', the budget is in 'USD'" in (
        problem
    )
    assert len(await apply(store, docs(SECRET, budget("USD", "[llama]")))) == 1


def test_currency_problems_is_a_plain_function() -> None:
    parsed = parse_resource(
        {
            "apiVersion": "spendgate.dev/v1alpha1",
            "kind": "CustomerBudget",
            "metadata": {"name": "acme", "namespace": "team"},
            "spec": {"customerId": "acme", "currency": "credits", "priceBooks": ["pb"]},
        }
    )
    assert currency_problems(parsed, {"team/pb": "credits"}) == []  # type: ignore[arg-type]
    assert currency_problems(parsed, {"default/pb": "credits"})  # type: ignore[arg-type]
