"""`make bench`, part two: what pricing by CEL expressions costs per request, in-process.

For each ready-made rule of examples/pricebook-media.yaml: the bound (parse the request body,
evaluate) and the charge (evaluate the cost over the answer), against the simple token price
of examples/pricebook.yaml. Also: compiling a whole PriceBook (done once per change, never per
request) and the largest input an expression can be given -- a 4 MiB JSON answer read by a
comprehension (``all``) -- which shows evaluation stays linear in its input.

    .venv/bin/python benchmarks/price_expressions.py [--iterations N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDict

from spendgate.expressions import ExpressionPricing, RequestView, ResponseView
from spendgate.models import PriceBookSpec, PriceRule, parse_resource
from spendgate.pricing import RequestFacts, RulePricing, Used, inspect_body

ROOT = Path(__file__).resolve().parents[1]
HEADERS = CIMultiDict({"Content-Type": "application/json"})


def _timed(function: Callable[[], Any], iterations: int) -> dict[str, float]:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        function()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return {
        "p50_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1], 1),
    }


def _pricebook(name: str) -> PriceBookSpec:
    manifest = yaml.safe_load((ROOT / "examples" / name).read_text())
    return parse_resource(manifest).spec  # type: ignore[return-value]


def _cases() -> list[tuple[str, bytes, str, dict[str, Any] | None]]:
    form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    form += b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    form += b"\0" * 320_000 + b"\r\n--b--\r\n"
    return [
        ("images", b'{"prompt": "a cat", "n": 4, "size": "1792x1024", "quality": "hd"}',
         "application/json", {"created": 1, "data": [{"b64_json": "x"}] * 4}),
        ("speech", json.dumps({"input": "hello " * 200}).encode(), "application/json", None),
        ("transcription", form, "multipart/form-data; boundary=b",
         {"text": "...", "usage": {"type": "duration", "seconds": 10}}),
        ("responses", b'{"input": "one two three", "max_output_tokens": 64}',
         "application/json",
         {"usage": {"input_tokens": 3, "output_tokens": 64, "total_tokens": 67}}),
        ("videos", b'{"prompt": "waves", "seconds": "8", "size": "1280x720"}',
         "application/json", {"seconds": "8", "size": "1280x720"}),
        ("kserve-infer", b'{"inputs": [{"name": "x", "shape": [1], "data": [1]}]}',
         "application/json", {"outputs": []}),
    ]  # fmt: skip


def _rule(spec: PriceBookSpec, name: str) -> PriceRule:
    return next(rule for rule in spec.rules if rule.name == name)


def run(iterations: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for _ in range(20):
        _pricebook("pricebook-media.yaml")
    results["compile_pricebook_ms"] = round((time.perf_counter() - start) / 20 * 1000, 2)

    media = _pricebook("pricebook-media.yaml")
    rows = []
    for name, body, content_type, payload in _cases():
        pricing = _rule(media, name).pricing
        assert pricing is not None
        view = RequestView("POST", "/v1/x", HEADERS, body, content_type, 10, 64, timeout_ms=30_000)
        held = pricing.hold(view)
        answer = ResponseView(payload=payload, upstream_ms=420, input_tokens=3, output_tokens=64)
        charge = pricing.charge(held, answer)
        assert charge.error is None, (name, charge.error)
        rows.append(
            {
                "rule": name,
                "body_bytes": len(body),
                "bound": _timed(lambda p=pricing, v=view: p.hold(v), iterations),
                "charge": _timed(lambda p=pricing, h=held, a=answer: p.charge(h, a), iterations),
            }
        )
    results["rules"] = rows

    chat = _rule(_pricebook("pricebook.yaml"), "chat")
    chat_body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'
    facts: RequestFacts = inspect_body(chat_body, "application/json")
    simple = RulePricing(chat)
    used = Used(input_tokens=simple.bound(facts).input_tokens, output_tokens=16, upstream_ms=420)
    results["simple_chat"] = {
        "bound": _timed(lambda: simple.bound(inspect_body(chat_body, "application/json")),
                        iterations),
        "charge": _timed(lambda: simple.cost(used), iterations),
    }  # fmt: skip

    big = ExpressionPricing(
        bound="1", cost="response.data.all(d, has(d.b64_json)) ? size(response.data) : 0"
    )
    item = {"b64_json": "x" * 100, "revised_prompt": "y" * 100}
    for count in (1_000, 4_000, 16_000):  # about 0.25, 1 and 4 MiB of JSON
        held = big.hold(RequestView("POST", "/", HEADERS))
        answer = ResponseView(payload={"data": [item] * count})
        results[f"all_{count}_items"] = _timed(lambda a=answer, h=held: big.charge(h, a), 20)
    return results


def _print(results: dict[str, Any]) -> None:
    print(f"compile examples/pricebook-media.yaml (6 rules): {results['compile_pricebook_ms']} ms")
    print(f"{'rule':<14} {'body':>8}  {'bound p50/p99 us':>18}  {'charge p50/p99 us':>18}")
    for row in results["rules"]:
        bound, charge = row["bound"], row["charge"]
        print(
            f"{row['rule']:<14} {row['body_bytes']:>8}  "
            f"{bound['p50_us']:>8} / {bound['p99_us']:<8} "
            f"{charge['p50_us']:>8} / {charge['p99_us']}"
        )
    simple = results["simple_chat"]
    print(
        f"{'simple chat':<14} {'':>8}  {simple['bound']['p50_us']:>8} / "
        f"{simple['bound']['p99_us']:<8} {simple['charge']['p50_us']:>8} / "
        f"{simple['charge']['p99_us']}"
    )
    for count in (1_000, 4_000, 16_000):
        timing = results[f"all_{count}_items"]
        print(f"cost over {count:>6} items: p50 {timing['p50_us']} us, p99 {timing['p99_us']} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.iterations)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
