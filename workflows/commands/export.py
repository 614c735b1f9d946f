"""Write COCO files from the Parquet output of `ciae label`, streamed (a million images take a
few hundred MB of disk, not of memory):

  --coco-panoptic   OUT/panoptic/<key>.png (missing ones) and OUT/predictions.json, COCO panoptic
                    format (panopticapi, detectron2, `ciae evaluate` read it)
  --coco-instances  OUT/instances.json: COCO instances of the thing segments with RLE masks and
                    scores, for training a detector (detectron2, mmdetection)
  --review N        OUT/review.csv: the N least confident images first

example:
  ciae export --labels labels/val2017 --coco-panoptic --coco-instances
"""

from __future__ import annotations

import argparse

HELP = "write COCO panoptic / instances files from the Parquet output of `ciae label`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="the output folder of `ciae label` (path or URI)")
    p.add_argument("--coco-panoptic", action="store_true", help="write panoptic/*.png and predictions.json")
    p.add_argument("--coco-instances", action="store_true", help="write instances.json")
    p.add_argument("--review", type=int, default=None, metavar="N", help="rewrite review.csv with N images")


def run(args: argparse.Namespace) -> int:
    from pipeline import label_store as ls
    from pipeline.image_sources import load_plan
    from workflows.label import categories_of

    store = ls.LabelStore(args.labels)
    plan = load_plan(store.uri_of(ls.PLAN_DIR))
    if plan is None or not store.sealed():
        raise ValueError(f"{args.labels}: no labels there (run `ciae label` first)")
    if not (args.coco_panoptic or args.coco_instances or args.review is not None):
        raise ValueError("nothing to export: give --coco-panoptic, --coco-instances and/or --review")
    categories = categories_of(plan)
    if args.coco_panoptic:
        n = ls.export_coco_panoptic(store, categories, pngs=True)
        print(f"{n} images -> {store.uri_of(ls.PREDICTIONS)} and {store.uri_of(ls.PANOPTIC_DIR)}/")
    if args.coco_instances:
        n = ls.export_coco_instances(store, categories)
        print(f"{n} instances -> {store.uri_of(ls.INSTANCES)}")
    if args.review is not None:
        n = ls.export_review(store, args.review)
        print(f"{n} images -> {store.uri_of(ls.REVIEW)}")
    return 0
