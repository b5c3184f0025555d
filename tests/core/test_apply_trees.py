"""``spendgate apply`` of budget trees: the organisation example applies (parents first, in
any order in the input); every invalid tree is refused naming the field, with nothing changed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import yaml

from spendgate.cli import main
from spendgate.keys import TREE
from spendgate.ledger import Ledger

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PRICEBOOK = str(EXAMPLES / "pricebook.yaml")
ORGANISATION = str(EXAMPLES / "organisation.yaml")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def dump(url: str) -> dict[bytes, bytes | None]:
    client = redis.Redis.from_url(url)
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


def cb(name: str, parent: str | None = None, namespace: str = "default", **spec: Any) -> str:
    body: dict[str, Any] = {"customerId": name, "currency": "USD", **spec}
    if parent is not None:
        body["parent"] = parent
    if "mode" not in body and "balance" not in body:
        body.update(mode="capped", limit="10.00", period="month")
    document = {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "CustomerBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }
    return yaml.safe_dump(document)


def write(tmp_path: Path, name: str, *documents: str) -> str:
    path = tmp_path / name
    path.write_text("---\n".join(documents))
    return str(path)


@pytest.fixture
def organisation(redis_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run(capsys, "apply", "-f", PRICEBOOK, "-f", ORGANISATION, "--redis", redis_url)
    assert code == 0, err
    assert "customerbudget default/initech-chatbot configured" in out
    return redis_url


def test_the_organisation_example_applies_as_a_tree(organisation: str) -> None:
    client = redis.Redis.from_url(organisation)
    assert client.hget(TREE, "initech-chatbot") == b"initech-research,initech"
    assert client.hget("sg:{initech}@initech-chatbot:cfg", "kcap:ci") == b"5000000|day"
    assert client.hget("sg:{initech}:acct", "balance") == b"500000000"
    soft = json.loads(client.hget("sg:{initech}@initech-research:cfg", "soft") or b"[]")
    assert [(s["action"], s["used"]) for s in soft] == [
        ("throttle", 180_000_000), ("downgrade", 190_000_000)
    ]  # fmt: skip
    assert client.hexists("sg:pricebooks", "default/initech-models")


def test_children_before_their_parent_in_the_input_apply(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "t.yaml", cb("leaf", "mid"), cb("mid", "top"), cb("top", balance="5"))
    code, out, err = run(capsys, "apply", "-f", path, "--redis", redis_url)
    assert code == 0, err
    assert out.index("default/top") < out.index("default/mid") < out.index("default/leaf")


# (documents, the message the one problem line ends with)
INVALID: list[tuple[list[str], str]] = [
    ([cb("team", "other/org")], "spec.parent: 'other/org': parent must be a"
     " CustomerBudget in the same namespace (a name, not namespace/name)"),
    ([cb("team", "nobody")], "spec.parent: CustomerBudget default/nobody is neither in the input"
     " nor applied"),
    ([cb("a", "b"), cb("b", "a")], "spec.parent: budgets form a cycle (default/a -> default/b ->"
     " default/a)"),
    ([cb("l1", balance="5"), cb("l2", "l1"), cb("l3", "l2"), cb("l4", "l3"), cb("l5", "l4")],
     "spec.parent: the tree would be 5 levels deep (l5 -> l4 -> l3 -> l2 -> l1); at most 4"),
    ([cb("org", balance="5"), cb("team", "org", currency="EUR")],
     "spec.currency: 'EUR' is not the currency of parent default/org ('USD'); a tree counts one"
     " currency"),
    ([cb("org", mode="capped", limit="10.00", period="month"),
      cb("team", "org", mode="capped", limit="20.00", period="month")],
     "spec.limit: 20.00 per month is above parent default/org's limit of 10.00 per month"),
    ([cb("org", balance="5"), cb("team", "org", stripe={"customerId": "cus_1"})],
     "stripe links a root budget; a budget with a parent spends its root's money"),
]  # fmt: skip


@pytest.mark.parametrize(("documents", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_trees_are_refused_naming_the_field(
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    documents: list[str],
    message: str,
) -> None:
    path = write(tmp_path, "tree.yaml", *documents)
    before = dump(redis_url)
    code, out, err = run(capsys, "apply", "-f", path, "--redis", redis_url)
    assert (code, out) == (2, ""), err
    problems = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert problems and problems[0].endswith(message), err
    assert err.strip().endswith("applied: nothing") and "Traceback" not in err
    assert dump(redis_url) == before


def test_a_parent_applied_earlier_is_found_and_checked_in_redis(
    organisation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = write(tmp_path, "ok.yaml", cb("initech-intern", "initech-support", limit="1.00"))
    code, _, err = run(capsys, "apply", "-f", ok, "--redis", organisation)
    assert code == 0, err
    deep = cb("deep", "initech-chatbot", mode="capped", limit="1", period="day")
    code, _, err = run(
        capsys, "apply", "-f", write(tmp_path, "deep.yaml", deep), "--redis", organisation
    )
    assert code == 0, err  # the fourth level
    deeper = cb("deeper", "deep", mode="capped", limit="1", period="day")
    code, _, err = run(
        capsys, "apply", "-f", write(tmp_path, "x.yaml", deeper), "--redis", organisation
    )
    assert code == 2
    assert (
        "spec.parent: the tree would be 5 levels deep"
        " (deeper -> deep -> initech-chatbot -> initech-research -> initech); at most 4"
    ) in err
    euro = cb("euro", "initech", currency="EUR")
    code, _, err = run(
        capsys, "apply", "-f", write(tmp_path, "e.yaml", euro), "--redis", organisation
    )
    assert code == 2
    assert "spec.currency: 'EUR' is not the currency of parent default/initech ('USD')" in err


def test_a_changed_parent_moves_the_budget(
    organisation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chatbot = {"mode": "capped", "limit": "60.00", "period": "month"}
    moved = write(tmp_path, "moved.yaml", cb("initech-chatbot", "initech-support", **chatbot))
    before = dump(organisation)
    code, _, err = run(capsys, "apply", "-f", moved, "--redis", organisation, "--dry-run")
    assert (code, dump(organisation)) == (0, before), err
    code, _, err = run(capsys, "apply", "-f", moved, "--redis", organisation)
    assert code == 0, err
    client = redis.Redis.from_url(organisation)
    assert client.hget(TREE, "initech-chatbot") == b"initech-support,initech"
    assert client.hget("sg:{initech}@initech-chatbot:cfg", "parent") == b"initech-support"
    # out of the tree: its keys move to its own hash tag
    alone = write(tmp_path, "alone.yaml", cb("initech-chatbot", **chatbot))
    code, _, err = run(capsys, "apply", "-f", alone, "--redis", organisation)
    assert code == 0, err
    assert client.hget(TREE, "initech-chatbot") is None
    assert client.hget("sg:{initech-chatbot}:cfg", "currency") == b"USD"
    assert client.hgetall("sg:{initech}@initech-chatbot:cfg") == {b"moved": b"initech-chatbot"}
    # a move into a cycle is refused, naming the field, with nothing changed
    cycle = write(tmp_path, "cycle.yaml", cb("initech", "initech-research", balance="500.00"))
    before = dump(organisation)
    code, _, err = run(capsys, "apply", "-f", cycle, "--redis", organisation)
    assert code == 2
    assert "spec.parent: budgets form a cycle through 'initech'" in err
    assert dump(organisation) == before


def test_balance_of_a_level_shows_its_own_and_its_subtrees_spend(
    organisation: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def spend() -> None:
        client = redis.asyncio.Redis.from_url(organisation)
        ledger = Ledger(client)
        await ledger.load_scripts()
        spends = (("initech-chatbot", "chatbot", "r1", 1_250_000), ("initech", "admin", "r2", 5))
        for customer, key, rid, cost in spends:
            reserved = await ledger.reserve(
                customer, rid, cost, key_id=key, currency="USD", ttl_ms=60_000
            )
            assert reserved.ok, reserved
            await ledger.settle(customer, rid, cost)
        await client.aclose()

    asyncio.run(spend())
    code, out, _ = run(capsys, "balance", "initech", "--redis", organisation)
    assert code == 0
    assert "spent       1.250005 USD" in out
    assert "own spent   0.000005 USD (the rest by its descendants)" in out
    code, out, _ = run(capsys, "balance", "initech-chatbot", "--redis", organisation)
    assert "spent       1.25 USD of 60.00 USD per month" in out and "own spent" not in out
