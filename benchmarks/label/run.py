"""Batch labeling throughput: images/s of `ciae label` (the streaming Ray Data job: decode tasks,
model actors, encode tasks) against a plain single-process loop, on synthetic images.

Makes N synthetic images (JPEG), writes a checkpoint (untrained unless --checkpoint is given)
of ``Config.small()`` (default) or, with --resnet50, the paper's ResNet-50 at shorter side 800,
and registers it in a temporary sqlite MLflow. Then, on the same files:

* baseline: one process, no Ray, no MLflow: read, decode, ``ciae.engine.predictor.Predictor`` in
  batches, encode the PNG, write it; torch on all the cores (or the GPU);
* the labeling job (``workflows.jobs.label.label``) with each actor count of --workers, the actors
  sharing all cores but one (left to the decode and encode tasks) on a CPU machine, or each
  with --gpus-per-worker of a GPU.

Every run is repeated --repeats times, interleaved, and its best round reported (a shared
machine's load varies). Reported per run: wall time of the labeling stage (for the job: actor start and model load
included) and images/s end to end; for the job also the steady rate, from the first to the last
sealed task (the shards' modification times), which is what a long job sees. Timings are
printed, never asserted.

    python benchmarks/label/run.py                        # CPU: small config, 1 and 2 actors
    python benchmarks/label/run.py --resnet50 --images 512 --batch-size 8 --workers 1,2 \\
        --gpus-per-worker 0.5                             # on a GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ciae import checkpoint as ckpt_io
from ciae.config import Config
from ciae.data.transform import decode_rgb
from ciae.engine.predictor import Predictor
from ciae.engine.train import Trainer
from ciae.modeling.model import CIAEModel
from pipeline.data.panoptic_png import encode_id_png
from pipeline.data.storage import write_uri
from pipeline.data.synth import SynthSpec, coco_categories, select_categories, write_dataset
from pipeline.label.store import LAYOUT


def make_checkpoint(path: str, resnet50: bool) -> None:
    torch.manual_seed(0)
    if resnet50:
        cats = coco_categories()
        model = CIAEModel(Config(), cats.stuff_ids, cats.thing_ids)
    else:
        cats = select_categories()
        model = CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)
    write_uri(path, ckpt_io.to_bytes(Trainer(model).checkpoint()))


def load_model(path: str, device: str = "cpu") -> CIAEModel:
    return CIAEModel.from_checkpoint(ckpt_io.load(path, path), device)


def baseline(checkpoint: str, images_dir: str, out_dir: str, batch_size: int) -> float:
    """Seconds for the plain loop over every image of ``images_dir``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor(load_model(checkpoint, device), batch_size)
    names = sorted(os.listdir(images_dir))
    os.makedirs(out_dir, exist_ok=True)
    predictor([decode_rgb(open(os.path.join(images_dir, names[0]), "rb").read())])  # warm-up
    start = time.perf_counter()
    for k in range(0, len(names), batch_size):
        chunk = names[k:k + batch_size]
        images = [decode_rgb(open(os.path.join(images_dir, n), "rb").read()) for n in chunk]
        for name, pred in zip(chunk, predictor(images)):
            with open(os.path.join(out_dir, os.path.splitext(name)[0] + ".png"), "wb") as f:
                f.write(encode_id_png(pred["panoptic"]))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steady_rate(out: str) -> float | None:
    """Images/s from the first to the last sealed task: the images of every shard but the first,
    over the time between the first and the last shard (modification times)."""
    import pyarrow.parquet as pq

    folder = os.path.join(out, LAYOUT.labels)
    shards = sorted((os.stat(os.path.join(folder, n)).st_mtime, pq.read_metadata(os.path.join(folder, n)).num_rows)
                    for n in os.listdir(folder) if n.endswith(".parquet"))
    if len(shards) < 2 or shards[-1][0] <= shards[0][0]:
        return None
    return sum(n for _, n in shards[1:]) / (shards[-1][0] - shards[0][0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="synthetic images (default 96)")
    p.add_argument("--height", type=int, default=480, help="image height (default 480, COCO-like)")
    p.add_argument("--width", type=int, default=640, help="image width (default 640)")
    p.add_argument("--resnet50", action="store_true",
                   help="the paper's ResNet-50 at shorter side 800 instead of Config.small()")
    p.add_argument("--checkpoint", default=None, help="time this checkpoint instead of an untrained model")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--workers", default="1,2", help="actor counts to run, comma-separated (default 1,2)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of all runs; the best round of each run is reported (default 2)")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    args = p.parse_args(argv)

    from pipeline.cluster.ray_runtime import connect
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob
    from workflows.tracking.registry import register_checkpoint

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    root = args.workdir or tempfile.mkdtemp(prefix="ciae-bench-label-")
    data = os.path.join(root, "data")
    write_dataset(data, args.images, seed=0, spec=SynthSpec(height=args.height, width=args.width))
    images = os.path.join(data, "images")
    checkpoint = args.checkpoint or os.path.join(root, "model.pt")
    if not args.checkpoint:
        make_checkpoint(checkpoint, args.resnet50)
    tracking = f"sqlite:///{root}/mlflow.db"
    model_uri = register_checkpoint(checkpoint, tracking_uri=tracking, model_name="ciae-bench")
    cfg = load_model(checkpoint).cfg
    what = (f"{cfg.backbone.name} (width {cfg.backbone.width}), test shorter side "
            f"{cfg.input.test_shorter_side}, {args.images} images {args.width}x{args.height}, "
            f"batch {args.batch_size}, {'GPU' if torch.cuda.is_available() else f'{cores} CPU cores'}")
    print(f"[bench] {what}", flush=True)

    best: dict[str, tuple] = {}   # run -> (actors, wall s, img/s end to end, img/s steady)

    def keep(name: str, row: tuple) -> None:
        if name not in best or row[2] > best[name][2]:
            best[name] = row

    with connect():
        for r in range(args.repeats):
            seconds = baseline(checkpoint, images, os.path.join(root, f"baseline-{r}"), args.batch_size)
            rate = args.images / seconds
            keep("baseline: one process, no Ray (model loaded before timing)", ("-", seconds, rate, rate))
            print(f"[bench] round {r + 1}: baseline {rate:.2f} img/s", flush=True)
            for workers in [int(w) for w in args.workers.split(",")]:
                out = os.path.join(root, f"ray-{workers}-{r}")
                # with no GPU the actors leave one CPU to the decode and encode tasks
                cpus = 1.0 if args.gpus_per_worker else max(0.5, (cores - 1) / workers)
                s = label(LabelJob(model=model_uri, input=images, out=out, tracking_uri=tracking,
                                   workers=workers, batch_size=args.batch_size,
                                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=cpus,
                                   task_images=4 * args.batch_size), progress=False)
                name = (f"ciae label, {workers} actor(s) x {cpus:g} CPU"
                        + (f" + {args.gpus_per_worker:g} GPU" if args.gpus_per_worker else ""))
                keep(name, (str(workers), s["seconds"], s["images_per_second"], steady_rate(out)))
                print(f"[bench] round {r + 1}: {workers} actor(s) {s['images_per_second']:.2f} img/s "
                      f"end to end", flush=True)
    rows = [(name, *row) for name, row in best.items()]

    print(f"\n{what}\n")
    print("| run | actors | wall s | img/s end to end | img/s steady |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, secs, rate, steady in rows:
        print(f"| {name} | {workers} | {secs:.1f} | {rate:.2f} | {'-' if steady is None else f'{steady:.2f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
