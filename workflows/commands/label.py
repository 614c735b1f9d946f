"""Label images with a registered model: a streaming Ray Data job (decode on CPU tasks, the model
on actors, encode and write on CPU tasks), written exactly once as Parquet shards.

--model is an MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a
model folder) or a checkpoint file that `ciae train` wrote (path or URI; no MLflow needed then).
The driver reads it once and hands it to the actors through Ray's object store.

Input (path or URI): a folder of images (with its subfolders), a list file (one path or URI per
line), or prepared shards (a folder with _manifest.json). Output, a Parquet dataset (pandas,
pyarrow.dataset and Spark read OUT as one row per image; they skip the names starting with _):

  OUT/labels/task-*.parquet   one row per image: key, image_id, file_name, height, width, status,
                              the COCO panoptic PNG, segments (with a confidence score and, for
                              things, an RLE mask), the image's quality, its PQ with ground truth
  OUT/_review.csv             the least confident images first (--review N of them)
  OUT/_rejects.json           images that could not be read, with the reason
  OUT/_metrics.json           with ground truth: PQ / SQ / RQ, accumulated as batches finish
  OUT/_coco/panoptic/<key>.png + OUT/_coco/predictions.json   with --coco-panoptic (COCO panoptic)
  OUT/_coco/instances.json    with --coco-instances: COCO instances of the thing segments (RLE)
  OUT/_overlays/<key>.png     with --overlays N: image | prediction | ground truth of the first N
  OUT/_plan/, OUT/_parts/     the job's own: the planned input, batches of unfinished tasks

An OUT written by an earlier version (plan/, predictions.json, ... without the _) is resumed and
exported in its own layout.

Keys are the images' paths relative to the input without extension (a/0001 for a/0001.jpg).
Image ids: from shards, the row's image_id; from a folder or list, the ground truth's id for
that file name when --gt-json is given, else the file stem when every stem is a distinct number
(000000000139.jpg -> 139), else 1, 2, ... in input order (a folder's sorted order).
`ciae export` writes the COCO files later from OUT.

Killed anywhere and run again with the same OUT, the job labels only the images not finished:
every image appears exactly once in every output.

example:
  ciae label --model models:/ciae@champion --input coco/val2017 --out labels/val2017 \\
             --gt-json coco/annotations/panoptic_val2017.json \\
             --gt-dir coco/annotations/panoptic_val2017 --coco-panoptic --overlays 8
  ciae label --model models:/ciae@champion --input s3://bucket/images --out s3://bucket/labels \\
             --address auto --workers 8 --gpus-per-worker 1 --batch-size 16 --coco-instances
"""

from __future__ import annotations

import argparse

HELP = "label images with a registered model (Ray Data, streaming), Parquet and COCO output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from workflows.commands import defaults
    from workflows.jobs.specs import LABEL_CPUS, LABEL_DATA_CPUS, LabelJob
    from workflows.tracking.location import DEFAULT_DB, SQLITE

    d = defaults(LabelJob)
    p.add_argument("--model", required=True,
                   help="MLflow model URI (e.g. models:/ciae@champion) or a checkpoint file of ciae train")
    p.add_argument("--input", required=True, help="folder of images, list file, or shards folder (path or URI)")
    p.add_argument("--out", required=True, help="output folder (path or URI)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"images per model call (default {d['batch_size']})")
    p.add_argument("--workers", type=int, default=d["workers"], help=f"model actors (default {d['workers']})")
    p.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                   help="GPUs per actor: 1 first (an actor queues its next batch while it finishes one), "
                        f"0.5 puts two actors on one GPU (default {d['gpus_per_worker']:g}: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                   help=f"CPUs per actor, also its torch threads (default: up to {LABEL_CPUS:g}, the most "
                        f"that leaves {LABEL_DATA_CPUS:g} CPU of the cluster to decoding and encoding)")
    p.add_argument("--gt-json", default=d["gt_json"],
                   help="ground-truth COCO panoptic JSON: PQ as batches finish")
    p.add_argument("--gt-dir", default=d["gt_dir"],
                   help="folder of ground-truth panoptic PNGs (with --gt-json)")
    p.add_argument("--tracking-uri", default=d["tracking_uri"],
                   help=f"MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI or "
                        f"{SQLITE}{DEFAULT_DB})")
    p.add_argument("--coco-panoptic", action="store_true",
                   help="also write OUT/_coco/panoptic/*.png and OUT/_coco/predictions.json")
    p.add_argument("--coco-instances", action="store_true",
                   help="also write OUT/_coco/instances.json (thing segments as RLE, for detector training)")
    p.add_argument("--overlays", type=int, default=d["overlays"], metavar="N",
                   help="draw panels of the first N images into OUT/_overlays (default %(default)s)")
    p.add_argument("--review", type=int, default=d["review"], metavar="N",
                   help=f"list the N least confident images in OUT/_review.csv (default {d['review']})")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bfloat16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network on CUDA")
    p.add_argument("--retry-rejected", action="store_true",
                   help="label again the images an earlier run rejected (the files may have been fixed)")
    p.add_argument("--task-images", type=int, default=d["task_images"],
                   help=f"images per task and output shard, fixed by the first run (default {d['task_images']})")
    p.add_argument("--stall-timeout", type=float, default=d["stall_timeout"], metavar="SECONDS",
                   help="fail (one line; run again to resume) when nothing finishes for this long on a cluster "
                        f"left with fewer CPUs or GPUs than the job holds, a node lost (default {d['stall_timeout']:g})")
    p.add_argument("--stats", action="store_true",
                   help="print Ray Data's statistics of each stage at the end (where the time went)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.data.storage import public_uri
    from pipeline.evaluation.pq import format_table
    from pipeline.label.store import LabelStore
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    job = LabelJob(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LabelJob)})
    s = label(job, address=args.address)
    layout = LabelStore(job.out).layout
    out = public_uri(args.out)          # printed: without the URI's credentials
    rate = f", {s['images_per_second']:.1f} img/s" if s["images_per_second"] else ""
    print(f"{s['labeled']} of {s['images']} images labeled ({s['skipped']} finished before, "
          f"{s['processed']} this run in {s['seconds']:.1f} s{rate}), {s['rejected']} rejected -> {out}")
    if s["rejected"]:
        print(f"  rejected images are listed in {out}/{layout.rejects}")
    print(f"  the {s['review']} least confident images are listed in {out}/{layout.review}")
    if job.coco_panoptic:
        print(f"  COCO panoptic: {out}/{layout.predictions} and {out}/{layout.panoptic}/")
    if job.coco_instances:
        print(f"  COCO instances: {out}/{layout.instances}")
    if s["overlays"]:
        print(f"  {s['overlays']} panels in {out}/{layout.overlays}")
    if s["metrics"] is not None:
        print(format_table(s["metrics"]))
    if args.stats and s["stages"]:
        print(s["stages"])
    return 0
