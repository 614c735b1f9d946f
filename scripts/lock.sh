#!/usr/bin/env bash
# Refreshes constraints.txt: the exact versions of every dependency that CI installs and tests.
# It resolves the project's open ranges (pyproject.toml) afresh in a throw-away virtual
# environment, on the CPU build torch==2.13.0, and pins what it got. torch, triton and the CUDA
# packages are left out: a GPU machine keeps the builds it has. Then run `bash scripts/test.sh`
# on the new pins and commit constraints.txt with the results.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
venv=$(mktemp -d)/venv
"$py" -m venv "$venv"
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
quiet "$venv/bin/python" -m pip install -q --upgrade pip
quiet "$venv/bin/python" -m pip install -q "torch==2.13.0"
quiet "$venv/bin/python" -m pip install -q -e "$root[test]"
{
  echo "# The versions CI installs and tests (scripts/bootstrap.sh passes this file to pip as"
  echo "# constraints). Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$venv/bin/python" -V);"
  echo "# torch, triton and CUDA packages are not pinned here (see scripts/bootstrap.sh)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-|cuda-)'
} > "$root/constraints.txt"
rm -rf "$(dirname "$venv")"
echo "wrote $root/constraints.txt ($(grep -vc '^#' "$root/constraints.txt") pins)"
