"""What a labeling job's output exports (``pipeline.label.store``). Names are the store's layout's
(``LabelStore.layout``: ``_coco/predictions.json`` and so on).

Streamed from the sealed shards with column projection (one row group in memory at a time, no PNG
decoded except for panels):

* ``export_coco_panoptic``: COCO panoptic JSON (streamed by ``JsonArrays``) and the PNGs it
  names (panopticapi, detectron2 and ``ciae evaluate`` read them).
* ``export_coco_instances``: COCO instances of the thing segments, RLE masks, with scores.
* ``draw_overlays`` (panels of the first images).

Written from the shards' summary (``LabelStore.summary``, no shard read once it is made):
``export_rejects``, ``export_review`` (the least confident images first) and ``export_metrics``
(the shards' PQ statistics summed).
"""

from __future__ import annotations

import csv
import heapq
import io
import json

from ciae.data.panoptic import CategoryTable
from pipeline.data import storage
from pipeline.evaluation.pq import PQAccumulator
from pipeline.label.sources import Plan
from pipeline.label.store import (
    PNGS_RECORD,
    LabelStore,
    Summary,
    shard_names,
    task_name,
)


class JsonArrays:
    """A JSON object of arrays streamed to a binary stream: ``open`` each array, ``add`` its
    items, ``value`` for a plain member, ``close`` at the end."""

    def __init__(self, stream):
        self.stream, self.first, self.open_key, self.items = stream, True, None, 0
        stream.write(b"{")

    def open(self, key: str) -> None:
        self._member(key)
        self.stream.write(b"[")
        self.open_key, self.items = key, 0

    def add(self, item) -> None:
        self.stream.write((b"," if self.items else b"") + json.dumps(item).encode())
        self.items += 1

    def value(self, key: str, value) -> None:
        self._member(key)
        self.stream.write(json.dumps(value).encode())

    def _member(self, key: str) -> None:
        self._close_array()
        self.stream.write((b"" if self.first else b",") + json.dumps(key).encode() + b":")
        self.first = False

    def _close_array(self) -> None:
        if self.open_key is not None:
            self.stream.write(b"]")
            self.open_key = None

    def close(self) -> None:
        self._close_array()
        self.stream.write(b"}")


def stream_json(store: LabelStore, name: str, write) -> None:
    """Write the JSON document that ``write(JsonArrays)`` makes to ``name`` in the store,
    atomically (``storage.open_atomic``)."""
    path = store.path(name)
    storage.create_folder(store.fs, path.rpartition("/")[0])
    with storage.open_atomic(store.fs, path) as f:
        doc = JsonArrays(f)
        write(doc)
        doc.close()


def write_json(store: LabelStore, name: str, doc) -> None:
    store.write(store.path(name), (json.dumps(doc, indent=1) + "\n").encode())


