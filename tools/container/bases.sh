#!/usr/bin/env bash
# Local stand-ins for the Dockerfile's public base images, made without a container
# registry (none is reachable in CI): debootstrap a minimal Debian bookworm and import it
# with podman, then the same plus gcc and the host's Rust toolchain for the build stage.
#
#   tools/container/bases.sh    prints two lines: BASE_IMAGE=<name> and RUST_IMAGE=<name>
#
# The images are expensive (about a minute of debootstrap each) and change only with this
# recipe and the host toolchain, so they are built once per machine and tagged with a hash
# of both; a second run finds them and returns at once. Concurrent runs (two test
# processes) serialise on a lock. Needs root, podman and debootstrap; uses the engine
# settings in CONTAINERS_CONF when set.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
sysroot="$(rustc --print sysroot)"
rust_version="$(rustc --version | awk '{print $2}')"

recipe_hash="$( { cat "$0"; rustc -vV; } | sha256sum | cut -c1-12)"
base_image="localhost/charter-base/debian:bookworm-slim-${recipe_hash}"
rust_image="localhost/charter-base/rust:${rust_version}-bookworm-${recipe_hash}"

state="${CHARTER_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/charter/container}"
mkdir -p "$state"
exec 9>"$state/bases.lock"
flock 9

log() { echo "bases: $*" >&2; }

# The apt sources of the official debian:bookworm-slim image (deb822), so stages that
# install packages see the same suites, security updates included.
write_sources() {
    rm -f "$1/etc/apt/sources.list"
    cat >"$1/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${security_mirror}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

# What the slim image leaves out: package lists, documentation, locales, logs.
slim() {
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
        "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* \
        "$1"/usr/share/locale/* "$1"/var/log/*.log "$1"/var/log/apt/* "$1"/debootstrap
}

bootstrap() { # ROOTFS [--include=...]
    local rootfs="$1"
    shift
    debootstrap --variant=minbase --cache-dir="$state/debs" "$@" bookworm "$rootfs" "$mirror" \
        >"$state/debootstrap.log" 2>&1 || {
        tail -20 "$state/debootstrap.log" >&2
        log "debootstrap failed (full log: $state/debootstrap.log)"
        return 1
    }
    write_sources "$rootfs"
}

import() { # ROOTFS IMAGE
    tar --numeric-owner -C "$1" -c . | podman import --quiet \
        --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$2" >/dev/null
}

work="$(mktemp -d "$state/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$state/debs"

if ! podman image exists "$base_image"; then
    log "building $base_image (debootstrap minbase bookworm)"
    started=$SECONDS
    bootstrap "$work/debian"
    slim "$work/debian"
    import "$work/debian" "$base_image"
    rm -rf "$work/debian"
    log "built $base_image in $((SECONDS - started)) s"
fi

if ! podman image exists "$rust_image"; then
    log "building $rust_image (debootstrap + gcc + the host's Rust ${rust_version})"
    started=$SECONDS
    bootstrap "$work/rust" --include=gcc,libc6-dev,ca-certificates,pkg-config
    slim "$work/rust"
    # rustc finds its libraries relative to its own path, so the toolchain's bin, lib,
    # libexec and etc copied under /usr/local work as they are (docs in share/ are left out).
    for part in bin lib libexec etc; do
        cp -a "$sysroot/$part/." "$work/rust/usr/local/$part/"
    done
    import "$work/rust" "$rust_image"
    rm -rf "$work/rust"
    log "built $rust_image in $((SECONDS - started)) s"
fi

echo "BASE_IMAGE=$base_image"
echo "RUST_IMAGE=$rust_image"
