"""Write COCO files from the Parquet output of `ciae label`, streamed (a million images take a
few hundred MB of disk, not of memory):

  --coco-panoptic   OUT/_coco/panoptic/<key>.png (missing ones) and OUT/_coco/predictions.json,
                    COCO panoptic format (panopticapi, detectron2, `ciae evaluate` read it)
  --coco-instances  OUT/_coco/instances.json: COCO instances of the thing segments with RLE masks
                    and scores, for training a detector (detectron2, mmdetection)
  --review N        OUT/_review.csv: the N least confident images first

An OUT written by an earlier version (plan/, predictions.json, ... without the _) is exported
in its own layout.

example:
  ciae export --labels labels/val2017 --coco-panoptic --coco-instances
"""

from __future__ import annotations

import argparse

HELP = "write COCO panoptic / instances files from the Parquet output of `ciae label`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="the output folder of `ciae label` (path or URI)")
    p.add_argument("--coco-panoptic", action="store_true",
                   help="write _coco/panoptic/*.png and _coco/predictions.json")
    p.add_argument("--coco-instances", action="store_true", help="write _coco/instances.json")
    p.add_argument("--review", type=int, metavar="N", help="rewrite _review.csv with N images")


def run(args: argparse.Namespace) -> int:
    from ciae.data.panoptic import CategoryTable
    from pipeline.data.storage import public_uri
    from pipeline.label import exports
    from pipeline.label.sources import categories_of, load_plan
    from pipeline.label.store import LabelStore

    store = LabelStore(args.labels)
    plan = load_plan(store.plan_uri)
    if plan is None or not store.sealed():
        raise ValueError(f"{args.labels}: no labels there (run `ciae label` first)")
    if not (args.coco_panoptic or args.coco_instances or args.review is not None):
        raise ValueError("nothing to export: give --coco-panoptic, --coco-instances and/or --review")
    categories = categories_of(plan)
    layout = store.layout

    def shown(name: str) -> str:        # printed: without the URI's credentials
        return public_uri(store.uri_of(name))

    if args.coco_panoptic:
        n = exports.export_coco_panoptic(store, categories, check=True)
        print(f"{n} images -> {shown(layout.predictions)} and {shown(layout.panoptic)}/")
    if args.coco_instances:
        n = exports.export_coco_instances(store, categories, check=True)
        print(f"{n} instances -> {shown(layout.instances)}")
    if args.review is not None:
        summary = store.summary(args.review, CategoryTable.from_json(categories))
        n = exports.export_review(store, summary, args.review)
        print(f"{n} images -> {shown(layout.review)}")
    return 0
