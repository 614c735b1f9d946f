#!/usr/bin/env bash
# Ray for the GPU machine: Ray, MLflow's client and everything else the real jobs (`ciae
# prepare`, `ciae train`, `ciae label`) import there that its image lacks, as one compressed
# tree small enough to travel with the working tree (64 MiB a call).
#
#   bash benchmarks/gpu/ray_tree.sh [--python-version 3.12]    # -> .raytree/cp312/site.tar.xz
#   bash benchmarks/gpu/ray_tree.sh --check-clean [OUT]         # the tree for this machine's
#       python3, then benchmarks/gpu/jobs.sh OUT --smoke in a new venv holding only torch (CPU)
#       and packages the GPU image has (default OUT /tmp/ciae-clean-jobs)
#
# Wheels pinned by constraints.txt are downloaded for CPython X.Y on manylinux x86-64 into
# .raytree/wheels/cpXY, unpacked, stripped (Java jars, RLlib, Serve, LLM, the dashboard's web
# client, tests, symbol tables of the compiled files: raylet, gcs_server and _raylet.so stay)
# and packed as .raytree/cpXY/site.tar.xz with tree.json (what is inside) and contents.txt
# beside it. The device call carries .raytree/cp312; benchmarks/gpu/jobs.sh unpacks it.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
pyver=3.12
check=0
out=/tmp/ciae-clean-jobs
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --python-version) pyver=$2; shift ;;
        --check-clean) check=1
            if [ $# -gt 1 ] && [ "${2#-}" = "$2" ]; then out=$2; shift; fi ;;
        *) echo "ray_tree.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
[ $check = 1 ] && pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tag=cp${pyver/./}
command -v strip >/dev/null || { echo "ray_tree.sh: needs strip (binutils)" >&2; exit 2; }

