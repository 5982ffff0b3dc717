#!/bin/sh
# Installs the real Anthropic SDKs that the gateway tests drive (tests/api/gateway_sdk.rs):
# the Python `anthropic` package at 0.64.0 and at 2.14.0 (the newest 2.x when pinned), each
# in its own venv under tests/sdk/.venv/, and the TypeScript `@anthropic-ai/sdk` 1.x from
# tests/sdk/js/package-lock.json into tests/sdk/js/node_modules/. Both folders are
# git-ignored. A stamp per folder makes a second run a no-op.
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

for version in 0.64.0 2.14.0; do
    venv=".venv/anthropic-$version"
    want="anthropic==$version"
    if [ -f "$venv/.charter-stamp" ] && [ "$(cat "$venv/.charter-stamp")" = "$want" ]; then
        continue
    fi
    echo "sdk setup: $want into tests/sdk/$venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$want"
    echo "$want" > "$venv/.charter-stamp"
done

cd js
if [ -f node_modules/.charter-stamp ] && cmp -s package-lock.json node_modules/.charter-stamp; then
    exit 0
fi
echo "sdk setup: npm ci in tests/sdk/js"
npm ci --no-audit --no-fund --loglevel=error
cp package-lock.json node_modules/.charter-stamp
