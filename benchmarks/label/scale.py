"""Labeling at scale: the driver's peak memory and the plan, scan, labeling and end-of-job times of
`ciae label` on a folder of N images, then of a re-run that finds everything done (the resume
scan), for N = 10k, 100k and 1M by default. Goal: flat driver memory, resume scan <= 10 s at 1M.

The folder holds N hard links to one small JPEG (N names cost directory entries, not disk), and
the model stage is replaced by ``TrivialLabeler`` (one segment covering the image), so that what
is measured is the driver and the data path around the model, not the model. Each N runs in a
fresh process, its peak RSS read from ``getrusage``. Nothing is asserted.

    python benchmarks/label/scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LINKS_PER_FILE = 50_000


class TrivialLabeler:
    """The model stage's contract without a model: one stuff segment covering each image."""

    def __init__(self, checkpoint, name, threads, amp, compile, batch_size=None):
        from ciae import checkpoint as ckpt_io
        if not isinstance(checkpoint, bytes):      # its reference in Ray's object store
            import ray

            checkpoint = ray.get(checkpoint)
        del threads, amp, compile, batch_size
        self.category = int(ckpt_io.load(checkpoint, name)["stuff_ids"][0])

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        n = len(batch["key"])
        ids, segments = [np.zeros((0, 0), np.int32)] * n, np.empty(n, dtype=object)
        for k in range(n):
            segments[k] = []
            if batch["status"][k] == "ok":
                h, w = int(batch["height"][k]), int(batch["width"][k])
                ids[k] = np.ones((h, w), np.int32)
                segments[k] = [{"id": 1, "category_id": self.category, "iscrowd": 0, "area": h * w,
                                "bbox": [0, 0, w, h], "score": 1.0}]
        out = {k: v for k, v in batch.items() if k != "image"}
        return out | {"ids": ids, "segments": segments, "quality": np.ones(n, np.float32)}


def one_size(n: int, root: str) -> dict:
    """Label a folder of n images twice (the second run resumes); in this process."""
    from PIL import Image

    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    folder = os.path.join(root, "images")
    os.makedirs(folder)
    t = time.perf_counter()
    for k in range(n):
        if k % LINKS_PER_FILE == 0:      # a file system allows so many links to one file
            source = os.path.join(root, f"source-{k // LINKS_PER_FILE}.jpg")
            Image.new("RGB", (48, 32), (90, 120, 150)).save(source)
        os.link(source, os.path.join(folder, f"{k:08d}.jpg"))
    made = time.perf_counter() - t
    job = LabelJob(model=os.environ["CIAE_BENCH_MODEL"], input=folder, out=os.path.join(root, "out"),
                   tracking_uri=os.environ["CIAE_BENCH_TRACKING"], batch_size=64, review=100)
    first = label(job, progress=False, labeler=TrivialLabeler)
    again = label(job, progress=False, labeler=TrivialLabeler)
    return {"images": n, "links_s": made, "first": first["timings"], "labeled": first["labeled"],
            "images_per_s": first["images_per_second"], "resume": again["timings"],
            "processed_again": again["processed"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                   help="image counts (default 10000 100000 1000000)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)     # a child process's size
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.root)))
        return 0

    import torch

    from ciae import checkpoint
    from ciae.config import Config
    from ciae.engine.train import Trainer
    from ciae.modeling.model import CIAEModel
    from pipeline.data.storage import write_uri
    from pipeline.data.synth import select_categories
    from workflows.tracking.registry import register_checkpoint

    work = tempfile.mkdtemp(prefix="ciae-bench-scale-")
    cats = select_categories()
    torch.manual_seed(0)
    ckpt = os.path.join(work, "model.pt")
    write_uri(ckpt, checkpoint.to_bytes(Trainer(CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)).checkpoint()))
    tracking = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "CIAE_BENCH_TRACKING": tracking,
           "CIAE_BENCH_MODEL": register_checkpoint(ckpt, tracking_uri=tracking, model_name="ciae-scale"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rows = []
    for n in args.sizes:
        root = tempfile.mkdtemp(prefix=f"n{n}-", dir=work)
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--root", root], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        subprocess.run(["rm", "-rf", root])
    print(f"\n{os.cpu_count()} CPUs; trivial model stage; a folder of N hard links to one 48x32 JPEG\n")
    print("| images | driver peak RSS MB | plan s | labeling s | img/s | end of job s | resume: scan s | "
          "resume: end of job s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, a = r["first"], r["resume"]
        print(f"| {r['images']} | {r['peak_rss_mb']:.0f} | {f['plan']:.1f} | {f['label']:.1f} | "
              f"{r['images_per_s']:.0f} | {f['exports']:.1f} | {a['plan'] + a['scan']:.2f} | {a['exports']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
