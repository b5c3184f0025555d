#!/usr/bin/env bash
# Builds and caches the Kubernetes control plane the e2e tier runs against, from Debian packages:
#   etcd                     Debian's etcd-server (3.4), installed with apt
#   kube-apiserver 1.20      built from Debian's source package `kubernetes` (1.20.2, vendored)
#   kube-controller-manager  from the same tree
# Two patches are needed because Debian's Go (1.19) is newer than the one 1.20 was written for:
#   1. vendored github.com/modern-go/reflect2 1.0.1 faults under Go >= 1.18 on the first
#      custom-resource write: replaced by Debian's golang-github-modern-go-reflect2-dev (1.0.2);
#   2. kube-openapi's type validator treats every "" as null under Go >= 1.16: the upstream fix
#      (kubernetes/kubernetes#99804) tests `data == nil` only.
# Binaries land in $SPENDGATE_E2E_CACHE/kube-<version>/bin (default /var/cache/spendgate-e2e),
# outside the checkout, so every checkout and CI run on the machine shares them. Idempotent: a
# component whose binary and stamp exist is skipped. `--check` only reports what is missing.
set -euo pipefail

CACHE="${SPENDGATE_E2E_CACHE:-/var/cache/spendgate-e2e}"
KUBE_SOURCE_PACKAGE=kubernetes
# The stamp names the build recipe; bump it when the patches or the recipe change.
RECIPE=1.20-r1
KUBE_DIR="$CACHE/kube-$RECIPE"
BIN="$KUBE_DIR/bin"
COMPONENTS=(kube-apiserver kube-controller-manager)

log() { echo "build-control-plane: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root (or sudo) to run: $*"; exit 1
  fi
}

have_kube() {
  [ -f "$KUBE_DIR/.built" ] && for c in "${COMPONENTS[@]}"; do [ -x "$BIN/$c" ] || return 1; done
}

if [ "${1:-}" = "--check" ]; then
  ok=0
  command -v etcd >/dev/null || { log "missing: etcd (apt package etcd-server)"; ok=1; }
  have_kube || { log "missing: ${COMPONENTS[*]} in $BIN"; ok=1; }
  exit $ok
fi

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v etcd >/dev/null; then
  apt_install etcd-server
fi

if have_kube; then
  log "cached: ${COMPONENTS[*]} ($("$BIN/kube-apiserver" --version)) in $BIN"
  exit 0
fi

start=$(date +%s)
need=()
command -v go >/dev/null || need+=(golang-go)
command -v rsync >/dev/null || need+=(rsync)
command -v dpkg-source >/dev/null || need+=(dpkg-dev)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

# apt-get source needs a deb-src line for the suite this machine runs.
if ! apt-get source --print-uris -qq "$KUBE_SOURCE_PACKAGE" >/dev/null 2>&1; then
  suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  log "adding a deb-src entry for $suite"
  as_root tee /etc/apt/sources.list.d/spendgate-deb-src.sources >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  as_root apt-get update -qq
fi

as_root mkdir -p "$CACHE"
as_root chown "$(id -u):$(id -g)" "$CACHE"
work="$KUBE_DIR/src"
rm -rf "$work"
mkdir -p "$work"
(cd "$work" && apt-get source -qq "$KUBE_SOURCE_PACKAGE" >/dev/null 2>&1)
tree="$(find "$work" -maxdepth 1 -mindepth 1 -type d -name "$KUBE_SOURCE_PACKAGE-*" | head -n1)"
[ -n "$tree" ] || { log "apt-get source $KUBE_SOURCE_PACKAGE produced no tree in $work"; exit 1; }
log "building from $(basename "$tree")"

# Patch 1: reflect2 1.0.2 from Debian.
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"

# Patch 2: "" is not null (kube-openapi PR #230).
typego="$tree/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"
old='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
grep -qF "$old" "$typego" || { log "patch 2: expected line not found in $typego"; exit 1; }
python3 - "$typego" "$old" <<'PY'
import sys
path, old = sys.argv[1], sys.argv[2]
text = open(path).read()
open(path, "w").write(text.replace(old, "if data == nil {", 1))
PY

# GOPATH mode, as Debian's own rules build it.
mkdir -p "$tree/.go/src/k8s.io"
ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
(
  cd "$tree"
  export GOPATH="$tree/.go" CGO_ENABLED=0 HOME="$work/home" GOCACHE="$work/gocache"
  export KUBE_GIT_VERSION="v1.20.2" KUBE_GIT_TREE_STATE=clean
  make WHAT="$(printf 'cmd/%s ' "${COMPONENTS[@]}")" >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2; log "build failed; full log: $work/build.log"; exit 1
  }
)
mkdir -p "$BIN"
for c in "${COMPONENTS[@]}"; do
  install -m 0755 "$tree/_output/bin/$c" "$BIN/$c.part"
  mv "$BIN/$c.part" "$BIN/$c"
done
rm -rf "$work"
touch "$KUBE_DIR/.built"
log "built ${COMPONENTS[*]} in $(( $(date +%s) - start ))s into $BIN"
