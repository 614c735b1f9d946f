#!/usr/bin/env bash
# The README's first command: set up (once) and run the pipeline end to end on synthetic data.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/ciae" demo "$@"
