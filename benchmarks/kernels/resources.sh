#!/usr/bin/env bash
# Run benchmarks/kernels/resources.py (registers and spills of every Triton kernel, compiled ahead
# of time for sm_90, no GPU needed) with the GPU machine's Triton rather than the venv's.
set -euo pipefail

# The Triton of the GPU machine's image (its python3 holds torch 2.11 and triton 3.6.0; see
# /work/.library/device/KINDS.md, the 'pip list' row). The launch tables are for that compiler.
TRITON_VERSION=3.6.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="${RESOURCES_CACHE:-$ROOT/.cache}"          # /.cache/ is git-ignored
TARGET="$CACHE/triton-$TRITON_VERSION"

usage() {
    cat <<EOF
usage: bash benchmarks/kernels/resources.sh [resources.py options]

Installs triton==$TRITON_VERSION (the GPU machine's) once, without dependencies, into
$TARGET
with the venv's pip, then runs
  PYTHONPATH=$TARGET $PYTHON benchmarks/kernels/resources.py [options]
so that 'import triton' there is $TRITON_VERSION; the table's header names the version used.
Environment: PYTHON (default .venv/bin/python), RESOURCES_CACHE (default .cache in the repo).

resources.py options:
EOF
    "$PYTHON" "$ROOT/benchmarks/kernels/resources.py" --help | sed '1,/^options:/d'
}

for arg in "$@"; do
    case "$arg" in -h|--help) usage; exit 0 ;; esac
done

if [[ ! -d "$TARGET/triton-$TRITON_VERSION.dist-info" ]]; then
    echo "resources.sh: installing triton==$TRITON_VERSION into $TARGET" >&2
    mkdir -p "$CACHE"
    tmp="$(mktemp -d "$CACHE/.triton-$TRITON_VERSION.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$tmp" "triton==$TRITON_VERSION"
    rm -rf "$TARGET"
    mv "$tmp" "$TARGET"
    trap - EXIT
fi

PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" \
    "$ROOT/benchmarks/kernels/resources.py" "$@"
