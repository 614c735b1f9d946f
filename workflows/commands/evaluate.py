"""Panoptic Quality of COCO panoptic predictions, with panopticapi's exact rules.

Reads the ground truth and the predictions (JSON + PNG folder each; local paths or filesystem
URIs such as s3://, gs://, file://), prints PQ / SQ / RQ for All, Things and Stuff in percent as
panopticapi does, and optionally writes them as JSON with fractions in [0, 1]:

  {"All": {"pq", "sq", "rq", "n"}, "Things": {...}, "Stuff": {...},
   "per_class": {category_id: {"pq", "sq", "rq"}}}

per_class lists the classes that count in the averages (those with a TP, FP or FN). Problems in
the input (a missing prediction, ids in a PNG missing from the JSON, unknown categories, ...)
are listed image by image and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

HELP = "compute Panoptic Quality (PQ, SQ, RQ) of predictions against COCO panoptic ground truth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt-json", required=True, help="ground-truth COCO panoptic JSON")
    parser.add_argument("--gt-dir", required=True, help="folder of ground-truth panoptic PNGs")
    parser.add_argument("--pred-json", required=True,
                        help="prediction JSON (only its 'annotations' list is read)")
    parser.add_argument("--pred-dir", required=True, help="folder of predicted panoptic PNGs")
    parser.add_argument("--output", help="write the metrics as JSON here (path or URI)")
    parser.add_argument("--workers", type=int,
                        help="worker processes (default: one per available CPU core)")


def run(args: argparse.Namespace) -> int:
    import time

    from pipeline.evaluation.files import evaluate, write_metrics
    from pipeline.evaluation.pq import format_table

    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    start = time.perf_counter()
    summary = evaluate(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir,
                       workers=args.workers, log=lambda m: print(m, file=sys.stderr))
    print(format_table(summary))
    print(f"Time elapsed: {time.perf_counter() - start:0.2f} seconds")
    if args.output:
        write_metrics(args.output, summary)
    return 0
