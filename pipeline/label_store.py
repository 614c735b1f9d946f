"""The output of a labeling job: Parquet shards, one per task of the plan, written exactly once
however often the job restarts, and the COCO files exported from them.

Layout of an output folder (local path or filesystem URI)::

    plan/                    the input, planned once (``pipeline.image_sources``)
    parts/task-KKKKKK/*.parquet   results of the batches of a task not yet sealed
    labels/task-KKKKKK.parquet    a task's results, sealed: one row per image of the task
    panoptic/<key>.png       COCO panoptic PNGs, when asked for (written as batches finish)
    predictions.json         COCO panoptic JSON, when asked for (streamed from the shards)
    instances.json           COCO instances JSON of the thing segments (RLE), when asked for
    rejects.json, review.csv, metrics.json, overlays/<key>.png

A row (``SCHEMA``): ``index`` (in the plan), ``key``, ``image_id``, ``file_name``, ``height``,
``width``, ``status`` ("labeled" or "rejected"), ``reason``, ``png`` (the COCO panoptic PNG at the
image's size), ``segments`` (id, category_id, iscrowd, area, bbox, score and, for things, the
COCO RLE ``rle``), ``quality`` (the image's confidence), ``pq`` (the image's PQ with ground
truth) and ``pq_stats`` (its PQ statistics, JSON, summed into ``metrics.json``).

Protocol. Every file is written to a temporary name and moved into place. A batch writes its
PNGs first and its part last, named by a digest of its keys, so a retried batch rewrites the
same part. A task is done once its shard exists: sealing reads the task's parts, keeps one row
per key, writes the shard, then removes the parts. A re-run lists ``labels/`` (one name per
task) and the parts of the unsealed tasks, and labels only what neither holds. Exports read
the shards only.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ciae.evaluation.pq import PQAccumulator
from ciae.panoptic import CategoryTable, DatasetError
from pipeline import storage

PLAN_DIR, PARTS_DIR, LABELS_DIR = "plan", "parts", "labels"
PANOPTIC_DIR, OVERLAY_DIR = "panoptic", "overlays"
PREDICTIONS, INSTANCES = "predictions.json", "instances.json"
REJECTS, REVIEW, METRICS = "rejects.json", "review.csv", "metrics.json"
PQ_KEY = b"ciae.pq"           # a sealed shard's footer: its PQ statistics, JSON

SEGMENT = pa.struct([("id", pa.int64()), ("category_id", pa.int32()), ("iscrowd", pa.int8()),
                     ("area", pa.int64()), ("bbox", pa.list_(pa.int32(), 4)), ("score", pa.float32()),
                     ("rle", pa.string())])
SCHEMA = pa.schema([
    ("index", pa.int64()), ("key", pa.string()), ("image_id", pa.int64()), ("file_name", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("png", pa.binary()), ("segments", pa.list_(SEGMENT)), ("quality", pa.float32()),
    ("pq", pa.float64()), ("pq_stats", pa.string()),
])


def task_name(task: int) -> str:
    return f"task-{task:06d}"


def pq_state(acc: PQAccumulator) -> dict:
    """The non-zero statistics of an accumulator, by category position (JSON-friendly)."""
    nz = np.flatnonzero(acc.tp + acc.fp + acc.fn)
    return {"images": acc.images, "c": nz.tolist(), "iou": acc.iou[nz].tolist(), "tp": acc.tp[nz].tolist(),
            "fp": acc.fp[nz].tolist(), "fn": acc.fn[nz].tolist()}


def add_state(acc: PQAccumulator, state: dict) -> None:
    """Add a ``pq_state`` into an accumulator of the same category table."""
    c = np.asarray(state["c"], dtype=np.int64)
    np.add.at(acc.iou, c, state["iou"])
    np.add.at(acc.tp, c, state["tp"])
    np.add.at(acc.fp, c, state["fp"])
    np.add.at(acc.fn, c, state["fn"])
    acc.images += state["images"]


class LabelStore:
    """The output folder of a labeling job (see the module docstring)."""

    def __init__(self, out_uri: str):
        self.uri = out_uri.rstrip("/")
        self.fs, self.base = storage.resolve(out_uri)

    def path(self, *parts: str) -> str:
        """A path inside the folder, on ``self.fs``."""
        return storage.join(self.base, *parts)

    def uri_of(self, *parts: str) -> str:
        """The same, as a path or URI that ``storage.resolve`` takes."""
        return storage.join(self.uri, *parts)

    def check_writable(self) -> None:
        """Create the folder and write a file there, or raise DatasetError saying why not."""
        probe = self.path(f".ciae-probe{storage.TMP_MARK}")
        try:
            self.fs.create_dir(self.base, recursive=True)
            storage.write_bytes_atomic(self.fs, probe, b"")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.uri}: cannot write the output there ({e})") from None

    # ----------------------------------------------------------------------------- writing

    def write_png(self, key: str, data: bytes) -> None:
        self._write(self.path(PANOPTIC_DIR, key + ".png"), data)

    def write_overlay(self, key: str, data: bytes) -> None:
        self._write(self.path(OVERLAY_DIR, key + ".png"), data)

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        storage.write_bytes_atomic(self.fs, path, data)

    def write_part(self, task: int, rows: list[dict]) -> str:
        """Write one batch's rows of a task (``SCHEMA``) as a part; returns its name."""
        keys = sorted(r["key"] for r in rows)
        name = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:16] + ".parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf, compression="zstd")
        self._write(self.path(PARTS_DIR, task_name(task), name), buf.getvalue().to_pybytes())
        return name

    def part_keys(self, task: int) -> set[str]:
        """The keys in the parts of an unsealed task."""
        keys: set[str] = set()
        for info in self._parts(task):
            with self.fs.open_input_file(info.path) as f:
                keys.update(pq.read_table(f, columns=["key"])["key"].to_pylist())
        return keys

    def _parts(self, task: int) -> list[pafs.FileInfo]:
        return [i for i in storage.list_folder(self.fs, self.path(PARTS_DIR, task_name(task)))
                if i.base_name.endswith(".parquet") and storage.TMP_MARK not in i.base_name]

    def unsealed_tasks(self) -> list[int]:
        """Tasks with parts (a task sealed before its parts were removed included)."""
        return sorted(int(i.base_name.split("-")[1]) for i in storage.list_folder(self.fs, self.path(PARTS_DIR))
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("task-"))

    def sealed(self) -> set[int]:
        """The tasks whose shard exists."""
        return {int(i.base_name[5:11]) for i in storage.list_folder(self.fs, self.path(LABELS_DIR))
                if i.base_name.startswith("task-") and i.base_name.endswith(".parquet")}

    def seal(self, task: int, size: int, categories: CategoryTable) -> None:
        """Merge a task's parts into its shard (one row per key, plan order), then remove the
        parts. Raises RuntimeError when they do not hold ``size`` images."""
        tables = []
        for info in self._parts(task):
            with self.fs.open_input_file(info.path) as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        index = table["index"].to_numpy()
        _, first = np.unique(index, return_index=True)
        table = table.take(pa.array(first)).sort_by("index")
        if table.num_rows != size:
            raise RuntimeError(f"task {task}: {table.num_rows} of its {size} images are in its parts")
        acc = PQAccumulator(categories)
        for stats in table["pq_stats"].to_pylist():
            if stats:
                add_state(acc, json.loads(stats))
        buf = pa.BufferOutputStream()
        schema = SCHEMA.with_metadata({PQ_KEY: json.dumps(pq_state(acc)).encode()})
        pq.write_table(table.replace_schema_metadata(schema.metadata), buf, compression="zstd",
                       row_group_size=256)
        self._write(self.path(LABELS_DIR, task_name(task) + ".parquet"), buf.getvalue().to_pybytes())
        self.fs.delete_dir(self.path(PARTS_DIR, task_name(task)))

    def unseal_rejected(self, task: int) -> list[str]:
        """Turn a sealed task with rejected images back into parts holding its labeled rows, so
        that a run labels the rejected ones again; returns their keys."""
        path = self.path(LABELS_DIR, task_name(task) + ".parquet")
        with self.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        rejected = pc.equal(table["status"], "rejected")
        if not pc.any(rejected).as_py():
            return []
        keep = table.filter(pc.invert(rejected))
        if keep.num_rows:
            self.write_part(task, keep.to_pylist())
        else:
            self.fs.create_dir(self.path(PARTS_DIR, task_name(task)), recursive=True)
        self.fs.delete_file(path)
        return table.filter(rejected)["key"].to_pylist()

    def remove_temporaries(self) -> None:
        for folder in ("", PANOPTIC_DIR, OVERLAY_DIR, LABELS_DIR, PLAN_DIR):
            storage.remove_temporaries(self.fs, self.path(folder) if folder else self.base)
        for task in self.unsealed_tasks():
            storage.remove_temporaries(self.fs, self.path(PARTS_DIR, task_name(task)))

    # ----------------------------------------------------------------------------- reading

    def shards(self) -> list[str]:
        return [self.path(LABELS_DIR, task_name(t) + ".parquet") for t in sorted(self.sealed())]

    def rows(self, columns: list[str]) -> Iterator[dict]:
        """The rows of every shard, in plan order, holding only ``columns``."""
        for path in self.shards():
            with self.fs.open_input_file(path) as f:
                file = pq.ParquetFile(f)
                for g in range(file.num_row_groups):
                    yield from file.read_row_group(g, columns=columns).to_pylist()

    def pq_total(self, categories: CategoryTable) -> PQAccumulator:
        """The PQ statistics of every sealed shard, from their footers."""
        acc = PQAccumulator(categories)
        for path in self.shards():
            with self.fs.open_input_file(path) as f:
                meta = pq.read_metadata(f).metadata or {}
            if PQ_KEY in meta:
                add_state(acc, json.loads(meta[PQ_KEY]))
        return acc


