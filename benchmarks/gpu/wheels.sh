#!/usr/bin/env bash
# Download, here, the wheels that the GPU suite needs on the device machine and that its image
# lacks, into .whl/ (ignored by git; the device call carries it): pyspng and zlib-ng, which
# pipeline/data/panoptic_png.py imports. The device runs CPython 3.12 on x86-64 with torch, triton,
# numpy, pillow, pyarrow, pandas, fsspec and tqdm already there; a requirement of a wheel that
# is neither there nor downloaded here is an error.
#
#   bash benchmarks/gpu/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(pyspng==0.1.4 zlib-ng==1.1.0)
ON_DEVICE="numpy pillow pyarrow pandas fsspec tqdm torch triton"

rm -rf .whl
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$spec"
done
# every Requires-Dist of the wheels (extras skipped) must be on the device or in .whl/
python3 - "$ON_DEVICE" <<'PY'
import re, sys, zipfile
from pathlib import Path

have = {n.lower() for n in sys.argv[1].split()}
wheels = sorted(Path(".whl").glob("*.whl"))
have |= {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
missing = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0].lower()
                print(f"{w.name}: requires {name}")
                if name.replace("_", "-") not in have:
                    missing.add(name)
if missing:
    sys.exit(f"not on the device and not downloaded: {sorted(missing)}; add them to WHEELS")
PY
ls -l .whl
