"""Label images with a registered model: a Ray Data job on a pool of model actors.

Input (path or URI): a folder of images, a list file (one path or URI per line), or prepared
shards (a folder with manifest.json). Output, in COCO panoptic format (readable by panopticapi
and detectron2):

  OUT/panoptic/<stem>.png     one PNG per image, at the image's own size
  OUT/predictions.json        {"images", "annotations" (image_id, file_name, segments_info), "categories"}
  OUT/rejects.json            images that could not be read, with the reason
  OUT/overlays/<stem>.png     with --overlays N: pictures of the first N images
  OUT/metrics.json            with --gt-json/--gt-dir: PQ / SQ / RQ of the labeled images

Image ids: from shards, the row's image_id; from a folder or list, the ground truth's id for
that file name when --gt-json is given, else the file stem when every stem is a number
(000000000139.jpg -> 139), else 1, 2, ... in input order (a folder's sorted order).

Killed and run again with the same OUT, the job labels only the images not finished, so every
image is labeled exactly once.

example:
  ciae label --model models:/ciae@champion --input coco/val2017 --out labels/val2017 \\
             --gt-json coco/annotations/panoptic_val2017.json \\
             --gt-dir coco/annotations/panoptic_val2017 --overlays 8
  ciae label --model models:/ciae@champion --input shards/val2017 --out labels/val \\
             --address auto --workers 4 --gpus-per-worker 1 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys

HELP = "label images with a registered model (Ray Data actors), COCO panoptic output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/ciae@champion")
    p.add_argument("--input", required=True, help="folder of images, list file, or shards folder (path or URI)")
    p.add_argument("--out", required=True, help="output folder (path or URI)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--workers", type=int, default=1, help="model actors (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per actor; 0.5 puts two actors on one GPU (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs per actor, also its torch threads (default 1)")
    p.add_argument("--gt-json", default=None, help="ground-truth COCO panoptic JSON: compute PQ at the end")
    p.add_argument("--gt-dir", default=None, help="folder of ground-truth panoptic PNGs (with --gt-json)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI or sqlite mlruns/mlflow.db)")
    p.add_argument("--overlays", type=int, default=0, metavar="N",
                   help="draw overlays of the first N images into OUT/overlays (default 0)")


def run(args: argparse.Namespace) -> int:
    from ciae.evaluation import format_table
    from pipeline.coco import DatasetError
    from workflows.evaluate import EvaluationError
    from workflows.label import label

    try:
        s = label(args.model, args.input, args.out, tracking_uri=args.tracking_uri, address=args.address,
                  workers=args.workers, batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
                  cpus_per_worker=args.cpus_per_worker, gt_json=args.gt_json, gt_dir=args.gt_dir,
                  overlays=args.overlays)
    except (ValueError, DatasetError, EvaluationError) as e:
        print(f"ciae label: {e}", file=sys.stderr)
        return 1
    rate = f", {s['images_per_second']:.1f} img/s" if s["images_per_second"] else ""
    print(f"{s['labeled']} of {s['images']} images labeled ({s['skipped']} finished before, "
          f"{s['processed']} this run in {s['seconds']:.1f} s{rate}), {s['rejected']} rejected -> {args.out}")
    if s["rejected"]:
        print(f"  rejected images are listed in {args.out}/rejects.json")
    if s["overlays"]:
        print(f"  {s['overlays']} overlays in {args.out}/overlays")
    if s["metrics"] is not None:
        m = s["metrics"]
        print(format_table(m))
        if m["images"]["without_prediction"]:
            print(f"  ({m['images']['without_prediction']} ground-truth images have no prediction "
                  f"and are left out)")
    return 0
