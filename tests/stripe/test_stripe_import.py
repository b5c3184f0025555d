"""The import template of budgets synced from Stripe: loading, start-up validation (rendered
for a sample customer with the models), reloading, and the settings and flags that lead there.
The import itself, end to end, is in tests/operator/test_operator_wiring.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from spendgate import cli
from spendgate.cli import UsageError
from spendgate.operator.runtime import cli_args
from spendgate.operator.runtime.main import run_operator
from spendgate.operator.runtime.settings import OperatorSettings
from spendgate.operator.stripe.budget_import import TemplateFile, load_import_template
from spendgate.operator.stripe.settings import StripeSettings
from spendgate.operator.stripe.sync import (
    SOURCE_LABEL,
    TemplateError,
    budget_from_customer,
    kubernetes_name,
    load_template,
    validate_template,
)

GOOD = """\
apiVersion: spendgate.dev/v1alpha1
kind: CustomerBudget
metadata:
  name: ${name}
  labels: {team: billing}
spec:
  customerId: ${customerId}
  displayName: ${customer.email}
  currency: USD
  balance: "0"
  policy:
    requirePaymentMethod: true
"""


def settings(path: Path | None = None, **overrides: Any) -> StripeSettings:
    return StripeSettings(
        enabled=True,
        import_enabled=path is not None,
        import_template_file=str(path) if path else None,
        import_namespace="billing" if path else None,
        **overrides,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(text)
    return path


def test_a_good_template_renders_for_the_sample_customer() -> None:
    template = load_template(GOOD)
    manifest = validate_template(template, StripeSettings(), namespace="billing")
    assert manifest["metadata"]["namespace"] == "billing"
    assert manifest["metadata"]["labels"] == {"team": "billing", SOURCE_LABEL: "stripe"}
    assert manifest["spec"]["displayName"] == "sample@example.com"
    customer = {"id": "cus_Real1", "email": "ops@acme.test", "metadata": {"spendgate": "true"}}
    real = budget_from_customer(template, customer)
    assert real["metadata"]["name"] == kubernetes_name("cus_Real1")
    assert real["metadata"]["annotations"]["spendgate.dev/stripe-customer"] == "cus_Real1"
    assert real["spec"]["stripe"] == {"customerId": "cus_Real1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec: [unclosed", "not valid YAML"),
        ("", r"expected one YAML document \(a CustomerBudget\), found 0"),
        ("spec: {}\n---\nspec: {}\n", "found 2"),
        ("- a\n- b\n", "expected a mapping, got list"),
    ],
)
def test_template_files_that_are_no_template(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        load_template(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("displayName", "${customer.mail}"), r"unknown placeholder\(s\) \$\{customer\.mail\}"),
        (("currency", None), r"spec\.currency: required field is missing"),
        (("balance", "lots"), r"spec\.balance"),
        (("mode", "capped"), "capped"),
        (("customerId", "not valid!"), "not a valid customer id"),
        (("rateLimits", [{"requests": 10, "per": "fortnight"}]), r"spec\.rateLimits\[0\]\.per"),
    ],
)
def test_invalid_templates_are_refused_with_the_field(change: Any, message: str) -> None:
    template = load_template(GOOD)
    key, value = change
    if value is None:
        template["spec"].pop(key)
    else:
        template["spec"][key] = value
    with pytest.raises(TemplateError, match=message):
        validate_template(template, StripeSettings(), namespace="billing")


def test_kind_name_and_namespace_of_the_template() -> None:
    other_kind = {**load_template(GOOD), "kind": "PriceBook"}
    with pytest.raises(TemplateError, match="must be CustomerBudget"):
        validate_template(other_kind)
    bad_name = load_template(GOOD.replace("name: ${name}", "name: ${customer.email}"))
    with pytest.raises(TemplateError, match=r"metadata\.name"):
        validate_template(bad_name)
    elsewhere = load_template(GOOD.replace("  name: ${name}", "  name: ${name}\n  namespace: x"))
    with pytest.raises(TemplateError, match="differs from the import namespace 'billing'"):
        validate_template(elsewhere, namespace="billing")
    assert validate_template(elsewhere, namespace="x")["metadata"]["namespace"] == "x"


def test_fields_from_customer_metadata_are_judged_per_customer() -> None:
    """A value from metadata cannot be judged at start-up: the template passes, and a customer
    whose metadata does not fit is refused when imported (skipped, logged, counted)."""
    template = load_template(GOOD.replace('balance: "0"', "balance: ${metadata.credit}"))
    assert validate_template(template)["spec"]["balance"] == "1"  # the sample value
    customer = {"id": "cus_A", "email": "a@b.test", "metadata": {"credit": "25.00"}}
    assert budget_from_customer(template, customer)["spec"]["balance"] == "25.00"
    with pytest.raises(TemplateError, match=r"spec\.balance"):
        budget_from_customer(template, {**customer, "metadata": {"credit": "lots"}})
    with pytest.raises(TemplateError, match=r"\$\{metadata\.credit\} has no value"):
        budget_from_customer(template, {**customer, "metadata": {}})
    # Other fields are still checked at start-up.
    template["spec"].pop("currency")
    with pytest.raises(TemplateError, match=r"spec\.currency"):
        validate_template(template)


def test_the_template_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    template = TemplateFile(settings(path))
    assert template.load()["spec"]["currency"] == "USD"
    path.write_text(GOOD.replace("USD", "EUR"))  # the ConfigMap was edited
    assert template.load()["spec"]["currency"] == "EUR"
    path.write_text(GOOD.replace("currency: USD", "currency: ''"))
    with pytest.raises(TemplateError, match=rf"{path}: invalid import template: spec\.currency"):
        template.load()
    path.unlink()
    with pytest.raises(TemplateError, match="cannot read the import template"):
        template.load()


def test_the_import_namespace_must_be_watched(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load_import_template(settings(path), ("billing", "models")).namespace == "billing"
    with pytest.raises(TemplateError, match="'billing' is not a watched namespace"):
        load_import_template(settings(path), ("models",))


def test_import_settings() -> None:
    with pytest.raises(ValueError, match="import_template_file and import_namespace"):
        StripeSettings(import_enabled=True, import_namespace="billing")
    with pytest.raises(ValueError, match="import_interval_s"):
        StripeSettings(import_interval_s=0)
    env = {
        "SPENDGATE_STRIPE_IMPORT_ENABLED": "true",
        "SPENDGATE_STRIPE_IMPORT_METADATA_KEY": "gpu_access",
        "SPENDGATE_STRIPE_IMPORT_METADATA_VALUE": "granted",
        "SPENDGATE_STRIPE_IMPORT_TEMPLATE_FILE": "/etc/spendgate/stripe-import/template.yaml",
        "SPENDGATE_STRIPE_IMPORT_NAMESPACE": "billing",
        "SPENDGATE_STRIPE_IMPORT_INTERVAL_S": "60",
    }
    parsed = StripeSettings.from_env(env)
    assert parsed.import_enabled and parsed.import_interval_s == 60
    assert (parsed.import_metadata_key, parsed.import_metadata_value) == ("gpu_access", "granted")
    assert parsed.import_template_file == "/etc/spendgate/stripe-import/template.yaml"
    assert parsed.import_namespace == "billing"
    assert not StripeSettings.from_env({}).import_enabled


def _operator_env(path: Path) -> dict[str, str]:
    return {
        "SPENDGATE_STRIPE_ENABLED": "true",
        "SPENDGATE_STRIPE_IMPORT_ENABLED": "true",
        "SPENDGATE_STRIPE_IMPORT_TEMPLATE_FILE": str(path),
        "SPENDGATE_STRIPE_IMPORT_NAMESPACE": "billing",
    }


def test_an_invalid_template_stops_the_operator_at_startup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD.replace("  currency: USD\n", ""))
    ns = cli.build_parser().parse_args(["operator"])
    with pytest.raises(
        UsageError, match=r"IMPORT_TEMPLATE_FILE: .*spec\.currency: required field is missing"
    ):
        cli_args.operator_settings_from_args(ns, _operator_env(path))
    with pytest.raises(UsageError, match="not a watched namespace"):
        cli_args.operator_settings_from_args(
            ns, {**_operator_env(write(tmp_path, GOOD)), "SPENDGATE_WATCH_NAMESPACES": "models"}
        )
    ok = cli_args.operator_settings_from_args(ns, _operator_env(write(tmp_path, GOOD)))
    assert ok.stripe is not None and ok.stripe.import_enabled
    missing = _operator_env(tmp_path / "absent.yaml")
    with pytest.raises(UsageError, match="cannot read the import template"):
        cli_args.operator_settings_from_args(ns, missing)
    with pytest.raises(UsageError, match="import_template_file and import_namespace"):
        cli_args.operator_settings_from_args(
            ns, {**missing, "SPENDGATE_STRIPE_IMPORT_NAMESPACE": ""}
        )
    # The command line says what to fix, and exits 2.
    path = write(tmp_path, GOOD.replace("${customer.email}", "${customer.mail}"))
    code = _main_with_env(["operator"], _operator_env(path))
    assert code == 2
    assert "unknown placeholder(s) ${customer.mail}" in capsys.readouterr().err


def _main_with_env(argv: list[str], env: dict[str, str]) -> int:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        return cli.main(argv)


def test_run_operator_refuses_an_invalid_template_before_starting(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('balance: "0"', "balance: -1"))
    operator_settings = OperatorSettings(stripe=settings(path))
    with pytest.raises(TemplateError, match=r"spec\.balance"):
        asyncio.run(run_operator(operator_settings, services=[], health=False))
