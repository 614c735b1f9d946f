#!/usr/bin/env bash
# The GPU suite in one command (benchmarks/gpu/suite.py; README.md beside this file).
#
#   bash benchmarks/gpu/run.sh OUT [--smoke] [suite options]     (--smoke before OUT works too)
#
# On a CUDA machine it installs the wheels of .whl/ (made here by benchmarks/gpu/wheels.sh and
# carried to the device machine) into /tmp/site, then runs every section within 6 minutes and
# writes OUT/results.json, OUT/results.md, OUT/tiles.json and OUT/suite.log. With --smoke it
# runs the same code on tiny inputs on the CPU (the project's .venv has every package).
set -uo pipefail

out=
args=()
smoke=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --smoke) smoke=1; args+=("$arg") ;;
        -*) args+=("$arg") ;;
        *) if [ -z "$out" ] && [ "${prev:-}" != --sections ] && [ "${prev:-}" != --total-s ] \
                && [ "${prev:-}" != --inject-fault ]; then out=$arg; else args+=("$arg"); fi ;;
    esac
    prev=$arg
done
if [ -z "$out" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 1
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if [ $smoke = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    # a wheel that does not install is reported, not fatal: the suite runs without it
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "!!! run.sh: installing .whl/*.whl FAILED; the suite runs without those wheels" >&2
    fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
# the log grows under a temporary name and takes its own at the end, as every file under OUT
"$py" benchmarks/gpu/suite.py "$out" "${args[@]}" 2>&1 | tee "$out/.suite.log.part"
status=${PIPESTATUS[0]}
mv "$out/.suite.log.part" "$out/suite.log"
exit "$status"
