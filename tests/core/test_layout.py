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
    import spendgate.operator.settings

    assert spendgate.operator.settings.__name__ == "spendgate.operator.settings"
