"""PQ on COCO panoptic files: ground truth and predictions as JSON + PNG folders, local or URIs.

The JSON side goes through ``pipeline.data.coco`` (the prediction JSON is checked against the
ground-truth categories and images). Then, for local folders, the images are counted by
hotcoco (``hotcoco.panoptic``, a Rust implementation of panopticapi's rules, on ``workers``
threads; 2.7x our file path per core in ``benchmarks/pq/run.py``); for URIs, or when hotcoco
reports a problem or is missing, each image pair is read, decoded and added to a
:class:`pipeline.evaluation.pq.PQAccumulator`, over N worker processes whose partial states merge.
Both give the same numbers (tested). Every problem, whichever image it comes from, is collected,
and the evaluation fails with one :class:`EvaluationError` listing them rather than stopping at
the first.

The JSON checks run on both paths; the PNG checks differ on one point. A ground-truth PNG that
disagrees with its own JSON (an id in the PNG missing from ``segments_info``, or a listed
segment without pixels) is counted by hotcoco as panopticapi counts it (the id ignored; the
segment a false negative), while the accumulator refuses the image. Predictions are checked
alike on both paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ciae.data.panoptic import CategoryTable, DatasetError, RecordError
from pipeline.data.coco import (PanopticRecord, annotations_by_image, decode_panoptic, parse_panoptic_json,
                                read_file, read_json)
from pipeline.data.storage import join, resolve, write_uri
from pipeline.evaluation.pq import PQAccumulator

if TYPE_CHECKING:
    import multiprocessing.context

MAX_LISTED_ERRORS = 20


class EvaluationError(ValueError):
    """Images that cannot be evaluated; ``errors`` holds one RecordError per problem."""

    def __init__(self, errors: Sequence[RecordError]):
        self.errors = list(errors)
        listed = "; ".join(str(e) for e in self.errors[:MAX_LISTED_ERRORS])
        more = len(self.errors) - MAX_LISTED_ERRORS
        super().__init__(f"{len(self.errors)} problem(s) prevent the evaluation: {listed}"
                         + (f"; ... and {more} more" if more > 0 else ""))


# ------------------------------------------------------------------------------ decoding


def read_ids(name: str, what: str, fs, path: str, height: int, width: int,
             out: np.ndarray | None = None) -> np.ndarray:
    """Read and decode one panoptic PNG of a record (``pipeline.data.coco.decode_panoptic``, into
    ``out`` if given), checking its size; errors are RecordErrors naming ``what`` and the path."""
    return decode_panoptic(name, read_file(name, what, fs, path), height, width, what=f"{what} {path}", out=out)


# ------------------------------------------------------------------------------- the JSON


def load_predictions(uri: str, gt_records: Sequence[PanopticRecord], categories: CategoryTable,
                     doc: dict | None = None) -> tuple[dict[int, PanopticRecord], list[RecordError], int]:
    """Read a prediction JSON (or take its parsed ``doc``) and check it against the ground truth.

    Only ``annotations`` is read (prediction files often have nothing else); images, sizes and
    categories are the ground truth's. Returns the predictions by image id, the problems (a
    ground-truth image without prediction, bad segments) and the number of predictions for
    images the ground truth does not have, which are ignored as panopticapi does."""
    doc = read_json(uri, "prediction JSON") if doc is None else doc
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise DatasetError(f"{uri}: expected a JSON object with an 'annotations' list")

    gt_ids = {r.image_id for r in gt_records}
    annotations, extra = [], 0
    pairs, errors = annotations_by_image(doc["annotations"], "prediction")
    for iid, ann in pairs:
        if iid in gt_ids:
            annotations.append(ann)
        else:
            extra += 1
    predicted = {int(a["image_id"]) for a in annotations}
    errors += [RecordError(r.name, f"no prediction in {uri}") for r in gt_records
               if r.image_id not in predicted]
    images = [{"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width}
              for r in gt_records if r.image_id in predicted]
    parsed = parse_panoptic_json({"images": images, "annotations": annotations}, uri, categories)
    errors += [RecordError(e.image, f"prediction JSON: {e.problem}") for e in parsed.rejects]
    return {r.image_id: r for r in parsed.records}, errors, extra


# ------------------------------------------------------------------------------- per image


_worker_folders: tuple | None = None  # (gt fs, gt path, pred fs, pred path) in a worker process


def _init_worker(gt_dir: str, pred_dir: str) -> None:
    global _worker_folders
    _worker_folders = (*resolve(gt_dir), *resolve(pred_dir))


def _evaluate_chunk(args: tuple) -> tuple[PQAccumulator, list[tuple[str, str]]]:
    """One chunk in a worker process; problems travel as (image, problem) pairs because
    RecordError does not survive pickling."""
    pairs, categories = args
    acc, errors = _evaluate(pairs, categories, *_worker_folders)
    return acc, [(e.image, e.problem) for e in errors]


def evaluate_pairs(pairs: Sequence[tuple[PanopticRecord, PanopticRecord]], categories: CategoryTable,
                   gt_dir: str, pred_dir: str) -> tuple[PQAccumulator, list[RecordError]]:
    """Read, decode and add each (ground truth, prediction) record pair, in this process;
    returns the accumulator and the per-image problems."""
    return _evaluate(pairs, categories, *resolve(gt_dir), *resolve(pred_dir))


def _evaluate(pairs: Sequence[tuple[PanopticRecord, PanopticRecord]], categories: CategoryTable,
              gt_fs, gt_path: str, pred_fs, pred_path: str) -> tuple[PQAccumulator, list[RecordError]]:
    acc, errors = PQAccumulator(categories), []
    buffers = np.empty((2, 0), dtype=np.uint32)  # ground truth and prediction decode here
    for gt, pred in pairs:
        size = gt.height * gt.width
        if buffers.shape[1] < size:
            buffers = np.empty((2, size), dtype=np.uint32)
        gt_out, pred_out = (b[:size].reshape(gt.height, gt.width) for b in buffers)
        try:
            gt_ids = read_ids(gt.name, "ground-truth PNG", gt_fs, join(gt_path, gt.panoptic_file),
                              gt.height, gt.width, out=gt_out)
            pred_ids = read_ids(gt.name, "prediction PNG", pred_fs, join(pred_path, pred.panoptic_file),
                                gt.height, gt.width, out=pred_out)
            acc.add(gt_ids, gt.segments, pred_ids, pred.segments, image=gt.name)
        except RecordError as e:
            errors.append(e)
    return acc, errors


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a fresh server process that has imported this module: as safe as
    spawning (nothing inherited from a threaded parent) and about as quick to start as forking."""
    import multiprocessing  # here, not at the top: 20 ms of start-up that one core never needs

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def evaluate(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, workers: int | None = None,
             log: Callable[[str], None] = lambda _: None) -> dict:
    """PQ of a prediction set against a COCO panoptic ground truth; paths or URIs.

    Returns :meth:`PQAccumulator.summary`. Raises DatasetError when a JSON is unusable and
    EvaluationError listing every image that cannot be evaluated."""
    gt_doc = read_json(gt_json, "panoptic JSON")
    if not isinstance(gt_doc, dict):
        raise DatasetError(f"{gt_json}: expected a JSON object")
    gt = parse_panoptic_json(gt_doc, gt_json)
    errors = [RecordError(e.image, f"ground-truth JSON: {e.problem}") for e in gt.rejects]
    pred_doc = read_json(pred_json, "prediction JSON")
    preds, pred_errors, extra = load_predictions(pred_json, gt.records, gt.categories, pred_doc)
    errors += pred_errors
    if extra:
        log(f"ignoring {extra} prediction(s) for images absent from the ground truth")
    pairs = [(r, preds[r.image_id]) for r in gt.records if r.image_id in preds]
    workers = max(1, min(workers or default_workers(), len(pairs)))
    if not errors and "://" not in gt_dir + pred_dir:
        log(f"evaluating {len(pairs)} image(s) with hotcoco on {workers} thread(s)")
        summary = _hotcoco(gt_json if "://" not in gt_json else gt_doc,
                           pred_json if "://" not in pred_json else _restricted(pred_doc, gt_doc),
                           gt_dir, pred_dir, workers)
        if summary is not None:
            return summary
    log(f"evaluating {len(pairs)} image(s) with {workers} worker(s)")

    if workers == 1:
        acc, image_errors = evaluate_pairs(pairs, gt.categories, gt_dir, pred_dir)
        errors += image_errors
    else:
        from concurrent.futures import ProcessPoolExecutor

        # Small chunks keep the workers evenly loaded; results come back in image order.
        size = max(1, min(64, len(pairs) // (8 * workers)))
        chunks = [(pairs[i:i + size], gt.categories) for i in range(0, len(pairs), size)]
        acc = PQAccumulator(gt.categories)
        with ProcessPoolExecutor(workers, mp_context=_worker_context(),
                                 initializer=_init_worker, initargs=(gt_dir, pred_dir)) as pool:
            for part, image_errors in pool.map(_evaluate_chunk, chunks):
                acc.merge(part)
                errors += [RecordError(image, problem) for image, problem in image_errors]
    if errors:
        raise EvaluationError(errors)
    return acc.summary()


def _restricted(pred_doc: dict, gt_doc: dict) -> dict:
    """The prediction document as hotcoco takes it: the ground truth's images and categories and
    the predictions for those images."""
    gt_ids = {int(im["id"]) for im in gt_doc["images"]}
    return {"images": gt_doc["images"], "categories": gt_doc["categories"],
            "annotations": [a for a in pred_doc["annotations"] if int(a["image_id"]) in gt_ids]}


def _hotcoco(gt: str | dict, pred: str | dict, gt_dir: str, pred_dir: str, workers: int) -> dict | None:
    """The summary (``PQAccumulator.summary``'s shape) by hotcoco on JSONs that passed our
    checks, given as local paths (hotcoco reads them 2-3x faster than it converts parsed
    documents; it ignores predictions for images the ground truth lacks) or documents; None
    when hotcoco is missing or reports a problem, which our evaluator then names image by
    image. ``workers`` sets the threads of the first call in a process (rayon's)."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    try:
        from hotcoco.panoptic import PanopticEval
    except ImportError:
        return None
    ev = PanopticEval(gt, pred, gt_folder=gt_dir, pred_folder=pred_dir)
    try:
        ev.evaluate()
    except (ValueError, OSError):
        return None
    result = ev.results()
    out = {g: {k: result[g][k] for k in ("pq", "sq", "rq", "n")} for g in ("All", "Things", "Stuff")}
    out["per_class"] = {int(cid): {k: r[k] for k in ("pq", "sq", "rq")} for cid, r in result["per_class"].items()
                        if r["tp"] + r["fp"] + r["fn"] > 0}
    return out


def write_metrics(uri: str, summary: dict) -> None:
    """Write a summary as JSON to a path or URI (category ids become string keys)."""
    write_uri(uri, (json.dumps(summary, indent=2) + "\n").encode())

