"""Labeling's stages, as the streaming Ray Data job of ``workflows.jobs.label`` runs them (beside
``pipeline.data.prepare``'s): ``chunks`` -> ``decode`` (CPU tasks) -> ``Labeler`` (the model actors)
-> ``encode`` (CPU tasks). Each takes and gives a Ray Data batch in the "numpy" format: a dict
of columns, each an array of N rows; lists and dicts ride in object arrays (Ray Data stores them
as Arrow lists and structs, and gives lists back as object arrays).

* ``input_items`` (the driver): the pending tasks as the job's items, one per task (a job of
  fewer tasks than model actors has its tasks split into slices, so that each actor gets input).
* ``chunks`` (``flat_map``): an item -> its plan entries not yet labeled, in chunks of at most
  ``DECODE_BATCH``; the task's plan file is read once per item, here.
* ``decode``: a chunk -> one row per image: the image read (files behind URIs ``READ_THREADS``
  at a time), decoded (a large JPEG at a reduced scale) and resized to the model's test size,
  or rejected with the reason, and its ground truth when there is one.
* ``Labeler``: the model, built once per actor from the checkpoint's bytes; decoded rows (a call
  of ``actor_rows``: several model batches) -> their id maps at the images' own sizes, segments
  (with scores) and quality, the next model batch submitted before the last one's results are
  taken.
* ``encode``: labeled rows -> COCO panoptic PNGs, RLE of the thing segments, PQ against the
  ground truth; each task's rows written as one part (``pipeline.label.store``) -> per part its
  task, keys and PQ statistics, for the driver.

Nothing here imports MLflow; Ray only to resolve the checkpoint's object reference in an actor.
"""

from __future__ import annotations

import json

import numpy as np

from ciae.config import InputConfig
from ciae.data.panoptic import CategoryTable
from pipeline.data import storage
from pipeline.label.sources import Plan
from pipeline.label.store import LabelStore

DECODE_BATCH = 64             # images per decode task call, and at most per model actor call
READ_THREADS = 8              # a decode call's reads of files behind URIs in flight at once
WORKER_MEMORY = 512 * 2**20   # a Ray worker process with numpy, PIL and torch imported


def decode_memory(input_cfg: InputConfig) -> int:
    """Bytes a decode task declares: a worker with torch loaded, and a batch of images at the
    largest test size, twice over (which also keeps Ray Data from fusing it into the actors)."""
    return WORKER_MEMORY + DECODE_BATCH * 2 * 3 * input_cfg.max_size ** 2


def _column(values: list) -> np.ndarray:
    """A list of Python objects (lists, dicts, bytes) as a 1-D object array."""
    out = np.empty(len(values), dtype=object)
    for k, v in enumerate(values):      # (a slice assignment would read nested lists as a 2-D array)
        out[k] = v
    return out


# --------------------------------------------------------------------------- chunks


def input_items(todo: dict[int, int], pieces: int) -> list[dict]:
    """The job's input, one item per pending task: ``{"task", "part", "parts"}``. ``todo``: task ->
    images left in it. A task is split into ``parts`` contiguous slices of its images only while
    there are fewer than ``pieces`` items (the largest share split first, never into a slice of
    no image): a job of few tasks then still gives each of ``pieces`` model actors its own input.
    A task with nothing left gets no item."""
    parts = {t: 1 for t, n in todo.items() if n > 0}
    while parts and sum(parts.values()) < pieces:
        t = max(parts, key=lambda t: todo[t] / parts[t])
        if parts[t] + 1 > todo[t]:
            break
        parts[t] += 1
    return [{"task": t, "part": j, "parts": p} for t, p in parts.items() for j in range(p)]