def _write_images(doc: JsonArrays, store: LabelStore) -> None:
    """The ``images`` array of a COCO file: one entry per labeled image, in shard order."""
    doc.open("images")
    for r in store.rows(["image_id", "file_name", "height", "width", "status"]):
        if r["status"] == "labeled":
            doc.add({"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                     "width": r["width"]})


COCO_PANOPTIC_RECORD, COCO_INSTANCES_RECORD = "coco-panoptic", "coco-instances"


def _recorded(store: LabelStore, record: str, made_from: dict, name: str) -> dict | None:
    """The export ``record`` when it was made from ``made_from`` and its file ``name`` is there."""
    done = store.export_record(record, made_from)
    return done if done is not None and store.file_size(name) is not None else None


def export_coco_panoptic(store: LabelStore, categories: list[dict], check: bool = False) -> int:
    """The COCO panoptic JSON (``layout.predictions``) and the PNG (``layout.panoptic``/<key>.png)
    of each labeled image. Returns the images.

    Requests follow the work: a task's PNGs are written once, one PUT each, and recorded
    (``task-KKKKKK.pngs.json`` with its shard's size; ``LabelStore.seal`` records those the job
    wrote as it labeled), and the whole export is recorded with the shards it was made from
    (``coco-panoptic.json``): an export started again writes only the PNGs of the tasks without a
    record, and over the same shards reads none. ``check`` (``ciae export``) trusts no record:
    it asks each PNG's size and writes those missing or of another size."""
    sizes = store.shard_sizes()
    made_from = {"shards": shard_names(sizes)}
    done = None if check else _recorded(store, COCO_PANOPTIC_RECORD, made_from, store.layout.predictions)
    if done is not None:
        return done["images"]
    count = 0

    def write(doc):
        nonlocal count
        _write_images(doc, store)
        doc.open("annotations")
        for task in sorted(sizes):
            record = task_name(task) + PNGS_RECORD
            written = not check and store.export_record(record, {"shard_bytes": sizes[task]}) is not None
            columns = ["key", "image_id", "status", "segments"] + ([] if written else ["png"])
            for r in store.task_rows(task, columns):
                if r["status"] != "labeled":
                    continue
                if not written and (not check or store.file_size(store.layout.panoptic, r["key"] + ".png")
                                    != len(r["png"])):
                    store.write_png(r["key"], r["png"])
                doc.add({"image_id": r["image_id"], "file_name": r["key"] + ".png",
                         "segments_info": [{k: s[k] for k in ("id", "category_id", "iscrowd", "area", "bbox")}
                                           | {"score": round(float(s["score"]), 4)} for s in r["segments"]]})
                count += 1
            if not written:
                store.set_export_record(record, {"shard_bytes": sizes[task]})
        doc.value("categories", categories)
    stream_json(store, store.layout.predictions, write)
    store.set_export_record(COCO_PANOPTIC_RECORD, made_from, images=count)
    return count


def export_coco_instances(store: LabelStore, categories: list[dict], check: bool = False) -> int:
    """The COCO instances JSON (``layout.instances``) of the thing segments, masks as RLE
    (pycocotools' compressed counts), with their scores, so that detection frameworks can train
    on them. Returns the instances. Recorded as ``export_coco_panoptic``'s JSON is (``check``:
    made again whatever is recorded)."""
    sizes = store.shard_sizes()
    made_from = {"shards": shard_names(sizes)}
    done = None if check else _recorded(store, COCO_INSTANCES_RECORD, made_from, store.layout.instances)
    if done is not None:
        return done["instances"]
    things = {int(c["id"]) for c in categories if c.get("isthing")}
    count = 0

    def write(doc):
        nonlocal count
        _write_images(doc, store)
        doc.open("annotations")
        for r in store.rows(["image_id", "height", "width", "status", "segments"]):
            for s in r["segments"] if r["status"] == "labeled" else ():
                if s["category_id"] not in things:
                    continue
                count += 1
                doc.add({"id": count, "image_id": r["image_id"], "category_id": s["category_id"],
                         "segmentation": {"size": [r["height"], r["width"]], "counts": s["rle"]},
                         "area": s["area"], "bbox": s["bbox"], "iscrowd": 0,
                         "score": round(float(s["score"]), 4)})
        doc.value("categories", [c for c in categories if int(c["id"]) in things])
    stream_json(store, store.layout.instances, write)
    store.set_export_record(COCO_INSTANCES_RECORD, made_from, instances=count)
    return count


def export_rejects(store: LabelStore, summary: Summary, input_uri: str) -> int:
    """``layout.rejects``: {"rejected": [{file, key, image_id, reason}], "input"} of the images
    that could not be labeled (``summary``'s). Returns their number."""
    def write(doc):
        doc.open("rejected")
        for r in summary.rejects:
            doc.add(r)
        doc.value("input", storage.public_uri(input_uri))
    stream_json(store, store.layout.rejects, write)
    return len(summary.rejects)


def least_confident(store: LabelStore, n: int, columns: list[str]) -> list[dict]:
    """The ``n`` labeled rows of lowest quality, lowest first (ties: plan order), holding
    ``columns`` and ``index``, ``status``, ``quality``; ``n`` rows in memory at a time."""
    labeled = (r for r in store.rows(sorted({*columns, "index", "status", "quality"})) if r["status"] == "labeled")
    return heapq.nsmallest(n, labeled, key=lambda r: (r["quality"], r["index"]))


def least_confident_indices(store: LabelStore, n: int) -> list[int]:
    """The plan indices of ``least_confident``'s ``n`` rows, in its order: ``job.json``'s review
    rows when it is current and serves ``n`` (no shard read), else a scan of the shards."""
    summary = store.job_summary()
    if summary is not None and summary.serves(n):
        return [r[1] for r in summary.review[:n]]
    return [r["index"] for r in least_confident(store, n, ["index"])]


def export_review(store: LabelStore, summary: Summary, n: int) -> int:
    """``layout.review`` (CSV): the ``n`` labeled images of lowest quality, lowest first
    (``summary``'s review rows: it must serve ``n``), with their PQ when there was ground truth
    and their least confident segment. Returns the rows."""
    if not summary.serves(n):
        raise ValueError(f"a summary of the {summary.review_n} least confident images cannot list {n}")
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["rank", "key", "file_name", "image_id", "quality", "pq", "least_confident_segment",
                  "its_category_id", "its_score"])
    rows = summary.review[:n]
    for rank, (quality, _, key, file_name, image_id, pq, segment, category_id, score) in enumerate(rows, start=1):
        out.writerow([rank, key, file_name, image_id, f"{quality:.4f}", "" if pq is None else f"{pq:.4f}",
                      "" if segment is None else segment, "" if segment is None else category_id,
                      "" if segment is None else f"{score:.4f}"])
    store.write(store.path(store.layout.review), buf.getvalue().encode())
    return len(rows)


def export_metrics(store: LabelStore, summary: Summary, table: CategoryTable, images: int) -> dict:
    """``layout.metrics``: the PQ summary of the shards' statistics (``summary``'s,
    ``PQAccumulator.summary``) with {"images": {"evaluated", "input"}}; returns it (``per_class``
    keyed by int ids)."""
    acc = PQAccumulator(table)
    if summary.pq is not None:
        acc.add_json(summary.pq)
    metrics = acc.summary() | {"images": {"evaluated": acc.images, "input": images}}
    write_json(store, store.layout.metrics, {k: v for k, v in metrics.items() if k != "per_class"}
               | {"per_class": {str(k): v for k, v in metrics["per_class"].items()}})
    return metrics


def draw_overlays(store: LabelStore, plan: Plan, categories: list[dict], n: int) -> int:
    """Panels (image | prediction | ground truth, ``pipeline.evaluation.visualize.panel``) of the first
    ``n`` labeled images in plan order that have none yet (``layout.overlays``/<key>.png);
    each plan task file they need is read once. Returns how many were drawn."""
    from PIL import Image

    from ciae.data.transform import decode_rgb
    from pipeline.data.panoptic_png import decode_id_png
    from pipeline.data.shards import decode_index_runs
    from pipeline.evaluation.visualize import panel
    from pipeline.label.stages import load_entry, read_shard_rows

    todo, seen = [], 0
    if n:
        for r in store.rows(["index", "key", "status", "png", "segments"]):
            if r["status"] != "labeled":
                continue
            if store.file_size(store.layout.overlays, r["key"] + ".png") is None:
                todo.append(r)
            seen += 1
            if seen >= n:
                break
    entries, tasks = {}, {}
    for r in todo:
        task, offset = plan.locate(r["index"])
        if task not in tasks:
            tasks[task] = Plan.read_task(plan.dir, task, plan.credentials)
        entries[r["index"]] = tasks[task][offset]
    shard_rows = read_shard_rows(entries.values())
    for r in todo:
        data, gt = load_entry(entries[r["index"]], shard_rows)
        ids = decode_id_png(r["png"])
        if gt is not None:
            if gt["runs"]:
                gt = (decode_index_runs(gt["runs"], *ids.shape),
                      [{"id": k + 1, "category_id": s["category_id"]} for k, s in enumerate(gt["segments"])])
            else:
                gt = (decode_id_png(storage.read_uri(gt["png"])), gt["segments"])
        buf = io.BytesIO()
        Image.fromarray(panel(decode_rgb(data), ids, r["segments"], categories, gt=gt)).save(buf, format="PNG")
        store.write_overlay(r["key"], buf.getvalue())
    return len(todo)
