"""Review the least confident images of a labeling output in Label Studio (an annotation server
that runs on its own, e.g. from scripts/label_studio.sh):

  push   send the N least confident labeled images (the order of _review.csv) to a project,
         created with a label per category (COCO names, things and stuff) when there is none,
         each image with the model's segments as a prediction (brush masks with their scores).
         A second push of the same output adds nothing.
  pull   write the project's reviewed images back as COCO panoptic (OUT/panoptic/*.png and
         OUT/panoptic.json, which `ciae prepare` reads; OUT/skipped.json lists the images the
         reviewers skipped or did not annotate). --from predictions reads the pushed predictions.
         panoptic.json's info.ciae_review names the server and project: `ciae prepare` keeps it
         in the manifest and `ciae train` tags the run and its model version with it
         (ciae.review.*, beside --init's ciae.init*).

The token is read from $LABEL_STUDIO_API_KEY (a personal access token: Label Studio, Account &
Settings), never from the command line.

examples:
  export LABEL_STUDIO_API_KEY=...
  ciae review push --labels labels/val2017 --url http://localhost:8080 --project val2017-review --n 16
  ciae review pull --labels labels/val2017 --url http://localhost:8080 --project val2017-review --out reviewed/
"""

from __future__ import annotations

import argparse

HELP = "push the least confident images of a labeling output to Label Studio, pull the reviews back"


def _common(p: argparse.ArgumentParser, d: dict) -> None:
    p.add_argument("--labels", required=True, help="the output folder of `ciae label` (path or URI)")
    p.add_argument("--url", required=True, help="the Label Studio server, e.g. http://localhost:8080")
    p.add_argument("--project", required=True, help="the project's title (created by push when there is none)")
    p.add_argument("--workers", type=int, default=d["workers"],
                   help="processes for the brush masks: encoding (push) or decoding (pull) "
                        "(default: one per CPU; 1: in this process)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of any error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from workflows.commands import defaults
    from workflows.review.sync import pull, push

    d, pulled = defaults(push), defaults(pull)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(p))
    push_p = sub.add_parser("push", help="send the N least confident images with their predictions",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(push_p, d)
    push_p.add_argument("--n", type=int, default=16, help="how many images (default: %(default)s)")
    push_p.add_argument("--model-version", default=d["model_version"],
                        help=f"the predictions' model_version in the tool (default: {d['model_version']})")
    pull_p = sub.add_parser("pull", help="write the reviewed images as COCO panoptic",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(pull_p, pulled)
    pull_p.add_argument("--out", required=True, help="the folder for panoptic/, panoptic.json, skipped.json")
    pull_p.add_argument("--from", dest="source", choices=("annotations", "predictions"),
                        default=pulled["source"],
                        help="read the reviewers' annotations or the pushed predictions "
                             "(default %(default)s)")


def run(args: argparse.Namespace) -> int:
    import os

    from pipeline.data import storage
    from pipeline.data.storage import public_uri
    from workflows.review import sync as review
    from workflows.review.client import TOKEN_ENV
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers must be at least 1")
    token = os.environ.get(TOKEN_ENV)
    if args.action == "push":
        result = review.push(args.labels, args.url, token, args.project, args.n,
                             model_version=args.model_version, progress=args.progress,
                             workers=args.workers)
        print(result.line())
    else:
        result = review.pull(args.labels, args.url, token, args.project, args.out, source=args.source,
                             progress=args.progress, workers=args.workers)
        print(f"{result['images']} images -> {public_uri(result['json'])}; {len(result['skipped'])} skipped "
              f"(listed in {public_uri(storage.join(args.out, 'skipped.json'))})")     # no credentials shown
    return 0
