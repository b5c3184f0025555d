"""spendgate.manifests: load, validate and apply manifests against a real Redis."""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spendgate import keys as rkeys
from spendgate.config_store import ConfigStore, KeyOwner
from spendgate.keys import hash_api_key
from spendgate.ledger import Ledger
from spendgate.manifests import (
    ApplyError,
    apply_resources,
    load_files,
    load_resources,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_FILES = [str(EXAMPLES / "pricebook.yaml"), str(EXAMPLES / "budgets.yaml")]
EXAMPLE_KEYS = {
    ("acme", "production"): "sk-demo-acme-prod-7Qm2vX9c",
    ("acme", "ci"): "sk-demo-acme-ci-L4t8pZ1r",
    ("tinyco", "main"): "sk-demo-tinyco-Hb3kW8sQ",
    ("burstco", "main"): "sk-demo-burstco-Zr5nY2dT",
    ("postpaid", "main"): "sk-demo-postpaid-Vf6hJ0eK",
}
KEY = "sk-test-0123456789abcdef"


def secret(name: str = "acme-keys", value: str = KEY, key: str = "api-key") -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Secret
        metadata: {{name: {name}, namespace: default}}
        type: Opaque
        stringData:
          {key}: "{value}"
        """)


def budget(
    name: str = "acme",
    customer: str = "acme",
    balance: str = '"10.00"',
    mode: str = "prepaid",
    secret_name: str = "acme-keys",
) -> str:
    return textwrap.dedent(f"""\
        apiVersion: spendgate.dev/v1alpha1
        kind: CustomerBudget
        metadata: {{name: {name}, namespace: default}}
        spec:
          customerId: {customer}
          mode: {mode}
          currency: USD
          balance: {balance}
          apiKeys:
            - name: main
              secretRef: {{name: {secret_name}}}
        """)


PRICEBOOK = textwrap.dedent("""\
    apiVersion: spendgate.dev/v1alpha1
    kind: PriceBook
    metadata: {name: default}
    spec:
      currency: USD
      rules:
        - name: chat
          price: {flat: "0.01"}
    """)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


async def apply_text(store: ConfigStore, *texts: str) -> list[str]:
    resources = load_resources([(f"in{i}.yaml", t) for i, t in enumerate(texts, 1)])
    return await apply_resources(store, resources)


def problems_of(*texts: str) -> str:
    with pytest.raises(ApplyError) as caught:
        load_resources([(f"in{i}.yaml", t) for i, t in enumerate(texts, 1)])
    return "\n".join(caught.value.problems)


async def dump_redis(client: Any) -> str:
    """Every key and every value in the database, as one text blob in a stable order."""
    blobs: list[bytes] = []
    for key in sorted([key async for key in client.scan_iter(count=1000)]):
        parts: list[bytes] = [key]
        kind = (await client.type(key)).decode()
        if kind == "string":
            parts.append(await client.get(key))
        elif kind == "hash":
            for field, value in sorted((await client.hgetall(key)).items()):
                parts += [field, value]
        elif kind == "set":
            parts += sorted(await client.smembers(key))
        elif kind == "zset":
            parts += [member for member, _ in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            parts += await client.lrange(key, 0, -1)
        elif kind == "stream":
            for _, fields in await client.xrange(key):
                for field, value in fields.items():
                    parts += [field, value]
        else:
            raise AssertionError(f"unexpected type {kind} of {key!r}")
        blobs.append(b"\n".join(parts))
    parts = blobs
    return b"\n".join(parts).decode(errors="replace")


@pytest.fixture
def store(redis_client: Any) -> ConfigStore:
    return ConfigStore(redis_client)


# --------------------------------------------------------------------------- happy path


async def test_apply_examples(store: ConfigStore, redis_client: Any) -> None:
    results = await apply_resources(store, load_files(EXAMPLE_FILES))
    assert results == [
        "pricebook default/default configured (5 rules)",
        "customerbudget default/acme configured (+5.00 opening balance, 2 keys)",
        "customerbudget default/tinyco configured (+0.001 opening balance, 1 key)",
        "customerbudget default/burstco configured (+10.00 opening balance, 1 key)",
        "customerbudget default/postpaid configured (limit 100.00 USD per month, 1 key)",
    ]
    ledger = Ledger(redis_client)
    acme = await ledger.account("acme")
    assert (acme.configured, acme.currency, acme.balance) == (True, "USD", 5_000_000)
    postpaid = await ledger.account("postpaid")
    assert (postpaid.mode, postpaid.limit, postpaid.available) == (
        "capped",
        100_000_000,
        100_000_000,
    )
    for (customer, name), plaintext in EXAMPLE_KEYS.items():
        assert await store.lookup_key(hash_api_key(plaintext)) == KeyOwner(customer, name)
    pricebook = await store.get_pricebook("default/default")
    assert pricebook is not None and [r.name for r in pricebook.rules][:2] == [
        "chat",
        "completions",
    ]
    assert await store.list_customers() == {
        c: f"default/{c}" for c in ("acme", "tinyco", "burstco", "postpaid")
    }

    everything = await dump_redis(redis_client)
    assert "acme" in everything  # the dump does see the data...
    for plaintext in EXAMPLE_KEYS.values():  # ...but never a plaintext key
        assert plaintext not in everything
        assert plaintext[3:] not in everything


async def test_reapply_is_idempotent(store: ConfigStore, redis_client: Any) -> None:
    await apply_resources(store, load_files(EXAMPLE_FILES))
    ledger = Ledger(redis_client)
    entries = await ledger.ledger_entries("acme")
    results = await apply_resources(store, load_files(EXAMPLE_FILES))
    assert (
        results[1] == "customerbudget default/acme configured (opening balance unchanged, 2 keys)"
    )
    assert (await ledger.account("acme")).balance == 5_000_000
    assert await ledger.ledger_entries("acme") == entries
    assert len(await store.all_keys()) == len(EXAMPLE_KEYS)


async def test_changed_balance_and_keys(store: ConfigStore, redis_client: Any) -> None:
    await apply_text(store, docs(secret(), budget()))
    other = "sk-test-rotated-key-000000"
    results = await apply_text(store, docs(secret(value=other), budget(balance='"12.5"')))
    assert results == [
        "customerbudget default/acme configured (+2.50 opening balance, 1 key, 1 key revoked)"
    ]
    assert (await Ledger(redis_client).account("acme")).balance == 12_500_000
    assert await store.lookup_key(hash_api_key(KEY)) is None
    assert await store.lookup_key(hash_api_key(other)) == KeyOwner("acme", "main")


async def test_multi_document_list_and_base64(store: ConfigStore) -> None:
    encoded = base64.b64encode(KEY.encode()).decode()
    listing = textwrap.dedent(f"""\
        apiVersion: v1
        kind: List
        items:
          - apiVersion: v1
            kind: Secret
            metadata: {{name: acme-keys}}
            data: {{api-key: {encoded}}}
          - apiVersion: spendgate.dev/v1alpha1
            kind: CustomerBudget
            metadata: {{name: acme}}
            spec:
              customerId: acme
              currency: USD
              balance: 100
              apiKeys: [{{name: main, secretRef: {{name: acme-keys}}}}]
        """)
    results = await apply_text(store, docs(PRICEBOOK, "", listing), "---\n")
    assert results == [
        "pricebook default/default configured (1 rule)",
        "customerbudget default/acme configured (+100.00 opening balance, 1 key)",
    ]
    assert await store.lookup_key(hash_api_key(KEY)) == KeyOwner("acme", "main")


async def test_disabled_key_needs_no_secret(store: ConfigStore) -> None:
    text = budget().replace("      secretRef:", "      disabled: true\n      secretRef:")
    assert await apply_text(store, text) == [
        "customerbudget default/acme configured (+10.00 opening balance, 0 keys)"
    ]


# --------------------------------------------------------------------------- invalid input


def with_secret(**kwargs: str) -> str:
    return docs(secret(**kwargs), budget())


def with_budget(**kwargs: str) -> str:
    return docs(secret(), budget(**kwargs))


REF = "spec.apiKeys[0].secretRef"
DEPLOYMENT = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
INVALID = [
    (with_budget(mode="postpay"), "spec.mode: must be one of 'prepaid' or 'capped'"),
    (with_budget(balance='"-5"'), "spec.balance: '-5' is negative"),
    (with_budget(balance='"abc"'), "spec.balance: 'abc' is not a decimal amount"),
    (with_budget(balance="1.5"), "spec.balance: expected a decimal string"),
    (budget(), f"{REF}: Secret default/acme-keys is not in the input"),
    (with_secret(key="other"), f"{REF}: Secret acme-keys has no key 'api-key'"),
    (with_secret(value=""), f"{REF}: key 'api-key' of Secret acme-keys is empty"),
    (with_secret(value="sk-short"), f"{REF}: key 'api-key' of Secret acme-keys is 8 characters"),
    (with_secret(value="sk-0123456789abcdef\\n"), "whitespace or control characters"),
    (secret().replace("Opaque", "kubernetes.io/tls"), "type: 'kubernetes.io/tls'"),
    (secret().replace("stringData", "data"), "data.api-key: not valid base64"),
    (DEPLOYMENT, "(Deployment default/web): kind: 'Deployment' is not one of"),
    ("apiVersion: v2\nkind: Secret\nmetadata: {name: s}\n", "apiVersion: a Secret must be 'v1'"),
    ("kind: [unclosed\n", "in1.yaml: invalid YAML"),
    ("- just\n- a list\n", "kind: None is not one of"),
    ("apiVersion: v1\nkind: List\nitems: nope\n", "items: a List needs a list"),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
async def test_invalid_input_applies_nothing(
    store: ConfigStore, redis_client: Any, text: str, expected: str
) -> None:
    with pytest.raises(ApplyError) as caught:
        await apply_text(store, docs(PRICEBOOK, text))
    assert expected in str(caught.value)
    assert await redis_client.dbsize() == 0


def test_errors_name_file_document_resource_and_field() -> None:
    message = problems_of(docs(PRICEBOOK, secret(), budget(mode="postpay")))
    assert message.startswith("in1.yaml document 3 (CustomerBudget default/acme): spec.mode:")


def test_every_problem_is_reported() -> None:
    message = problems_of(docs(budget(mode="postpay"), budget(name="b", customer="b")))
    assert "document 1 (CustomerBudget default/acme): spec.mode" in message
    assert "document 2 (CustomerBudget default/b): spec.apiKeys[0].secretRef" in message


def test_no_key_material_in_errors_or_reprs() -> None:
    message = problems_of(docs(secret(value="sk-short-1234"), budget()), budget("b", "b"))
    assert "sk-short" not in message
    resources = load_resources([("in.yaml", docs(secret(), budget()))])
    assert KEY not in repr(resources)


def test_duplicates_within_the_input() -> None:
    two_customers = docs(secret(), budget("one", "acme"), budget("two", "acme"))
    assert "spec.customerId: 'acme' is also used by CustomerBudget default/one" in problems_of(
        two_customers
    )
    twice = problems_of(docs(secret(), budget()), budget(customer="other"))
    assert (
        "in2.yaml document 1 (CustomerBudget default/acme): metadata.name: duplicate CustomerBudget"
        in twice
    )
    shared_key = problems_of(docs(secret(), budget("one", "one"), budget("two", "two")))
    assert "the same key is already used by default/one spec.apiKeys[0]" in shared_key
    assert "duplicate Secret default/acme-keys" in problems_of(secret(), secret())


async def test_customer_claimed_in_redis_applies_nothing(
    store: ConfigStore, redis_client: Any
) -> None:
    await apply_text(store, docs(secret(), budget("first", "acme")))
    before = await dump_redis(redis_client)
    second = docs(
        PRICEBOOK, secret("k2", "sk-test-another-key-0001"), budget("second", secret_name="k2")
    )
    with pytest.raises(ApplyError) as caught:
        await apply_text(store, second)
    assert "'acme' is already claimed by CustomerBudget default/first" in str(caught.value)
    assert await dump_redis(redis_client) == before
    assert await redis_client.hlen(rkeys.PRICEBOOKS) == 0


async def test_key_of_another_customer_in_redis(store: ConfigStore, redis_client: Any) -> None:
    await apply_text(store, docs(secret(), budget("first", "first")))
    with pytest.raises(ApplyError) as caught:
        await apply_text(store, docs(secret(), budget("second", "second")))
    assert "spec.apiKeys[0].secretRef: this key already belongs to customer 'first'" in str(
        caught.value
    )
    assert await store.owner_of("second") is None


async def test_dry_run_writes_nothing(store: ConfigStore, redis_client: Any) -> None:
    results = await apply_resources(store, load_files(EXAMPLE_FILES), dry_run=True)
    assert results[0] == "pricebook default/default valid (dry run)"
    assert len(results) == 5
    assert await redis_client.dbsize() == 0


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match="cannot read"):
        load_files([str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    ("text", "says"),
    [("", "empty input?"), ("---\n# nothing\n---\n", "empty input?"), (secret(), "only Secrets")],
)
def test_input_without_resources_is_an_error(text: str, says: str) -> None:
    with pytest.raises(ApplyError) as raised:
        load_resources([("empty.yaml", text)])
    (problem,) = raised.value.problems
    assert problem.startswith("empty.yaml: no CustomerBudget or PriceBook")
    assert says in problem and problem.endswith("nothing to apply")