# ------------------------------------------------------------------------------ exports


class _JsonArrays:
    """A JSON object of arrays streamed to a file: ``open`` each array, ``add`` its items."""

    def __init__(self, stream):
        self.stream, self.first, self.open_key = stream, True, None
        stream.write(b"{")

    def open(self, key: str) -> None:
        self._close_array()
        self.stream.write(("" if self.first else ",").encode() + json.dumps(key).encode() + b":[")
        self.first, self.open_key, self.items = False, key, 0

    def add(self, item) -> None:
        self.stream.write((b"," if self.items else b"") + json.dumps(item).encode())
        self.items += 1

    def value(self, key: str, value) -> None:
        self._close_array()
        self.stream.write(("" if self.first else ",").encode() + json.dumps(key).encode() + b":"
                          + json.dumps(value).encode())
        self.first = False

    def _close_array(self) -> None:
        if self.open_key is not None:
            self.stream.write(b"]")
            self.open_key = None

    def close(self) -> None:
        self._close_array()
        self.stream.write(b"}")


def _stream_json(store: LabelStore, name: str, write) -> None:
    """Write a JSON document through ``write(_JsonArrays)`` to a temporary name, then move it
    into place."""
    path = store.path(name)
    tmp = f"{path}{storage.TMP_MARK}{os.getpid()}"
    with store.fs.open_output_stream(tmp) as f:
        doc = _JsonArrays(f)
        write(doc)
        doc.close()
    store.fs.move(tmp, path)


