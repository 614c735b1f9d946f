#!/usr/bin/env bash
# The real jobs on the GPU machine: ciae prepare, ciae train --workers 1 --gpus-per-worker 1 (the
# paper's R50-FPN at shorter side 800) and ciae label with one GPU actor on synthetic JPEGs, without
# and with --compile (benchmarks/gpu/jobs.py; README.md beside this file), with Ray and MLflow from
# the tree that benchmarks/gpu/ray_tree.sh packed.
#
#   bash benchmarks/gpu/jobs.sh OUT --tree .raytree/cp312/site.tar.xz    # on the GPU machine
#   bash benchmarks/gpu/jobs.sh OUT --smoke                              # here, in .venv
#
# --tree ARCHIVE   unpack it into /tmp/ciae-raytree and put it on PYTHONPATH (its Python version
#                  must be the interpreter's)
# --python PY      the interpreter (default .venv/bin/python when there is one, else python3)
# Other options go to jobs.py: --smoke, --budget-s S (default 420), --train-steps N,
# --label-images N, --work DIR, --address A (a running Ray for the commands: the tests' own).
# Output: OUT/jobs.json, jobs.md, commands.log, gpu.csv, jobs.log.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    [ $# -ge 1 ]    # status 0 for --help, 1 without arguments
    exit
fi
out=$1
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
tree=
rest=()
while [ $# -gt 0 ]; do
    case $1 in
        --tree) tree=$2; shift ;;
        --python) py=$2; shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$tree" ]; then
    [ -f "$tree" ] || { echo "jobs.sh: no tree at $tree (make it with benchmarks/gpu/ray_tree.sh)" >&2; exit 2; }
    site=/tmp/ciae-raytree
    rm -rf "$site"
    mkdir -p "$site"
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$tree" "$site"
    "$py" - "$site" <<'PY' || exit 2
import json, sys
want = json.load(open(f"{sys.argv[1]}/tree.json"))["python"]
have = "%d.%d" % sys.version_info[:2]
if want != have:
    sys.exit(f"jobs.sh: the tree is for Python {want}, this interpreter is {have}; "
             f"make one with benchmarks/gpu/ray_tree.sh --python-version {have}")
PY
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} CIAE_RAY_TREE=$site
fi
# found, not imported (importing MLflow alone takes 1-2 s; the jobs import both soon enough)
"$py" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("ray") and u.find_spec("mlflow")))' 2>/dev/null ||
    { echo "jobs.sh: $py cannot import Ray and MLflow; pass --tree (made by benchmarks/gpu/ray_tree.sh)" >&2; exit 2; }
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cd "$root"
# bytecode once, on every core, rather than in each Ray worker (and every time where
# PYTHONDONTWRITEBYTECODE is set)
"$py" -m compileall -q -j 0 ciae kernels pipeline workflows ${tree:+"$site"} >/dev/null
"$py" benchmarks/gpu/jobs.py "$out" "${rest[@]}" 2>&1 | tee "$out/jobs.log"
