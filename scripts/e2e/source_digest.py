"""The SHA-256 of what the Dockerfile copies into the image (pyproject.toml, README.md,
spendgate/, operator/, sidecar/ and the Dockerfile itself). build-image.sh labels the image
with it; the image test runs an image only when its label matches the checkout."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ("Dockerfile", "pyproject.toml", "README.md", "spendgate", "operator", "sidecar")
LABEL = "dev.spendgate.source-digest"


def source_digest(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for name in INPUTS:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(str(file.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


if __name__ == "__main__":
    sys.stdout.write(source_digest() + "\n")
