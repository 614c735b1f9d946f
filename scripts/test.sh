#!/usr/bin/env bash
# The README's second command: set up (once) and run the test suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/label_studio.sh"   # the annotation server the review tests start (own venv, once)
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
