#!/usr/bin/env bash
# Builds and caches a current, standalone apiextensions-apiserver (the CRD half of a current
# kube-apiserver) so the e2e tier can check spendgate's CRDs and every CEL rule as a real
# server evaluates them. Debian's development suite ships its source as
# golang-k8s-apiextensions-apiserver-dev together with a recent Go; it is built in an
# mmdebstrap chroot of that suite (a few GB, kept in the cache so a rebuild is fast).
# Optional: the tier skips the CRD-server tests when this binary is missing.
#   SPENDGATE_E2E_CACHE   cache directory (default /var/cache/spendgate-e2e)
#   CRD_SERVER_SUITE      Debian suite to build in (default sid)
# `--check` only reports whether the binary is cached.
set -euo pipefail

CACHE="${SPENDGATE_E2E_CACHE:-/var/cache/spendgate-e2e}"
SUITE="${CRD_SERVER_SUITE:-sid}"
MIRROR="${CRD_SERVER_MIRROR:-http://deb.debian.org/debian}"
DIR="$CACHE/crd-server-$SUITE"
OUT="$DIR/bin/apiextensions-apiserver"
ROOT="$DIR/chroot"

log() { echo "build-crd-server: $*" >&2; }

if [ -x "$OUT" ] && [ -f "$DIR/.built" ]; then
  log "cached: $OUT ($(cat "$DIR/.built"))"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  log "missing: $OUT"
  exit 1
fi
[ "$(id -u)" -eq 0 ] || { log "needs root (mmdebstrap and chroot)"; exit 1; }

start=$(date +%s)
command -v mmdebstrap >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
}
mkdir -p "$DIR/bin"
if [ ! -f "$ROOT/.complete" ]; then
  rm -rf "$ROOT"
  log "creating a $SUITE chroot in $ROOT"
  # The mirror's index for the development suite may be past its Valid-Until date.
  mmdebstrap --variant=apt --mode=root \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include=golang-go,golang-k8s-apiextensions-apiserver-dev,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR" >"$DIR/mmdebstrap.log" 2>&1 || {
    tail -n 20 "$DIR/mmdebstrap.log" >&2; log "mmdebstrap failed; log: $DIR/mmdebstrap.log"; exit 1
  }
  touch "$ROOT/.complete"
fi
# Go needs /proc (it finds its GOROOT through /proc/self/exe): a private mount namespace and
# PID namespace with their own /proc inside the chroot, gone when the command ends.
in_chroot() {
  unshare --mount --pid --fork --mount-proc="$ROOT/proc" chroot "$ROOT" "$@"
}
version="$(in_chroot dpkg-query -W -f='${Version}' golang-k8s-apiextensions-apiserver-dev)"
log "building apiextensions-apiserver $version with $(in_chroot go version)"
# Debian's Go libraries live in GOPATH layout under /usr/share/gocode.
in_chroot env HOME=/root GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS= CGO_ENABLED=0 \
  GOCACHE=/root/.cache/go-build GOTOOLCHAIN=local \
  go build -trimpath -o /tmp/apiextensions-apiserver k8s.io/apiextensions-apiserver \
  >"$DIR/build.log" 2>&1 || {
  tail -n 30 "$DIR/build.log" >&2; log "go build failed; log: $DIR/build.log"; exit 1
}
install -m 0755 "$ROOT/tmp/apiextensions-apiserver" "$OUT.part"
mv "$OUT.part" "$OUT"
echo "golang-k8s-apiextensions-apiserver-dev $version ($SUITE)" >"$DIR/.built"
log "built $OUT in $(( $(date +%s) - start ))s"
