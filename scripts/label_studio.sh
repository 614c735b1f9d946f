#!/usr/bin/env bash
# Installs the Label Studio annotation server (once) into its own virtual environment, .ls-venv,
# apart from the project's .venv: its pins (Django, numpy<2.3 through opencv, ...) would fight
# the project's. The project itself only talks to it over HTTP through label-studio-sdk, which
# is in .venv. The tests start it from here (tests/label_studio_server.py); a user can too:
#   .ls-venv/bin/label-studio start --no-browser --port 8080
# Safe to re-run: does nothing when the pinned version is there. About 1 GB, 1-2 minutes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${LABEL_STUDIO_VERSION:-1.23.2}
venv=${CIAE_LS_VENV:-$root/.ls-venv}
py=${PYTHON:-python3}
if [ -x "$venv/bin/label-studio" ] && "$venv/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('label-studio') != '$version')" 2>/dev/null; then
  exit 0
fi
echo "[label_studio] installing label-studio==$version into $venv" >&2
pip_install() {  # pip, without this machine's notes about absent local indexes
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
"$py" -m venv "$venv"
pip_install --upgrade pip
pip_install "label-studio==$version"
# (not `label-studio --version`: that migrates a database in ~/.local/share and asks PyPI for news)
"$venv/bin/python" -c "import label_studio, label_studio_sdk"
