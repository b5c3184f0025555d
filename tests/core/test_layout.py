"""The checkout's operator/ folder never shadows the standard library's operator module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_operator_from_the_checkout_root_is_the_standard_library() -> None:
    code = "import operator, collections; print(operator.__file__); print(operator.eq(1, 1))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    path, equal = result.stdout.split()
    assert Path(path).name == "operator.py"
    assert not Path(path).is_relative_to(ROOT)
    assert equal == "True"


def test_the_package_name_is_spendgate_operator() -> None:
    import spendgate.operator.runtime.settings

    assert spendgate.operator.runtime.settings.__name__ == "spendgate.operator.runtime.settings"


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject lists the packages one by one (``package-dir`` maps operator/ and sidecar/);
    a sub-package missing there would be missing from the image."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(config["setuptools"]["packages"])
    folders = {"spendgate": "spendgate", **config["setuptools"]["package-dir"]}
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found - listed == set()
