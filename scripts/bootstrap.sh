#!/usr/bin/env bash
# Creates the virtual environment (once) and installs the project into it. Safe to re-run.
# A machine whose python already has torch (a GPU machine with its CUDA build) keeps it;
# elsewhere the CPU build torch==2.13.0 is installed first, so nothing pulls CUDA packages.
# Every other dependency is installed at the version in constraints.txt, the set CI tested
# (refresh it with scripts/lock.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CIAE_VENV:-$root/.venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" 2>/dev/null; then
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
stamp="$venv/.ciae-installed"
pip_install() {  # pip, without this machine's notes about absent local indexes
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  echo "[bootstrap] installing ciae-panoptic into $venv (first run takes a few minutes)" >&2
  pip_install --upgrade pip
  "$venv/bin/python" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
  pip_install -c "$root/constraints.txt" -e "$root[test]"
  pip_install --no-deps "panopticapi-lite==0.2.0"
  touch "$stamp"
fi
# The project's bytecode, as pip writes it for installed packages (an editable install does
# not): every Ray worker process imports these modules and would otherwise compile them anew
# wherever PYTHONDONTWRITEBYTECODE is set. Incremental: only changed files are compiled.
"$venv/bin/python" -m compileall -q -j 0 "$root/ciae" "$root/kernels" "$root/pipeline" "$root/workflows"
