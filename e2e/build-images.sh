#!/usr/bin/env bash
# Builds the two images, Dockerfile.operator and Dockerfile.runtime, with podman, on a
# Debian base made here with mmdebstrap: no container registry is needed, only Debian's
# package mirror (for the base) and PyPI (for the images' pip installs).
#
# The base (bookworm minbase with python3, python3-venv and ca-certificates, plus the host's
# own extra CA certificates so that a TLS-inspecting proxy the host trusts works inside
# the build) is made once into ~/.cache/kubeonnx/images/base-<key>.tar, the key being a
# hash of everything that goes into it, and imported as localhost/kubeonnx-base:<key>.
# Podman keeps its images and build layers under ~/.cache/kubeonnx/podman, so a second
# build of unchanged sources is taken from the layer cache.
#
# Prints "BASE_IMAGE=...", "OPERATOR_IMAGE=...", "RUNTIME_IMAGE=..." and "PODMAN=..." (the
# podman command line with this storage) on stdout; the builds' output goes to stderr.
# Needs root (mmdebstrap's root mode and podman's rootful storage); podman and mmdebstrap
# are Debian packages (`apt-get install podman mmdebstrap`).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${KUBEONNX_CACHE:-$HOME/.cache/kubeonnx}
tag=${KUBEONNX_IMAGE_TAG:-dev}
log() { printf '[build-images] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "run as root (mmdebstrap and podman's storage under $cache need it)"; exit 3; }
for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || { log "$tool is not installed: apt-get install podman mmdebstrap"; exit 3; }
done

# Podman's state outside the storage (locks, mounts) goes under /run, one directory per
# storage: podman refuses a storage later opened with another run root or tmpdir.
runroot="/run/kubeonnx-podman-$(printf '%s' "$cache" | sha256sum | cut -c1-12)"
podman=(podman --root "$cache/podman/storage" --runroot "$runroot" --tmpdir "$runroot/libpod")

# Everything the base is made of; its hash names the tarball and the image.
suite=bookworm
packages=python3,python3-venv,ca-certificates
mirrors=("deb http://deb.debian.org/debian $suite main"
         "deb http://deb.debian.org/debian $suite-updates main"
         "deb http://deb.debian.org/debian-security $suite-security main")
extra_cas=(/usr/local/share/ca-certificates/*.crt)
[ -e "${extra_cas[0]}" ] || extra_cas=()
recipe_version=1  # raise when the way the base is made changes
key=$(
  {
    printf '%s\n' "$recipe_version" "$suite" minbase "$packages" "${mirrors[@]}"
    for ca in "${extra_cas[@]}"; do printf '%s\n' "$(basename "$ca")"; cat "$ca"; done
  } | sha256sum | cut -c1-16
)
base_tar="$cache/images/base-$key.tar"
base_image="localhost/kubeonnx-base:$key"

make_base() {
  [ -s "$base_tar" ] && { log "base $key: cached ($base_tar)"; return; }
  log "base $key: mmdebstrap $suite minbase with $packages (about 2 minutes)"
  mkdir -p "$cache/images"
  local cas; cas=$(mktemp -d); trap "rm -rf '$cas'; trap - RETURN" RETURN
  [ ${#extra_cas[@]} -eq 0 ] || cp "${extra_cas[@]}" "$cas/"
  # Written under a temporary name and moved into place when complete, so that an
  # interrupted run never leaves a tarball that looks cached.
  mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="cp $cas/*.crt \"\$1/usr/local/share/ca-certificates/\" 2>/dev/null || true" \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    --format=tar "$suite" "$base_tar.$$.part" "${mirrors[@]}" >&2 \
    || { rm -f "$base_tar.$$.part"; log "mmdebstrap failed"; exit 1; }
  mv "$base_tar.$$.part" "$base_tar"
}

import_base() {
  "${podman[@]}" image exists "$base_image" && return
  log "base $key: podman import"
  "${podman[@]}" import --change 'CMD ["/bin/bash"]' "$base_tar" "$base_image" >/dev/null
}

build() {
  local dockerfile=$1 image=$2
  log "$dockerfile: podman build -t $image"
  # --isolation=chroot: no user namespace or network set-up, which this kind of machine lacks;
  # the RUN steps share the host's network (PyPI). --format docker: in podman's default OCI
  # format, Dockerfile.runtime's SHELL (bash, pipefail) would be ignored, as docker never does.
  "${podman[@]}" build --isolation=chroot --format docker --layers --build-arg "BASE=$base_image" \
    -f "$repo/$dockerfile" -t "$image" "$repo" >&2
}

make_base
import_base
build Dockerfile.operator "localhost/kubeonnx-operator:$tag"
build Dockerfile.runtime "localhost/kubeonnx-runtime:$tag"
# The images these builds replaced are dangling now; the layers of the current ones stay cached.
"${podman[@]}" image prune -f >/dev/null
echo "BASE_IMAGE=$base_image"
echo "OPERATOR_IMAGE=localhost/kubeonnx-operator:$tag"
echo "RUNTIME_IMAGE=localhost/kubeonnx-runtime:$tag"
echo "PODMAN=${podman[*]}"
