"""The layers of the code, read from the import statements of every module.

- The core (``spendgate/``) imports neither kopf nor aiohttp, nor the operator or the sidecar;
  ``spendgate.cli`` (the entry point, a package: one module per command group) may import them
  inside the command that needs them, but importing it (``spendgate --help``) must not pull
  kopf or aiohttp in.
- ``operator/`` sub-packages import downwards only: runtime -> budgets | admission | stripe |
  pricebooks -> kube | alerts -> core. Packages of one layer are independent of each other.
- The operator and the sidecar never import each other.

import-linter cannot check this tree: it finds a package's modules by walking its folder, and
``spendgate.operator``/``spendgate.sidecar`` are mapped from ``operator/``/``sidecar/`` by
pyproject's ``package-dir``, outside ``spendgate/``. So the imports are read here with ``ast``:
every ``import`` and ``from ... import`` statement, also those inside functions and under
``TYPE_CHECKING`` (a layer that needs a type from above needs a Protocol of its own instead).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "spendgate": "spendgate",
    "spendgate.operator": "operator",
    "spendgate.sidecar": "sidecar",
}

# The operator's layers, top first. A new sub-package must be placed here.
OPERATOR_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"runtime"}),
    frozenset({"budgets", "admission", "stripe", "pricebooks"}),
    frozenset({"kube", "alerts"}),
)
FRAMEWORKS = ("kopf", "aiohttp")
ENTRY_POINT = "spendgate.cli"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (for ``from x import y``: x.y if that is a module, else x)
    line: int
    top_level: bool  # at module level (not inside a function)


def module_files(folders: dict[str, str] = FOLDERS, root: Path = ROOT) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for package, folder in folders.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    top = {id(node) for node in tree.body} | {
        id(child)
        for node in tree.body
        if isinstance(node, ast.If | ast.Try)
        for child in ast.walk(node)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, id(node) in top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = {
                f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                for a in node.names
            }
            for target in sorted(targets):
                yield Import(module, target, node.lineno, id(node) in top)


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def operator_package(module: str) -> str | None:
    """The operator sub-package of ``module`` (``runtime``, ``kube``, ...); None outside."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["spendgate", "operator"] else None


def layer_of(package: str) -> int | None:
    for rank, packages in enumerate(OPERATOR_LAYERS):
        if package in packages:
            return rank
    return None


def violations(files: dict[str, Path]) -> list[str]:
    known = set(files)
    found: list[str] = []
    graph: dict[str, list[Import]] = {m: list(imports_of(m, p, known)) for m, p in files.items()}
    for module, edges in graph.items():
        core = not under(module, "spendgate.operator") and not under(module, "spendgate.sidecar")
        mine = operator_package(module)
        if mine is not None and module.count(".") == 2 and not _is_package(files[module]):
            found.append(f"{module}: operator modules belong in a sub-package")
            continue
        if mine is not None and module.count(".") == 2 and layer_of(mine) is None:
            found.append(f"{module}: sub-package {mine!r} has no layer in OPERATOR_LAYERS")
        for edge in edges:
            where = f"{module}:{edge.line} imports {edge.target}"
            if core and any(under(edge.target, f) for f in FRAMEWORKS):
                found.append(f"{where}: the core imports neither kopf nor aiohttp")
            outer = under(edge.target, "spendgate.operator") or under(
                edge.target, "spendgate.sidecar"
            )
            if core and not under(module, ENTRY_POINT) and outer:
                found.append(f"{where}: the core imports neither the operator nor the sidecar")
            if under(module, "spendgate.operator") and under(edge.target, "spendgate.sidecar"):
                found.append(f"{where}: the operator does not import the sidecar")
            if under(module, "spendgate.sidecar") and under(edge.target, "spendgate.operator"):
                found.append(f"{where}: the sidecar does not import the operator")
            theirs = operator_package(edge.target)
            if mine is None or theirs is None or theirs == mine:
                continue
            mine_rank, their_rank = layer_of(mine), layer_of(theirs)
            if mine_rank is not None and their_rank is not None and their_rank <= mine_rank:
                kind = "a sibling of its layer" if their_rank == mine_rank else "a layer above"
                found.append(f"{where}: {theirs} is {kind} ({mine} imports downwards only)")
    found += _entry_point_pulls_frameworks(graph)
    return found


def _entry_point_pulls_frameworks(graph: dict[str, list[Import]]) -> list[str]:
    """Module-level imports reachable from the entry point must not include kopf/aiohttp."""
    if ENTRY_POINT not in graph:
        return []
    seen, todo, found = {ENTRY_POINT}, [ENTRY_POINT], []
    while todo:
        module = todo.pop()
        for edge in graph.get(module, []):
            if not edge.top_level:
                continue
            if any(under(edge.target, f) for f in FRAMEWORKS):
                found.append(f"importing {ENTRY_POINT} imports {edge.target} (via {module})")
            parts = edge.target.split(".")
            for length in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                executed = ".".join(parts[:length])
                if executed in graph and executed not in seen:
                    seen.add(executed)
                    todo.append(executed)
    return found


def test_the_code_keeps_its_layers() -> None:
    files = module_files()
    assert "spendgate.operator.runtime.main" in files  # the tree was found
    assert violations(files) == []


def _tree(tmp_path: Path, modules: dict[str, str]) -> dict[str, Path]:
    folders = {"spendgate": "spendgate", "spendgate.operator": "operator"}
    for name, text in modules.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return module_files(folders, tmp_path)


def test_the_check_finds_what_breaks_the_layers(tmp_path: Path) -> None:
    files = _tree(
        tmp_path,
        {
            "spendgate/__init__.py": "",
            "spendgate/models.py": "def f():\n    import kopf\n",
            "spendgate/cli.py": "from spendgate import models\n",
            "operator/__init__.py": "",
            "operator/flat.py": "",
            "operator/kube/__init__.py": "",
            "operator/kube/client.py": "from ..budgets import reconcile\n",
            "operator/budgets/__init__.py": "",
            "operator/budgets/reconcile.py": (
                "from ..stripe.wiring import X\nfrom ..kube import client\n"
            ),
            "operator/stripe/__init__.py": "",
            "operator/stripe/wiring.py": "X = 1\n",
            "operator/ledger/__init__.py": "",
        },
    )
    found = violations(files)
    assert any("spendgate.models:2 imports kopf" in v for v in found)
    assert any(
        "spendgate.operator.flat: operator modules belong in a sub-package" in v for v in found
    )
    assert any(
        "kube.client:1 imports spendgate.operator.budgets" in v and "above" in v for v in found
    )
    assert any("budgets.reconcile:1" in v and "sibling" in v for v in found)
    assert not any("budgets.reconcile:2" in v for v in found)  # kube is below budgets
    assert any("'ledger' has no layer" in v for v in found)
    assert len(found) == 5, found


def test_the_entry_point_may_not_pull_frameworks_in_at_import(tmp_path: Path) -> None:
    files = _tree(
        tmp_path,
        {
            "spendgate/__init__.py": "",
            "spendgate/cli.py": "from spendgate import helper\n\ndef run():\n    import kopf\n",
            "spendgate/helper.py": "try:\n    import aiohttp\nexcept ImportError:\n    pass\n",
        },
    )
    found = violations(files)
    assert any("spendgate.helper:2 imports aiohttp" in v for v in found)
    assert any("importing spendgate.cli imports aiohttp (via spendgate.helper)" in v for v in found)
    assert any("spendgate.cli:4 imports kopf" in v for v in found)  # the core rule, lazily too
