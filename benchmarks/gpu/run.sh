#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu/suite.py; README.md beside this file).
#
#   bash benchmarks/gpu/run.sh OUT [--smoke] [suite options]
#
# On a CUDA machine it installs the wheels of .whl/ (made here by benchmarks/gpu/wheels.sh and
# carried to the device machine) into /tmp/site, then runs every section within 8 minutes and
# writes OUT/results.json, OUT/results.md, OUT/tiles.json and OUT/suite.log. With --smoke it
# runs the same code on tiny inputs on the CPU (the project's .venv has every package).
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ]    # status 0 for --help, 1 without arguments
    exit
fi
out=$1
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
smoke=0
for arg in "$@"; do
    [ "$arg" = --smoke ] && smoke=1
done
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if [ $smoke = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
"$py" benchmarks/gpu/suite.py "$out" "$@" 2>&1 | tee "$out/suite.log"
