"""Prices as CEL expressions: compile-time checks, bounded evaluation, the charge <= bound rule."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from spendgate.cli import main
from spendgate.expressions import (
    BodyError,
    EvaluationError,
    ExpressionError,
    ExpressionPricing,
    Phase,
    RequestView,
    ResponseView,
    compile_expression,
)
from spendgate.expressions.inputs import parse_request_body
from spendgate.expressions.scan import MAX_EXPRESSION_CHARS, fields_read
from spendgate.expressions.simple import SIMPLE_COST, simple_prices
from spendgate.models import ManifestError, PriceRule, parse_resource
from spendgate.pricing import (
    BadRequestBody,
    ExpressionForm,
    NotPriceable,
    RequestFacts,
    Used,
    cost_of,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MICRO = 1_000_000


def request(body: bytes = b"{}", content_type: str = "application/json", **kw: Any) -> RequestView:
    fields: dict[str, Any] = {"method": "POST", "path": "/v1/x", "headers": CIMultiDict()}
    return RequestView(**{**fields, "body": body, "content_type": content_type, **kw})


def pricebook(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "spendgate.dev/v1alpha1",
        "kind": "PriceBook",
        "metadata": {"name": "media"},
        "spec": {"currency": "USD", "rules": list(rules)},
    }


def problem_of(rule: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_resource(pricebook({"name": "ok", "price": {"flat": "0.01"}}, rule))
    [problem] = caught.value.problems
    return problem


# --------------------------------------------------------------------------- compile time


@pytest.mark.parametrize(
    ("source", "phase", "expected"),
    [
        ("request.n * 5 +", Phase.bound, "does not compile: Syntax error: mismatched input"),
        ("prices.a + reqest.n", Phase.bound, "unknown variable 'reqest' (known: body_bytes,"),
        ("size(response.data)", Phase.bound, "'response' is only known after the model answered"),
        ("upstream_ms * 2", Phase.bound, "'upstream_ms' is only known after the model"),
        ("'0.05'", Phase.cost, "returns a string, not a number of micro-units"),
        ("request.n > 2", Phase.bound, "returns a bool, not a number"),
        ("double(request.n) * 0.05", Phase.bound, "returns a double; money is an integer"),
        ("request.n * 'x'", Phase.bound, "found no matching overload for '_*_'"),
        ("tokens.input / 1000", Phase.bound, "uses '/', which rounds down"),
        ("request.a.all(x, request.b.exists(y, y == x)) ? 1 : 0", Phase.bound, "nests"),
        ("size(response.data.filter(d, has(d.url)))", Phase.cost, "uses filter(), which takes"),
        ("size(request.input.map(i, i))", Phase.bound, "uses map(), which takes time quadratic"),
        ("1 + " * (MAX_EXPRESSION_CHARS // 4) + "1", Phase.bound, "is longer than"),
        ("  ", Phase.bound, "is empty"),
    ],
)
def test_compile_errors_say_what_is_wrong(source: str, phase: Phase, expected: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source, phase)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("source", "line", "column"),
    [
        ("request.n * 5 +", 1, 16),
        ("prices.a + reqest.n", 1, 12),
        ("1 +\n  size(response.data)", 2, 8),
        ("tokens.input / 1000", 1, 14),
    ],
)
def test_compile_errors_give_the_position(source: str, line: int, column: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source, Phase.bound)
    assert (caught.value.line, caught.value.column) == (line, column)


def test_division_signs_inside_strings_are_not_division() -> None:
    expression = compile_expression("size('a/b') + size(r'c/d') + size(\"e/f\")", Phase.bound)
    assert expression.evaluate({}) == 9


def test_one_comprehension_over_the_input_is_fine() -> None:
    expression = compile_expression(
        "response.data.all(d, has(d.b64_json)) ? size(response.data) * 3 : bound", Phase.cost
    )
    assert expression.evaluate({"response": {"data": [{"b64_json": "x"}] * 2}, "bound": 9}) == 6
    assert expression.evaluate({"response": {"data": [{"b64_json": "x"}, {}]}, "bound": 9}) == 9


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("size(response.data) * 2", {"data"}),
        ("has(response.usage) ? response.usage.seconds : response.duration", {"usage", "duration"}),
        ("response['data'].size()", None),
        ("size(response)", None),
        ("response.data.all(d, true) ? 1 : response.exists(k, k == 'x') ? 2 : 3", None),
        ("'response.data' == 'x' ? 1 : bound", set()),
        ("myresponse.x + a.response", set()),
    ],
)
def test_only_the_fields_an_expression_reads_are_passed(
    source: str, fields: set[str] | None
) -> None:
    found = fields_read(source, "response")
    assert found == (None if fields is None else frozenset(fields))


def test_a_rule_that_does_not_read_the_body_does_not_parse_it() -> None:
    by_size = ExpressionPricing(bound="body_bytes * 2", cost=None)
    assert by_size.hold(request(b"{not json")).amount == 18
    by_field = ExpressionPricing(bound="int(request.n)", cost=None, defaults={"n": 1, "m": 2})
    held = by_field.hold(request(b'{"n": 4, "prompt": "long text"}'))
    assert (held.amount, held.variables["request"]) == (4, {"n": 4})


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            {"name": "img", "expression": {"bound": "int(request.n) *"}},
            "spec.rules[1]: rule 'img': expression.bound: does not compile: Syntax error:"
            " mismatched input '<EOF>' at line 1, column 17",
        ),
        (
            {"name": "img", "expression": {"bound": "1", "cost": "size(respons.data)"}},
            "spec.rules[1]: rule 'img': expression.cost: unknown variable 'respons' (known:"
            " body_bytes, bound, headers, held_ms, method, path, prices, request, response,"
            " response_headers, status, timeout_ms, tokens, upstream_ms) at line 1, column 6",
        ),
        (
            {"name": "img", "expression": {"bound": "prices.image > 0"}},
            "spec.rules[1]: rule 'img': expression.bound: returns a bool, not a number of"
            " micro-units",
        ),
        (
            {"name": "img", "expression": {"cost": "size(response.data)"}},
            "spec.rules[1]: rule 'img': expression: a rule priced by expressions needs a bound"
            " (or a maximum to hold): without one nothing limits what a request may be charged",
        ),
        (
            {"name": "img", "price": {"flat": "1"}, "expression": {"bound": "1"}},
            "spec.rules[1]: give price or expression, not both",
        ),
        (
            {"name": "img", "expression": {"bound": "1", "prices": {"a b": "1"}}},
            "spec.rules[1].expression.prices: 'a b': price names are 1-63 letters, digits",
        ),
        (
            {"name": "img", "expression": {"bound": "1", "prices": {"a": 0.05}}},
            "spec.rules[1].expression.prices.a: expected a decimal string",
        ),
    ],
)
def test_pricebook_errors_name_the_rule_and_the_position(
    rule: dict[str, Any], expected: str
) -> None:
    assert problem_of(rule).startswith(expected), problem_of(rule)


def test_spendgate_apply_refuses_a_bad_expression(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "media.yaml"
    text = (EXAMPLES / "pricebook-media.yaml").read_text()
    bad.write_text(text.replace("size(response.data) *", "size(response.dta) * respnse +", 1))
    code = main(["apply", "-f", str(bad), "--redis", redis_url])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert (
        "(PriceBook default/media): spec.rules[0]: rule 'images': expression.cost: unknown"
        " variable 'respnse'"
    ) in err
    assert "at line 1, column 22" in err
    assert err.rstrip().endswith("applied: nothing")


def test_the_ready_made_rules_compile_once_per_pricebook() -> None:
    manifest = yaml.safe_load((EXAMPLES / "pricebook-media.yaml").read_text())
    spec = parse_resource(manifest).spec  # type: ignore[union-attr]
    compiled = [rule.pricing for rule in spec.rules]
    assert all(pricing is not None for pricing in compiled)
    assert [rule.pricing for rule in spec.rules] == compiled  # the same objects, not recompiled
    round_trip = PriceRule.model_validate(spec.rules[0].to_manifest())
    assert round_trip.to_manifest() == spec.rules[0].to_manifest()


# --------------------------------------------------------------------------- evaluation


IMAGES = ExpressionPricing(
    bound='int(request.n) * prices[request.quality + "_" + request.size]',
    cost='size(response.data) * prices[request.quality + "_" + request.size]',
    prices={"standard_256x256": 16_000, "hd_1792x1024": 120_000},
    defaults={"n": 1, "size": "256x256", "quality": "standard"},
)


def test_defaults_fill_absent_and_null_fields() -> None:
    assert IMAGES.hold(request(b"{}")).amount == 16_000
    assert IMAGES.hold(request(b'{"n": null, "size": null}')).amount == 16_000
    hd = b'{"n": 10, "size": "1792x1024", "quality": "hd"}'
    assert IMAGES.hold(request(hd)).amount == 10 * 120_000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"size": "999x999"}', 'Key not found in map : "standard_999x999"'),
        (b'{"n": "many"}', "cannot convert string to int"),
        (b'{"n": -3}', "a price cannot be negative"),
        (b'{"n": 99999999999999999999}', "out of range"),
        (b'{"n": 9223372036854775807}', "integer overflow"),
    ],
)
def test_a_request_the_bound_cannot_price_is_an_evaluation_error(
    body: bytes, expected: str
) -> None:
    with pytest.raises(EvaluationError) as caught:
        IMAGES.hold(request(body))
    assert expected in str(caught.value)


def test_the_charge_never_exceeds_the_bound_and_the_excess_is_absorbed() -> None:
    held = IMAGES.hold(request(b'{"n": 2}'))
    three = ResponseView(payload={"data": [{}, {}, {}]})
    charge = IMAGES.charge(held, three)
    assert (charge.charged, charge.absorbed, charge.error) == (32_000, 16_000, None)
    one = IMAGES.charge(held, ResponseView(payload={"data": [{}]}))
    assert (one.charged, one.absorbed) == (16_000, 0)


def test_a_failing_cost_expression_charges_the_bound() -> None:
    held = IMAGES.hold(request(b'{"n": 2}'))
    charge = IMAGES.charge(held, ResponseView(payload=None))
    assert (charge.charged, charge.absorbed) == (32_000, 0)
    assert charge.error is not None and "data" in charge.error


def test_maximum_caps_the_bound_and_holds_when_there_is_no_bound() -> None:
    capped = ExpressionPricing(bound="body_bytes * 10", cost=None, maximum=500)
    assert capped.hold(request(b"x" * 20, "text/plain")).amount == 200
    assert capped.hold(request(b"x" * 100, "text/plain")).amount == 500
    only_cost = ExpressionPricing(bound=None, cost="upstream_ms * 2", maximum=1_000)
    held = only_cost.hold(request())
    assert held.amount == 1_000
    assert only_cost.charge(held, ResponseView(upstream_ms=300)).charged == 600
    assert only_cost.charge(held, ResponseView(upstream_ms=3_000)).absorbed == 5_000


def test_request_variables() -> None:
    pricing = ExpressionPricing(
        bound='(method == "POST" ? 1 : 0) + (path == "/v2/models/m/infer" ? 10 : 0)'
        ' + int(headers["x-frames"]) * 100 + timeout_ms * 1000 + tokens.output * 10000',
        cost='status * 100 + int(response_headers["x-gpu-ms"]) + tokens.input + bound % 7',
        headers=("X-Frames",),
        response_headers=("X-GPU-Ms",),
    )
    view = request(
        method="post",
        path="/v2/models/m/infer",
        headers=CIMultiDict({"X-FRAMES": "3"}),
        timeout_ms=2,
        output_tokens=4,
    )
    held = pricing.hold(view)
    assert held.amount == 1 + 10 + 300 + 2_000 + 40_000
    answer = ResponseView(status=200, headers=CIMultiDict({"x-gpu-ms": "77"}), input_tokens=5)
    assert pricing.charge(held, answer).charged == 20_000 + 77 + 5 + held.amount % 7


# --------------------------------------------------------------------------- bodies


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "----spendgate-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    body = "".join(parts).encode()
    for name, data in files.items():
        body += (
            (
                f"--{boundary}\r\nContent-Disposition: form-data;"
                f' name="{name}"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_fields_and_file_sizes() -> None:
    body, content_type = multipart({"model": "whisper-1", "n": "2"}, {"file": b"\0\r\n" * 1000})
    fields = parse_request_body(body, content_type)
    assert fields == {
        "model": "whisper-1",
        "n": "2",
        "file": {"filename": "a.wav", "content_type": "audio/wav", "bytes": 3000},
    }


def test_urlencoded_and_other_bodies() -> None:
    assert parse_request_body(b"n=2&size=256x256", "application/x-www-form-urlencoded") == {
        "n": "2",
        "size": "256x256",
    }
    assert parse_request_body(b"\x00\x01", "application/octet-stream") == {}
    assert parse_request_body(b"", "application/json") == {}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[1, 2]", "application/json"),
        (b"{not json", "application/json; charset=utf-8"),
        (b"--x\r\nno header end", "multipart/form-data; boundary=x"),
        (b"anything", "multipart/form-data"),
    ],
)
def test_bodies_that_lie_about_their_type_are_refused(body: bytes, content_type: str) -> None:
    with pytest.raises(BodyError):
        parse_request_body(body, content_type)


# --------------------------------------------------------------------------- simple == expression


def simple_rule(flat: int, pin: int, pout: int, psec: int, maximum: int) -> PriceRule:
    micros = {"flat": flat, "perMillionInputTokens": pin, "perMillionOutputTokens": pout}
    price = {name: f"{value / MICRO:.6f}" for name, value in {**micros, "perSecond": psec}.items()}
    return PriceRule.model_validate(
        {"name": "chat", "price": price, "maximum": f"{maximum / MICRO:.6f}"}
    )


money = st.integers(min_value=0, max_value=50 * MICRO)
counts = st.integers(min_value=0, max_value=2_000_000)


@given(
    flat=money, pin=money, pout=money, psec=money, extra=money,
    tokens_in=counts, tokens_out=counts, upstream_ms=st.integers(0, 3_600_000),
)  # fmt: skip
def test_simple_prices_and_their_expression_agree(
    flat: int, pin: int, pout: int, psec: int, extra: int,
    tokens_in: int, tokens_out: int, upstream_ms: int,
) -> None:  # fmt: skip
    maximum = flat + extra + 1
    rule = simple_rule(flat, pin, pout, psec, maximum)
    expression = ExpressionPricing(
        bound=None, cost=SIMPLE_COST, prices=simple_prices(flat, pin, pout, psec), maximum=maximum
    )
    held = expression.hold(request())
    answer = ResponseView(input_tokens=tokens_in, output_tokens=tokens_out, upstream_ms=upstream_ms)
    charge = expression.charge(held, answer)
    assert charge.error is None
    assert charge.charged == cost_of(rule, tokens_in, tokens_out, upstream_ms)


def test_simple_cost_is_a_valid_cost_expression_in_docs() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "pricing.md").read_text()
    assert textwrap.dedent(SIMPLE_COST) in " ".join(docs.split())


# --------------------------------------------------------------------------- the pricing form


def images_form(body: bytes, content_type: str = "application/json") -> ExpressionForm:
    rule = PriceRule.model_validate(
        {
            "name": "images",
            "expression": {
                "prices": {"image": "0.04"},
                "defaults": {"n": 1},
                "bound": "int(request.n) * prices.image",
                "cost": "size(response.data) * prices.image",
            },
        }
    )
    assert rule.pricing is not None
    return ExpressionForm(
        rule, rule.pricing, "POST", "/v1/images/generations", CIMultiDict(), body,
        content_type, input_tokens=0,
    )  # fmt: skip


def test_expression_rules_share_the_pricing_interface() -> None:
    form = images_form(b'{"n": 2}')
    bound = form.bound(RequestFacts())
    assert (bound.hold, bound.minimum, bound.clampable) == (80_000, 80_000, False)
    assert form.output_for(bound, bound.hold) is None
    assert form.max_cost == 80_000
    # The full cost, even beyond the bound: the ledger charges the hold and absorbs the rest.
    assert form.cost(Used(response={"data": [{}, {}, {}]})) == 120_000
    assert form.cost(Used(response={"data": [{}]})) == 40_000
    assert form.cost(Used(response=None)) == 80_000 and form.error is not None


def test_the_form_refuses_what_it_cannot_price() -> None:
    with pytest.raises(NotPriceable, match="rule 'images': bound: "):
        images_form(b'{"n": "many"}').bound(RequestFacts())
    with pytest.raises(BadRequestBody):
        images_form(b"[1]").bound(RequestFacts())
