#!/usr/bin/env bash
# Builds the spendgate image with podman/buildah, without Docker or an image registry:
#   1. a base image made from Debian packages with mmdebstrap (python3 + venv, the suite this
#      machine runs), imported into podman's storage as $BASE_IMAGE (built once per machine);
#   2. the project's Dockerfile on that base (--build-arg PYTHON_IMAGE), tagged $IMAGE.
# The Dockerfile's default base stays the official Python image; `docker build .` still works
# where a registry is reachable.
# Podman settings for this host live in $SPENDGATE_E2E_CACHE/containers.conf (runc, since crun
# fails on its cgroups; explicit default ulimits, since the host's cannot be inherited); they
# apply only to commands run with CONTAINERS_CONF pointing there (this script, the image test).
#   IMAGE       tag to build (default localhost/spendgate:dev)
#   --base-only build only the base image
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${SPENDGATE_E2E_CACHE:-/var/cache/spendgate-e2e}"
SUITE="${IMAGE_BASE_SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}"
MIRROR="${IMAGE_BASE_MIRROR:-http://deb.debian.org/debian}"
BASE_IMAGE="${BASE_IMAGE:-localhost/spendgate-python-base:$SUITE}"
IMAGE="${IMAGE:-localhost/spendgate:dev}"
export CONTAINERS_CONF="$CACHE/containers.conf"

log() { echo "build-image: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root (podman storage, mmdebstrap)"; exit 1; }

need=()
for tool in podman buildah mmdebstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

mkdir -p "$CACHE"
cat >"$CONTAINERS_CONF.part" <<'CONF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
mv "$CONTAINERS_CONF.part" "$CONTAINERS_CONF"

start=$(date +%s)
if ! podman image exists "$BASE_IMAGE"; then
  log "making $BASE_IMAGE from Debian $SUITE with mmdebstrap"
  tarball="$CACHE/python-base-$SUITE.tar"  # mmdebstrap picks the format by the extension
  rm -rf "$tarball" "$tarball.tmp.tar"
  mmdebstrap --variant=minbase --mode=root \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$tarball.tmp.tar" "$MIRROR" >"$CACHE/python-base-$SUITE.log" 2>&1 || {
    tail -n 20 "$CACHE/python-base-$SUITE.log" >&2; log "mmdebstrap failed"; exit 1
  }
  mv "$tarball.tmp.tar" "$tarball"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
  rm -f "$tarball"
  log "base image $BASE_IMAGE in $(( $(date +%s) - start ))s"
fi
[ "${1:-}" = "--base-only" ] && exit 0

# pip inside the build trusts what pip on this machine trusts (a TLS-inspecting proxy's CA, a
# package index in /etc/pip.conf): both are mounted for the RUN steps only, never stored.
mounts=()
ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
[ -f "$ca" ] && mounts+=(--volume "$(readlink -f "$ca"):/etc/ssl/certs/ca-certificates.crt:ro")
[ -f /etc/pip.conf ] && mounts+=(--volume /etc/pip.conf:/etc/pip.conf:ro)
digest="$(python3 scripts/e2e/source_digest.py)"
label=dev.spendgate.source-digest
if [ "$(podman image inspect --format "{{ index .Labels \"$label\" }}" "$IMAGE" 2>/dev/null)" = "$digest" ]; then
  log "cached: $IMAGE is built from this checkout"
  exit 0
fi
log "building $IMAGE on $BASE_IMAGE"
buildah bud --quiet --isolation chroot --layers "${mounts[@]}" --label "$label=$digest" \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -t "$IMAGE" . >"$CACHE/image-build.log" 2>&1 || {
  tail -n 30 "$CACHE/image-build.log" >&2; log "build failed; log: $CACHE/image-build.log"; exit 1
}
log "built $IMAGE in $(( $(date +%s) - start ))s"
