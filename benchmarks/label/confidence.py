"""Do the labeling job's confidence scores point at the bad labels? Labels a held-out synthetic
split with ground truth (the demo's: 48 images at 192 px, seed 1000) using a registered model,
then reports the rank correlation (Spearman) between each image's ``quality`` and its own PQ,
and the mean PQ of the least and most confident quarters. A useful review list has a clearly
positive correlation: the images it lists first are the worse ones.

    python benchmarks/label/confidence.py --model models:/ciae-demo/1 \\
        --tracking-uri sqlite:///runs/demo/mlruns/mlflow.db
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model URI")
    p.add_argument("--tracking-uri", required=True, help="its MLflow tracking URI")
    p.add_argument("--images", type=int, default=48, help="held-out images (default 48)")
    p.add_argument("--seed", type=int, default=1000, help="synthetic seed (default 1000, the demo's)")
    p.add_argument("--size", type=int, default=192, help="image size (default 192)")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    args = p.parse_args(argv)

    from pipeline.data.synth import SynthSpec, write_dataset
    from pipeline.label.store import LabelStore
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    root = args.workdir or tempfile.mkdtemp(prefix="ciae-bench-confidence-")
    data = os.path.join(root, "val")
    write_dataset(data, args.images, seed=args.seed, spec=SynthSpec(height=args.size, width=args.size))
    s = label(LabelJob(model=args.model, input=os.path.join(data, "images"), out=os.path.join(root, "labels"),
                       tracking_uri=args.tracking_uri, gt_json=os.path.join(data, "panoptic.json"),
                       gt_dir=os.path.join(data, "panoptic"), cpus_per_worker=0.5), progress=False)
    rows = [r for r in LabelStore(os.path.join(root, "labels")).rows(["status", "quality", "pq"])
            if r["status"] == "labeled"]
    quality = np.array([r["quality"] for r in rows])
    pq = np.array([r["pq"] for r in rows])
    order = np.argsort(quality, kind="stable")
    quarter = max(1, len(rows) // 4)
    print(f"\n{len(rows)} held-out images, PQ {100 * s['metrics']['All']['pq']:.1f} over the set\n")
    print("| figure | value |\n|---|---:|")
    print(f"| Spearman rank correlation, image quality vs image PQ | {spearman(quality, pq):.3f} |")
    print(f"| Pearson correlation | {float(np.corrcoef(quality, pq)[0, 1]):.3f} |")
    print(f"| mean image PQ, least confident quarter ({quarter} images) | {pq[order[:quarter]].mean():.3f} |")
    print(f"| mean image PQ, most confident quarter | {pq[order[-quarter:]].mean():.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