def _write_images(doc: _JsonArrays, store: LabelStore) -> None:
    """The ``images`` array of a COCO file: one entry per labeled image, in shard order."""
    doc.open("images")
    for r in store.rows(["image_id", "file_name", "height", "width", "status"]):
        if r["status"] == "labeled":
            doc.add({"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                     "width": r["width"]})


def export_coco_panoptic(store: LabelStore, categories: list[dict], pngs: bool) -> int:
    """``predictions.json`` (and, with ``pngs``, ``panoptic/<key>.png`` for each labeled image
    whose PNG is missing or of another size), streamed from the shards. Returns the images."""
    count = 0

    def write(doc):
        nonlocal count
        _write_images(doc, store)
        doc.open("annotations")
        columns = ["key", "image_id", "status", "segments"] + (["png"] if pngs else [])
        for r in store.rows(columns):
            if r["status"] != "labeled":
                continue
            if pngs:
                target = store.path(PANOPTIC_DIR, r["key"] + ".png")
                info = store.fs.get_file_info(target)
                if info.type != pafs.FileType.File or info.size != len(r["png"]):
                    store.write_png(r["key"], r["png"])
            doc.add({"image_id": r["image_id"], "file_name": r["key"] + ".png",
                     "segments_info": [{k: s[k] for k in ("id", "category_id", "iscrowd", "area", "bbox")}
                                       | {"score": round(float(s["score"]), 4)} for s in r["segments"]]})
            count += 1
        doc.value("categories", categories)
    _stream_json(store, PREDICTIONS, write)
    return count


def export_coco_instances(store: LabelStore, categories: list[dict]) -> int:
    """``instances.json``: COCO instances of the thing segments, masks as RLE (pycocotools'
    compressed counts), with their scores, so that detection frameworks can train on them.
    Returns the instances."""
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
    _stream_json(store, INSTANCES, write)
    return count


def export_rejects(store: LabelStore, input_uri: str) -> int:
    """``rejects.json``: [{file, image_id, reason}] of the images that could not be labeled."""
    count = 0

    def write(doc):
        nonlocal count
        doc.open("rejected")
        for r in store.rows(["key", "file_name", "image_id", "status", "reason"]):
            if r["status"] == "rejected":
                doc.add({"file": r["file_name"], "key": r["key"], "image_id": r["image_id"], "reason": r["reason"]})
                count += 1
        doc.value("input", input_uri)
    _stream_json(store, REJECTS, write)
    return count


def export_review(store: LabelStore, n: int) -> int:
    """``review.csv``: the ``n`` labeled images of lowest quality, lowest first, with their PQ
    when there was ground truth and their least confident segment. Returns the rows written."""
    worst: list[tuple] = []            # a max-heap of the n lowest, by -quality
    for r in store.rows(["index", "key", "file_name", "image_id", "status", "quality", "pq", "segments"]):
        if r["status"] != "labeled":
            continue
        item = (-r["quality"], -r["index"], r)
        if len(worst) < n:
            heapq.heappush(worst, item)
        elif n and item > worst[0]:
            heapq.heapreplace(worst, item)
    rows = [r for _, _, r in sorted(worst, reverse=True)]
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["rank", "key", "file_name", "image_id", "quality", "pq", "least_confident_segment",
                  "its_category_id", "its_score"])
    for rank, r in enumerate(rows, start=1):
        low = min(r["segments"], key=lambda s: s["score"], default=None)
        out.writerow([rank, r["key"], r["file_name"], r["image_id"], f"{r['quality']:.4f}",
                      "" if r["pq"] is None else f"{r['pq']:.4f}", "" if low is None else low["id"],
                      "" if low is None else low["category_id"], "" if low is None else f"{low['score']:.4f}"])
    storage.write_bytes_atomic(store.fs, store.path(REVIEW), buf.getvalue().encode())
    return len(rows)


def count_rows(store: LabelStore) -> dict:
    """{"labeled", "rejected"} over the shards, from one column."""
    counts = {"labeled": 0, "rejected": 0}
    for r in store.rows(["status"]):
        counts[r["status"]] += 1
    return counts


def write_json(store: LabelStore, name: str, doc) -> None:
    storage.write_bytes_atomic(store.fs, store.path(name), (json.dumps(doc, indent=1) + "\n").encode())