# What the jobs import on the device and its image lacks (a name per line: why).
TREE="
ray                                 the jobs' runtime (Core, Data, Train)
jsonschema                          Ray Core
jsonschema-specifications           jsonschema
referencing                         jsonschema
rpds-py                             referencing
pydantic                            Ray Train (ray.train, ray.tune)
pydantic-core                       pydantic
annotated-types                     pydantic
typing-inspection                   pydantic
tensorboardX                        ray.tune, imported by ray.train
mlflow-skinny                       tracking and the registry (training's run, metrics, checkpoint)
mlflow-tracing                      mlflow-skinny
fastapi                             mlflow (imported through mlflow.gateway)
starlette                           fastapi
databricks-sdk                      mlflow (its probe for databricks.agents fails without the package)
opentelemetry-api                   mlflow (tracing, imported with mlflow)
opentelemetry-sdk                   mlflow
opentelemetry-proto                 mlflow
opentelemetry-semantic-conventions  opentelemetry-sdk
importlib-metadata                  opentelemetry-api
cachetools                          mlflow
sqlparse                            mlflow (search filters)
python-dotenv                       mlflow
sqlalchemy                          the sqlite tracking store (the default, sqlite:///mlruns/mlflow.db)
alembic                             the sqlite store's schema
mako                                alembic
cryptography                        the sqlite store (registry tables)
cffi                                cryptography
pycparser                           cffi
pycocotools                         labeling's RLE masks (workflows.jobs.label.encode)
pyspng                              pipeline.data.panoptic_png
zlib-ng                             pipeline.data.panoptic_png
"
# Declared by a package above but not imported by the jobs (the clean check shows it): the
# tracking server (uvicorn), git lineage tags (gitpython; MLflow skips them without it),
# Databricks authentication (google-auth, for databricks.sdk, which nothing imports).
NOT_NEEDED="uvicorn gitpython google-auth"
# The GPU image's Python packages (KINDS.md of the device tool, read 2026-11-17).
ON_DEVICE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
# Of those, what a clean venv gets for the check: what Ray, MLflow and the project import.
CLEAN="numpy pandas pyarrow pillow fsspec click msgpack protobuf pyyaml requests aiohttp grpcio
psutil filelock tqdm packaging attrs typing-extensions cloudpickle anyio zipp jinja2 markupsafe
prometheus-client six python-dateutil certifi idna urllib3 charset-normalizer annotated-doc"
# Removed from the unpacked tree (paths relative to it; tests and __pycache__ everywhere).
REMOVE="ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client"

wheels=.raytree/wheels/$tag
dest=.raytree/$tag
stage=.raytree/build-$tag
names=$(echo "$TREE" | awk 'NF {print $1}')
specs=$(python3 - "$names" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for line in open("constraints.txt"):
    m = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
    if m:
        pins[norm(m[1])] = m[2]
missing = [n for n in sys.argv[1].split() if norm(n) not in pins]
if missing:
    sys.exit(f"ray_tree.sh: not pinned in constraints.txt: {missing}")
print(" ".join(f"{n}=={pins[norm(n)]}" for n in sys.argv[1].split()))
PY
)
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
tagargs="--only-binary=:all: --python-version $pyver --implementation cp $platforms"
echo "== downloading for CPython $pyver into $wheels"
mkdir -p "$wheels"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps $tagargs -d "$wheels" $specs
# one wheel per package: an older download of another version goes
python3 - "$wheels" "$specs" <<'PY'
import os, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = {norm(s.split("==")[0]): s.split("==")[1] for s in sys.argv[2].split()}
for f in os.listdir(sys.argv[1]):
    name, version = f.split("-")[:2]
    if want.get(norm(name)) != version:
        os.remove(os.path.join(sys.argv[1], f))
PY

echo "== checking that every requirement is on the device, in the tree or not needed"
python3 - "$wheels" "$ON_DEVICE $names" "$NOT_NEEDED" "$pyver" <<'PY'
import re, sys, zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have, skip = {norm(n) for n in sys.argv[2].split()}, {norm(n) for n in sys.argv[3].split()}
env = {"python_version": sys.argv[4], "python_full_version": sys.argv[4] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
missing = {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            name = norm(req.name)
            if (req.marker is None or req.marker.evaluate(env)) and name not in have | skip:
                missing.setdefault(name, []).append(w.name.split("-")[0])
if missing:
    sys.exit(f"ray_tree.sh: required, not on the device and not in the tree: {missing}")
PY

echo "== unpacking and stripping"
rm -rf "$stage"
mkdir -p "$stage"
# shellcheck disable=SC2086
python3 -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile $tagargs --target "$stage/site" "$wheels"/*.whl
rm -rf "$stage/site/bin"
for p in $REMOVE; do rm -rf "${stage:?}/site/$p"; done
find "$stage/site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find "$stage/site" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0 |
    while IFS= read -r -d '' f; do
        if [ "$(head -c 4 "$f")" = $'\x7fELF' ]; then strip --strip-unneeded "$f"; fi
    done
for f in ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server; do
    [ -s "$stage/site/$f" ] || { echo "ray_tree.sh: $f is missing from the tree" >&2; exit 1; }
done
python3 - "$stage/site" "$pyver" "$specs" "$REMOVE" <<'PY'
import datetime, json, sys
site, pyver, specs, removed = sys.argv[1:]
doc = {"python": pyver, "platform": "manylinux x86_64",
       "packages": dict(s.split("==") for s in specs.split()),
       "removed": removed.split() + ["*/tests", "*/__pycache__", "ELF symbol tables (strip --strip-unneeded)"],
       "made": datetime.date.today().isoformat()}
json.dump(doc, open(f"{site}/tree.json", "w"), indent=1)
PY

echo "== packing"
rm -rf "$dest"
mkdir -p "$dest"
tar -C "$stage/site" -cf - . | xz -T0 -6 > "$dest/site.tar.xz.tmp"
mv "$dest/site.tar.xz.tmp" "$dest/site.tar.xz"
python3 - "$stage/site" "$dest" <<'PY' | tee "$dest/contents.txt"
import os, sys
site, dest = sys.argv[1:]
sizes = {}
for d, _, files in os.walk(site):
    rel = os.path.relpath(d, site).split(os.sep)
    for f in files:
        size = os.path.getsize(os.path.join(d, f))
        if rel[0] == ".":                       # modules at the top
            key = f
        elif rel[0] == "ray":                   # Ray by subpackage, its big files by name
            key = "/".join(rel[:2]) if len(rel) > 1 else ("ray/" + f if size > 2**20 else "ray/*.py")
        else:
            key = rel[0]
        sizes[key] = sizes.get(key, 0) + size
total = sum(sizes.values())
print(f"unpacked {total / 2**20:.1f} MiB; packed {os.path.getsize(dest + '/site.tar.xz') / 2**20:.1f} MiB")
for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]):
    if not k.endswith(".dist-info"):
        print(f"{v / 2**20:8.2f} MiB  {k}")
PY
rm -rf "$stage"

# what a device call sends: tracked and untracked-not-ignored files, shared/, and the tree
travel=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
[ -d shared ] && travel=$((travel + $(du -sb shared | cut -f1)))
packed=$(du -sb "$dest" | cut -f1)
echo "== working tree $((travel / 1024)) KiB + $dest $((packed / 1024)) KiB = $(((travel + packed) / 1048576)) MiB of 64"
if [ $((travel + packed)) -gt $((64 * 1048576)) ]; then
    echo "ray_tree.sh: over the 64 MiB a device call carries" >&2
    exit 1
fi

[ $check = 1 ] || exit 0
echo "== a clean venv: torch 2.13.0 (CPU) and packages of the GPU image, nothing else"
venv=.raytree/cleanpy
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --root-user-action=ignore -c constraints.txt torch==2.13.0 $CLEAN
"$venv/bin/python" -I - "$ON_DEVICE" <<'PY'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
extra = sorted({norm(d.metadata["Name"]) for d in md.distributions()} - {norm(n) for n in sys.argv[1].split()})
if extra:
    sys.exit(f"ray_tree.sh: the clean venv holds packages the GPU image lacks: {extra}")
PY
bash benchmarks/gpu/jobs.sh "$out" --smoke --python "$venv/bin/python" --tree "$dest/site.tar.xz"
