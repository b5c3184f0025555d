"""Property: ``spendgate apply`` of a mutated manifest applies, or fails cleanly.

Hypothesis takes the example PriceBook and budgets, changes one to three places (a value
replaced by another of any type, a key removed or misspelt, a value wrapped in a list) and
applies the result over a Redis that already holds the examples. Whatever the input:

- no exception escapes ``main`` (no traceback), the exit code is 0 or 2;
- on 2, every problem line names the field it is about, and Redis is byte-for-byte unchanged
  (nothing is applied partially);
- on 0, every resource is reported configured.

Bounded: a fixed number of examples, each a few milliseconds of YAML and two Redis round trips.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path
from typing import Any

import redis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from spendgate.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASE_FILES = [EXAMPLES / "pricebook.yaml", EXAMPLES / "budgets.yaml"]
BASE_DOCS = [doc for path in BASE_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]
# A problem names its field after the location: "…(CustomerBudget default/acme): spec.limit: …"
# A bracketed part is an index or a quoted key (``['a]b']``: its repr may hold brackets).
_PART = r"\[(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\]]*)\]"
FIELD = re.compile(
    rf"(?:\)|document \d+|items\[\d+\]): (?:[A-Za-z_][\w-]*|{_PART})"
    rf"(?:\.[A-Za-z0-9_-]+|{_PART})*: "
)

SPECIAL_TEXT = [
    "", " ", "-1", "0", "0.00", "1e3", "12.5", "9" * 23, "0.0000001", "usd", "USD", "EUR",
    "credits", "prepaid", "capped", "month", "fortnight", "sk-short", "default", "a" * 300,
    "Bearer x", "{{", "\x00", "null",
]  # fmt: skip
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(SPECIAL_TEXT)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node below the top, depth-first: keys of mappings, indices of lists."""
    found = []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, child in children:
        found.append((*path, key))
        found += places(child, (*path, key))
    return found


def mutate(docs: list[Any], data: st.DataObject) -> list[Any]:
    docs = copy.deepcopy(docs)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(places(docs)), label="path")
        parent = docs
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        kind = data.draw(st.sampled_from(["replace", "delete", "rename", "wrap"]), label="kind")
        if kind == "replace":
            parent[last] = data.draw(values, label="value")
        elif kind == "wrap":
            parent[last] = [parent[last]]
        elif kind == "delete":
            del parent[last]
        elif isinstance(parent, dict):  # rename: a misspelt key
            parent[last + data.draw(st.sampled_from(["s", "_", "X"]), label="suffix")] = parent.pop(
                last
            )
    return docs


def apply(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["apply", *args])
    return code, out.getvalue(), err.getvalue()


BASELINE: dict[str, dict[bytes, Any]] = {}  # Redis URL -> its dump with the examples applied


def dump(client: redis.Redis) -> dict[bytes, Any]:
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
)
@given(data=st.data())
def test_mutated_manifests_apply_or_fail_cleanly(
    redis_url: str, tmp_path: Path, data: st.DataObject
) -> None:
    client = redis.Redis.from_url(redis_url)
    before = dump(client)
    if before != BASELINE.get(redis_url):  # first example, or the last one applied something
        client.flushall()
        base = [arg for path in BASE_FILES for arg in ("-f", str(path))]
        assert apply(*base, "--redis", redis_url)[0] == 0
        before = BASELINE[redis_url] = dump(client)
    docs = mutate(BASE_DOCS, data)
    manifest = tmp_path / "mutated.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    code, out, err = apply("-f", str(manifest), "--redis", redis_url)

    assert "Traceback" not in err
    if code == 0:
        assert out and all(" configured (" in line for line in out.splitlines()), out
        return
    assert code == 2, err
    assert out == ""
    assert dump(client) == before, "a failed apply changed Redis"
    lines = err.splitlines()
    assert lines[0] == "spendgate apply: invalid input:" and lines[-1] == "applied: nothing"
    for problem in lines[1:-1]:
        assert FIELD.search(problem) or problem.endswith("nothing to apply"), problem