def actor_rows(batch_size: int, todo: int, actors: int, task_images: int) -> int:
    """Rows per model actor call (the actor stage's Ray Data batch): whole model batches of
    ``batch_size``, as many as ``DECODE_BATCH`` holds (at least one), so that an actor has the
    next batch to start while it finishes one (``Labeler``); no more than each of ``actors``
    actors' share of ``todo`` images, since Ray Data gathers a call's rows before it hands them
    to an actor (a call larger than the share would give a small job to one actor); and no more
    than a task's ``task_images`` (an actor lost mid-call redoes its call)."""
    return batch_size * max(1, min(DECODE_BATCH // batch_size, todo // (actors * batch_size),
                                   task_images // batch_size))


def chunks(item: dict, plan_dir: str, skip: dict[int, set[str]], credentials: dict[str, str] | None = None
           ) -> list[dict]:
    """Ray Data ``flat_map``: an item of ``input_items`` -> ``[{"task", "entries"}]``: its slice of the
    task's plan rows (``pipeline.label.sources.PLAN_SCHEMA`` dicts, with the plan's ``credentials``) whose
    keys are not in ``skip[task]`` (the images already in its parts), at most ``DECODE_BATCH`` per
    chunk. Reads the task's plan file once (once per slice for a split task)."""
    task, part, parts = int(item["task"]), int(item.get("part", 0)), int(item.get("parts", 1))
    done = skip.get(task, ())
    todo = [e for e in Plan.read_task(plan_dir, task, credentials) if e["key"] not in done]
    todo = todo[part * len(todo) // parts:(part + 1) * len(todo) // parts]
    return [{"task": task, "entries": todo[k:k + DECODE_BATCH]} for k in range(0, len(todo), DECODE_BATCH)]


# --------------------------------------------------------------------------- decode


def read_image(uri: str) -> bytes:
    """The bytes of an input file; FileNotFoundError naming it."""
    try:
        return storage.read_uri(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None


def read_images(uris: list[str]) -> dict[str, bytes | Exception]:
    """URI -> the bytes of the file (``read_image``), or the OSError or ValueError reading it
    raised. Files behind URIs are read ``READ_THREADS`` at a time (a request to an object store
    waits for a round trip), local ones one after the other."""
    def read(uri: str) -> bytes | Exception:
        try:
            return read_image(uri)
        except (OSError, ValueError) as e:
            return e

    if not any("://" in uri for uri in uris):
        return {uri: read(uri) for uri in uris}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(uris, pool.map(read, uris)))


def read_shard_rows(entries) -> dict[tuple[str, int], dict]:
    """(shard, row) -> the row's ``image``, ``panoptic`` (index runs) and ``segments``, for the
    plan entries that name a shard row; one read per shard."""
    wanted: dict[str, list[int]] = {}
    for e in entries:
        if e.get("shard"):
            wanted.setdefault(e["shard"], []).append(int(e["row"]))
    out = {}
    for shard, rows in wanted.items():
        table = storage.read_parquet(shard, columns=["image", "panoptic", "segments"]).take(rows)
        for r, values in zip(rows, table.to_pylist()):
            out[shard, r] = values
    return out


def load_entry(entry: dict, shard_rows: dict, files: dict | None = None) -> tuple[bytes, dict | None]:
    """A plan entry -> (its encoded image, its ground truth or None). Ground truth:
    ``{"runs": index runs (shards) or b"", "png": the id PNG's path or URI (JSON ground truth)
    or "", "segments": [{id, category_id, iscrowd, ...}]}``. ``files``: ``read_images`` of the
    entries' URIs, else the file is read here."""
    if entry.get("shard"):
        row = shard_rows[entry["shard"], int(entry["row"])]
        return row["image"], {"runs": row["panoptic"], "png": "", "segments": row["segments"]}
    gt = None
    if entry.get("gt_png"):
        gt = {"runs": b"", "png": entry["gt_png"], "segments": json.loads(entry["gt_segments"])}
    data = files[entry["uri"]] if files is not None else read_image(entry["uri"])
    if isinstance(data, Exception):
        raise data
    return data, gt


def decode(chunk: dict, input_cfg: InputConfig) -> dict:
    """Ray Data stage (CPU), ``batch_size=1``: one chunk -> its N images' rows:

    ``task``, ``index``, ``image_id`` [N] int64; ``key``, ``file_name`` [N] str; ``image`` [N]
    of [3, h, w] uint8 at the test size ([3, 0, 0] when rejected); ``height``, ``width`` [N]
    int32 (the image's own size, 0 when rejected); ``status`` [N] "ok" or "rejected";
    ``reason`` [N] str; ground truth, when there is one: ``gt_runs`` [N] bytes (a shard's index
    runs) or ``gt_png`` [N] str (an id PNG's URI), ``gt_segments`` [N] of lists of segment dicts
    (else b"", "" and [])."""
    from ciae.data.transform import Transform

    transform = Transform(input_cfg)
    task, entries = int(chunk["task"][0]), list(chunk["entries"][0])
    shard_rows = read_shard_rows(entries)
    files = read_images([e["uri"] for e in entries if not e.get("shard")])
    n = len(entries)
    out = {"task": np.full(n, task, np.int64), "index": np.array([e["index"] for e in entries], np.int64),
           "image_id": np.array([e["image_id"] for e in entries], np.int64),
           "key": np.array([e["key"] for e in entries], dtype=object),
           "file_name": np.array([e["file_name"] for e in entries], dtype=object),
           "height": np.zeros(n, np.int32), "width": np.zeros(n, np.int32)}
    images, status, reason = [], [], []
    gt_runs, gt_png, gt_segments = [b""] * n, [""] * n, [[]] * n
    for k, entry in enumerate(entries):
        try:
            data, gt = load_entry(entry, shard_rows, files)
            if gt is not None:
                gt_runs[k], gt_png[k], gt_segments[k] = gt["runs"], gt["png"], gt["segments"]
            image, (out["height"][k], out["width"][k]) = transform.decode_for_test(data)
            images.append(image)
            status.append("ok")
            reason.append("")
        except (OSError, ValueError) as e:
            images.append(np.zeros((3, 0, 0), np.uint8))
            status.append("rejected")
            reason.append(storage.redact(str(e)))   # recorded: no credential of a URI
    return out | {"image": images, "status": np.array(status, dtype=object), "reason": np.array(reason, dtype=object),
                  "gt_runs": _column(gt_runs), "gt_png": np.array(gt_png, dtype=object),
                  "gt_segments": _column(gt_segments)}


# --------------------------------------------------------------------------- the model


class Labeler:
    """Ray Data model actor: the model built once from a checkpoint file's bytes (``checkpoint``:
    the bytes, or their object reference in Ray's store; ``name`` names it in errors), on the
    device ``pipeline.cluster.ray_runtime.assigned_device`` names, with ``threads`` torch threads.

    A batch of decoded rows in (``decode``'s columns) -> the same rows without ``image``, plus
    ``ids`` [N] of [H, W] int32 id maps at the images' own sizes ([0, 0] when rejected),
    ``segments`` [N] of lists of {id, category_id, iscrowd, area, bbox, score} and ``quality``
    [N] float32. The readable rows go to the model in batches of ``batch_size`` (all at once
    when None), by aspect ratio (``ciae.data.transform.batch_order``: a batch of like shapes
    pads little), each padded (``Predictor.collate``: in page-locked memory on CUDA) and queued on the device
    (``ciae.engine.predictor.Predictor.submit``: the network under bfloat16 autocast and channels-last
    on CUDA with ``amp``, ``compile`` optional, the assignment and the post-processing; only the
    final id maps leave it, in one non-blocking copy) before the previous batch's results are
    taken (``result``): on a GPU the device runs batch k+1 while the host pads it and builds batch
    k's results; on the CPU it is the same computation in the same order."""

    def __init__(self, checkpoint, name: str, threads: int, amp: bool, compile: bool,
                 batch_size: int | None = None):
        import torch

        from ciae import checkpoint as ckpt_io
        from ciae.engine.predictor import Predictor
        from ciae.modeling.model import CIAEModel
        from pipeline.cluster.ray_runtime import assigned_device

        torch.set_num_threads(threads)
        if not isinstance(checkpoint, (bytes, bytearray, memoryview)):    # an ObjectRef
            import ray

            checkpoint = ray.get(checkpoint)
        model = CIAEModel.from_checkpoint(ckpt_io.load(checkpoint, name), assigned_device())
        self.predictor = Predictor(model, amp=amp, compile=compile)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from ciae.data.transform import batch_order

        ok = [k for k, s in enumerate(batch["status"]) if s == "ok"]
        ok = [ok[j] for j in batch_order([batch["image"][k].shape[1:] for k in ok])]    # like shapes together
        n = len(batch["key"])
        ids = [np.zeros((0, 0), np.int32)] * n
        segments, quality = [[]] * n, np.zeros(n, np.float32)
        step = self.batch_size or max(1, len(ok))
        previous = None                             # (rows, pending results) of the batch in flight
        for start in range(0, len(ok) + step, step):    # a round past the last batch takes its results
            rows, submitted = ok[start:start + step], None
            if rows:
                images, test_sizes = self.predictor.collate([batch["image"][k] for k in rows])
                sizes = [(int(batch["height"][k]), int(batch["width"][k])) for k in rows]
                submitted = rows, self.predictor.submit(images, test_sizes, sizes)
            if previous is not None:
                for k, pred in zip(previous[0], previous[1].result()):
                    ids[k], segments[k], quality[k] = pred["panoptic"], pred["segments_info"], pred["quality"]
            previous = submitted
        out = {k: v for k, v in batch.items() if k != "image"}
        return out | {"ids": ids, "segments": _column(segments), "quality": quality}


# --------------------------------------------------------------------------- encode


def encode(batch: dict, store: LabelStore, table: CategoryTable, coco_panoptic: bool) -> dict:
    """Ray Data stage (CPU): labeled rows (``Labeler``'s columns) -> COCO panoptic PNGs, RLE of
    the thing segments, per-image PQ with ground truth, the PNG files when ``coco_panoptic``;
    each task's rows written as one part of ``store``. Returns per part: ``task`` [P] int64,
    ``keys`` [P] of lists of keys, ``pq`` [P] of ``PQAccumulator.to_json`` states (None without
    ground truth). ``table``: the categories, made once by the driver."""
    from pipeline.data.coco import segment_rles
    from pipeline.data.panoptic_png import decode_id_png, encode_id_png
    from pipeline.data.shards import decode_index_runs
    from pipeline.evaluation.pq import PQAccumulator

    things = set(table.thing_ids)
    by_task: dict[int, list[dict]] = {}
    states: dict[int, PQAccumulator] = {}
    for k in range(len(batch["key"])):
        task = int(batch["task"][k])
        row = {"index": int(batch["index"][k]), "key": batch["key"][k], "image_id": int(batch["image_id"][k]),
               "file_name": batch["file_name"][k], "height": int(batch["height"][k]),
               "width": int(batch["width"][k]), "status": "rejected", "reason": batch["reason"][k],
               "png": None, "segments": [], "quality": None, "pq": None, "pq_stats": None}
        if batch["status"][k] == "ok":
            ids = batch["ids"][k]
            segments = [dict(s) for s in batch["segments"][k]]
            thing_ids = [s["id"] for s in segments if s["category_id"] in things]
            rles = dict(zip(thing_ids, segment_rles(ids, thing_ids)))
            for s in segments:
                s["rle"] = rles.get(s["id"])
            row.update(status="labeled", reason="", png=encode_id_png(ids), segments=segments,
                       quality=float(batch["quality"][k]))
            if batch["gt_runs"][k] or batch["gt_png"][k]:
                acc = PQAccumulator(table)
                name = f"image {row['image_id']} ({row['file_name']})"
                gt_segments = list(batch["gt_segments"][k])
                if batch["gt_runs"][k]:
                    index = decode_index_runs(batch["gt_runs"][k], row["height"], row["width"])
                    acc.add_indexed(index, gt_segments, ids, segments, image=name)
                else:
                    acc.add(decode_id_png(storage.read_uri(batch["gt_png"][k])), gt_segments, ids, segments,
                            image=name)
                row.update(pq=acc.summary()["All"]["pq"], pq_stats=json.dumps(acc.to_json()))
                states.setdefault(task, PQAccumulator(table)).merge(acc)
            if coco_panoptic:
                store.write_png(row["key"], row["png"])
        by_task.setdefault(task, []).append(row)
    for task, rows in by_task.items():
        store.write_part(task, rows, pngs=coco_panoptic)
    return {"task": np.array(list(by_task), np.int64),
            "keys": _column([[r["key"] for r in rows] for rows in by_task.values()]),
            "pq": _column([states[t].to_json() if t in states else None for t in by_task])}
