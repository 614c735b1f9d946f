"""Batch labeling with a registered model, shaped for millions of images: a streaming Ray Data job
in three stages, writing Parquet shards exactly once.

1. The input (folder, list file or shards; local or URI) is planned once into tasks of
   consecutive images (``pipeline.image_sources``; re-runs reuse the plan).
2. Ray Data streams the plan of the unfinished images through
   * ``decode`` (CPU tasks): read, decode (grey, palette, CMYK and 16-bit images become RGB),
     resize to the model's test size; a missing, empty, non-image, truncated or over-large file
     is rejected here with its reason;
   * ``Labeler`` (the model actors, ``workers`` of them with ``gpus_per_worker`` each): pad a
     batch, run the network (bfloat16 autocast and channels-last on CUDA; ``compile``
     optional), assign pixels and post-process on the device; only the final id map at the
     image's size leaves it (``ciae.predictor.Predictor.predict_resized``);
   * ``encode`` (CPU tasks): the COCO panoptic PNG, RLE of the thing segments (pycocotools),
     PQ against the ground truth when there is one, the COCO PNG files when asked for, then the
     batch's part of its task.
3. The driver counts finished images on a progress bar (with the running PQ), seals each task
   into its shard once all its images are in, and at the end writes the exports: COCO panoptic
   JSON (streamed), COCO instances JSON, ``rejects.json``, ``review.csv`` (the least confident
   images first), ``metrics.json`` and overlays.

The actors load the registered model through MLflow (``mlflow.pyfunc.load_model``, the same code
and checkpoint as any consumer) and call its predictor on ready batches, not its ``predict`` on
encoded bytes. The model may also be a checkpoint file that ``ciae train`` wrote (a path or URI
that every actor can read); then nothing imports MLflow. Exactly once, whatever is killed: see
``pipeline.label_store``. The driver holds one plan task of bookkeeping per task in flight, never
a record per image.
"""

from __future__ import annotations

import json
import time

from ciae.panoptic import CategoryTable, DatasetError
from pipeline import label_store as ls
from pipeline import storage
from pipeline.image_sources import Plan, load_plan, make_plan
from workflows.jobs import LabelJob

DECODE_BATCH = 64             # images per decode task call
WORKER_MEMORY = 512 * 2**20   # a Ray worker process with numpy, PIL and torch imported
MLFLOW_URIS = ("models:/", "runs:/")


def is_checkpoint(model: str) -> bool:
    """Whether ``model`` names a checkpoint file of ``ciae train`` (a path or filesystem URI)
    rather than an MLflow model (``models:/...``, ``runs:/...``, a logged model's folder)."""
    import pyarrow.fs as pafs

    if model.startswith(MLFLOW_URIS):
        return False
    fs, path = storage.resolve(model)
    return storage.file_type(fs, path) == pafs.FileType.File


def read_checkpoint(uri: str):
    """The checkpoint file at ``uri`` as a ``ciae.finetune.Source`` (``weights_only`` loading);
    ValueError when it is not a checkpoint of this project."""
    import io

    from ciae.backbone import read_weights
    from ciae.finetune import read_source

    source = read_source(read_weights(io.BytesIO(storage.read_uri(uri)), uri), uri)
    if source.kind != "ciae":
        raise ValueError(f"{uri}: a torchvision ResNet state dict, not a trained ciae model")
    return source


# ------------------------------------------------------------------------------- stages


def chunks(item: dict, plan_dir: str, skip: dict[int, set[str]]) -> list[dict]:
    """Ray Data ``flat_map``: a pending task -> its chunks of at most DECODE_BATCH plan rows not
    in ``skip`` (the images already in its parts): {"task", "rows" (positions in the task)}."""
    import pyarrow.parquet as pq

    task = int(item["task"])
    fs, path = storage.resolve(Plan.task_file(plan_dir, task))
    with fs.open_input_file(path) as f:
        keys = pq.read_table(f, columns=["key"])["key"].to_pylist()
    todo = [k for k, key in enumerate(keys) if key not in skip.get(task, ())]
    return [{"task": task, "rows": todo[k:k + DECODE_BATCH]} for k in range(0, len(todo), DECODE_BATCH)]


def decode(chunk: dict, plan_dir: str, input_cfg: dict) -> dict:
    """Ray Data stage (CPU): one chunk of plan rows -> the rows (``index``, ``key``,
    ``file_name``, ``image_id``, ``task``, ...) with ``image`` ([h, w, 3] uint8 at the test size,
    or empty), ``height`` / ``width`` (the image's own size), ``status`` and ``reason``, and for
    shard rows with their ground truth, ``gt_runs`` / ``gt_segments``."""
    import numpy as np
    import pyarrow.parquet as pq

    from ciae.config import InputConfig
    from ciae.transform import Transform, decode_rgb

    transform = Transform(InputConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in input_cfg.items()}))
    task = int(chunk["task"][0])
    fs, path = storage.resolve(Plan.task_file(plan_dir, task))
    with fs.open_input_file(path) as f:
        batch = pq.read_table(f).take(list(chunk["rows"][0])).to_pydict()
    n = len(batch["key"])
    batch["task"] = np.full(n, task, dtype=np.int64)
    for column in ("uri", "shard", "gt_png", "gt_segments"):      # nulls arrive as None or NaN
        batch[column] = np.array([v if isinstance(v, str) else "" for v in batch[column]], dtype=object)
    images, heights, widths, status, reason = [], [], [], [], []
    shard_rows = _read_shard_rows(batch)
    gt_runs, gt_segments = [b""] * n, list(batch["gt_segments"])
    for k in range(n):
        try:
            if batch["shard"][k]:
                row = shard_rows[(batch["shard"][k], int(batch["row"][k]))]
                data = row["image"]
                gt_runs[k], gt_segments[k] = row["panoptic"], json.dumps(row["segments"])
            else:
                data = _read(batch["uri"][k])
            image = decode_rgb(data)
            images.append(transform.resize_for_test(image))
            heights.append(image.shape[0])
            widths.append(image.shape[1])
            status.append("ok")
            reason.append("")
        except (OSError, ValueError) as e:
            images.append(np.zeros((0, 0, 3), np.uint8))
            heights.append(0)
            widths.append(0)
            status.append("rejected")
            reason.append(str(e))
    return {**batch, "image": images, "height": np.array(heights, np.int32),
            "width": np.array(widths, np.int32), "status": np.array(status), "reason": np.array(reason),
            "gt_runs": np.array(gt_runs, dtype=object), "gt_segments": np.array(gt_segments, dtype=object)}


def _read(uri: str) -> bytes:
    try:
        return storage.read_uri(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: file not found") from None


def _read_shard_rows(batch: dict) -> dict[tuple[str, int], dict]:
    """(shard, row) -> the row's image, panoptic and segments, one read per shard."""
    import pyarrow.parquet as pq

    wanted: dict[str, list[int]] = {}
    for shard, row in zip(batch["shard"], batch["row"]):
        if isinstance(shard, str) and shard:
            wanted.setdefault(shard, []).append(int(row))
    out = {}
    for shard, rows in wanted.items():
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["image", "panoptic", "segments"]).take(rows)
        for r, values in zip(rows, table.to_pylist()):
            out[shard, r] = values
    return out


class Labeler:
    """Ray Data model actor: the model loaded once (a registered model through MLflow, or a
    checkpoint file); a batch of decoded images in, their id maps at their own sizes and segments
    (with scores) out."""

    def __init__(self, model_uri: str, tracking_uri: str | None, threads: int, amp: bool, compile: bool):
        import torch

        from ciae.predictor import Predictor

        torch.set_num_threads(threads)
        if is_checkpoint(model_uri):     # checked by the driver (read_checkpoint)
            import io

            from ciae.train import model_from_checkpoint

            from pipeline.ray_runtime import assigned_device

            model = model_from_checkpoint(io.BytesIO(storage.read_uri(model_uri)), assigned_device())
        else:
            import mlflow.pyfunc

            from workflows.tracking import configure

            configure(tracking_uri)
            model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor.model
        self.predictor = Predictor(model, amp=amp, compile=compile)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        ok = [k for k, s in enumerate(batch["status"]) if s == "ok"]
        preds = self.predictor.predict_resized([batch["image"][k] for k in ok],
                                               [(int(batch["height"][k]), int(batch["width"][k])) for k in ok])
        n = len(batch["key"])
        ids = [np.zeros((0, 0), np.int32)] * n
        segments, quality = [""] * n, np.zeros(n, np.float32)
        for k, pred in zip(ok, preds):
            ids[k], segments[k], quality[k] = pred["panoptic"], json.dumps(pred["segments_info"]), pred["quality"]
        out = {k: v for k, v in batch.items() if k != "image"}
        return out | {"ids": ids, "segments": np.array(segments), "quality": quality}


def encode(batch: dict, out_uri: str, categories: list[dict], coco_panoptic: bool) -> dict:
    """Ray Data stage (CPU): labeled rows -> COCO panoptic PNGs, RLE of the thing segments, PQ
    with ground truth; each task's rows written as one part. Returns per part its task, keys
    (JSON) and PQ statistics (JSON)."""
    import numpy as np
    from pycocotools import mask as rle

    from ciae.evaluation.pq import PQAccumulator
    from pipeline.panoptic_png import decode_id_png, encode_id_png
    from pipeline.shards import decode_index_runs

    store = ls.LabelStore(out_uri)
    table = CategoryTable.from_json(categories)
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
            segments = json.loads(batch["segments"][k])
            for s in segments:
                s["rle"] = (rle.encode(np.asfortranarray(ids == s["id"]))["counts"].decode("ascii")
                            if s["category_id"] in things else None)
            row.update(status="labeled", reason="", png=encode_id_png(ids), segments=segments,
                       quality=float(batch["quality"][k]))
            if batch["gt_segments"][k]:
                gt_segments = json.loads(batch["gt_segments"][k])
                acc = PQAccumulator(table)
                name = f"image {row['image_id']} ({row['file_name']})"
                if batch["gt_runs"][k]:
                    index = decode_index_runs(batch["gt_runs"][k], row["height"], row["width"])
                    acc.add_indexed(index, gt_segments, ids, segments, image=name)
                else:
                    acc.add(decode_id_png(storage.read_uri(batch["gt_png"][k])), gt_segments, ids, segments, image=name)
                row.update(pq=acc.summary()["All"]["pq"], pq_stats=json.dumps(ls.pq_state(acc)))
                states.setdefault(task, PQAccumulator(table)).merge(acc)
            if coco_panoptic:
                store.write_png(row["key"], row["png"])
        by_task.setdefault(task, []).append(row)
    out = {"task": [], "keys": [], "pq": []}
    for task, rows in by_task.items():
        store.write_part(task, rows)
        out["task"].append(task)
        out["keys"].append(json.dumps([r["key"] for r in rows]))
        out["pq"].append(json.dumps(ls.pq_state(states[task])) if task in states else "")
    return out


# ------------------------------------------------------------------------------- driver


def _model_input_config(model_uri: str, tracking: str | None) -> dict:
    """The model's InputConfig (test size): a checkpoint file's, else the registered model's, from
    its MLflow metadata or, for a model logged without it, its checkpoint. ValueError when there
    is no such model."""
    if is_checkpoint(model_uri):
        return read_checkpoint(model_uri).config["input"]
    import mlflow

    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as e:
        raise ValueError(f"{model_uri}: no such model in {tracking} ({type(e).__name__}: {e})") from None
    meta = (info.metadata or {}).get("ciae")
    if meta:
        return meta["config"]["input"]
    from ciae.train import load_checkpoint

    local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/artifacts")
    import glob
    import os

    return load_checkpoint(glob.glob(os.path.join(local, "*.pt"))[0])["config"]["input"]


def _plan(job: LabelJob, store: ls.LabelStore) -> Plan:
    """The output's plan: the one written by an earlier run (which must be of this input), or a
    new one."""
    plan_dir = store.uri_of(ls.PLAN_DIR)
    plan = load_plan(plan_dir)
    if plan is None:
        return make_plan(job.input, plan_dir, job.gt_json, job.gt_dir, job.task_images)
    if plan.input != job.input or (plan.ground_truth == "json") != (job.gt_json is not None):
        raise DatasetError(f"{job.out} holds the labels of {plan.input} "
                           f"({'with' if plan.ground_truth == 'json' else 'without'} ground-truth JSON); "
                           "use another --out")
    return plan


def categories_of(plan: Plan) -> list[dict]:
    """The ground truth's or the manifest's categories, else COCO's (the model's ids are COCO's)."""
    if plan.categories is not None:
        return plan.categories
    from pipeline.synth import coco_categories

    return coco_categories().to_json()


def label(job: LabelJob, address: str | None = None, progress: bool = True, labeler=Labeler) -> dict:
    """Run ``job`` on the Ray at ``address`` (default: a local Ray). Re-running resumes.
    ``labeler``: the model stage's actor class (benchmarks replace it with a trivial one).

    Returns {"out", "images" (in the input), "labeled", "rejected", "skipped" (finished before
    this run), "processed" (by this run), "seconds", "images_per_second" (this run's labeling),
    "overlays" (drawn by this run), "review" (rows of review.csv), "metrics" (PQ summary with
    ground truth, else None), "timings" (seconds: plan, scan of what is done, labeling, the
    exports at the end), "stages" (Ray Data's statistics of each stage, text; None when nothing
    was left to label)}."""
    tracking = None
    if not is_checkpoint(job.model):
        from workflows.tracking import configure

        tracking = configure(job.tracking_uri)
    input_cfg = _model_input_config(job.model, tracking)
    store = ls.LabelStore(job.out)
    store.check_writable()
    clock = time.perf_counter()
    plan = _plan(job, store)
    timings = {"plan": time.perf_counter() - clock}
    categories = categories_of(plan)
    table = CategoryTable.from_json(categories)
    store.remove_temporaries()
    if job.retry_rejected:
        for task in sorted(store.sealed()):
            store.unseal_rejected(task)
    sealed = store.sealed()
    partial = {t: store.part_keys(t) for t in store.unsealed_tasks() if t not in sealed}
    for task in list(partial):
        if len(partial[task]) == plan.task_sizes[task]:      # killed between its last part and its seal
            store.seal(task, plan.task_sizes[task], table)
            sealed.add(task)
            del partial[task]
    pending = [t for t in range(len(plan.task_sizes)) if t not in sealed]
    todo = sum(plan.task_sizes[t] - len(partial.get(t, ())) for t in pending)
    start = time.perf_counter()
    timings["scan"] = start - clock - timings["plan"]
    stages = None
    if todo:
        stages = _run(job, tracking, input_cfg, plan, store, categories, table, pending, partial, todo,
                      address, progress, labeler)
    seconds = time.perf_counter() - start
    timings["label"] = seconds

    counts = ls.count_rows(store)
    summary = {"out": job.out, "images": plan.images, **counts, "skipped": plan.images - todo,
               "processed": todo, "seconds": seconds,
               "images_per_second": todo / seconds if todo and seconds > 0 else None,
               "metrics": None, "overlays": 0, "stages": stages}
    if job.coco_panoptic:
        ls.export_coco_panoptic(store, categories, pngs=True)
    if job.coco_instances:
        ls.export_coco_instances(store, categories)
    ls.export_rejects(store, job.input)
    summary["review"] = ls.export_review(store, job.review)
    if plan.ground_truth:
        acc = store.pq_total(table)
        summary["metrics"] = acc.summary() | {"images": {"evaluated": acc.images, "input": plan.images}}
        ls.write_json(store, ls.METRICS, {k: v for k, v in summary["metrics"].items() if k != "per_class"}
                      | {"per_class": {str(k): v for k, v in summary["metrics"]["per_class"].items()}})
    summary["overlays"] = draw_overlays(store, plan, categories, job.overlays)
    summary["timings"] = timings | {"exports": time.perf_counter() - start - seconds}
    return summary


def _run(job: LabelJob, tracking: str | None, input_cfg: dict, plan: Plan, store: ls.LabelStore,
         categories: list[dict], table: CategoryTable, pending: list[int], partial: dict[int, set[str]],
         todo: int, address: str | None, progress: bool, labeler) -> str:
    """The Ray Data job over the pending tasks' images not yet in a part; seals tasks as they
    fill. Returns Ray Data's statistics of the stages."""
    from tqdm import tqdm

    from ciae.evaluation.pq import PQAccumulator
    from pipeline.ray_runtime import connect

    done = {t: set(partial.get(t, ())) for t in pending}
    running = PQAccumulator(table)
    with connect(address):
        import ray
        import ray.data

        total = ray.cluster_resources().get("CPU", 0)
        if job.workers * job.cpus_per_worker > total - 1:
            raise ValueError(f"the model actors would hold {job.workers * job.cpus_per_worker:g} of the "
                             f"cluster's {total:g} CPUs, leaving less than one for decoding and "
                             "encoding; lower --workers or --cpus-per-worker (0.5 shares a CPU)")
        # one item per pending task, expanded into chunks of images by short tasks: no task
        # lives for the whole job (a paced reader would hold its CPU)
        skip = {t: keys for t, keys in partial.items() if keys}
        ds = (ray.data.from_items([{"task": t} for t in pending], override_num_blocks=len(pending))
              .flat_map(chunks, fn_kwargs={"plan_dir": plan.dir, "skip": skip}))
        # decode declares its memory (a worker with torch loaded, and a batch of images at the
        # largest test size, twice over), which also keeps Ray Data from fusing it into the actors
        decode_memory = WORKER_MEMORY + DECODE_BATCH * 2 * 3 * input_cfg["max_size"] ** 2
        ds = (ds.map_batches(decode, batch_size=1, fn_kwargs={"plan_dir": plan.dir, "input_cfg": input_cfg},
                             memory=decode_memory)
              .map_batches(labeler, batch_size=job.batch_size,
                           compute=ray.data.ActorPoolStrategy(size=job.workers),
                           num_cpus=job.cpus_per_worker, num_gpus=job.gpus_per_worker or None,
                           fn_constructor_kwargs={"model_uri": job.model, "tracking_uri": tracking,
                                                  "threads": max(1, int(job.cpus_per_worker)),
                                                  "amp": job.amp, "compile": job.compile})
              .map_batches(encode, batch_size=job.batch_size,
                           fn_kwargs={"out_uri": job.out, "categories": categories,
                                      "coco_panoptic": job.coco_panoptic}))
        with tqdm(total=todo, unit="img", desc="label", disable=not progress) as bar:
            for part in ds.iter_rows():
                task, keys = int(part["task"]), json.loads(part["keys"])
                new = set(keys) - done[task]
                if len(new) == len(keys) and part["pq"]:
                    ls.add_state(running, json.loads(part["pq"]))
                    bar.set_postfix(PQ=f"{100 * running.summary()['All']['pq']:.1f}")
                done[task] |= new
                bar.update(len(new))
                if len(done[task]) == plan.task_sizes[task]:
                    store.seal(task, plan.task_sizes[task], table)
                    del done[task]
        stats = ds.stats()
    unfinished = sorted(done)
    if unfinished:
        raise RuntimeError(f"tasks {unfinished[:10]} did not finish; run the job again to resume them")
    return stats


def draw_overlays(store: ls.LabelStore, plan: Plan, categories: list[dict], n: int) -> int:
    """Panels (image | prediction | ground truth, ``pipeline.visualize.panel``) of the first
    ``n`` labeled images in plan order that have none yet; returns how many were drawn."""
    import io

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from PIL import Image

    from ciae.transform import decode_rgb
    from pipeline.panoptic_png import decode_id_png
    from pipeline.shards import decode_index_runs
    from pipeline.visualize import panel

    drawn = seen = 0
    for r in store.rows(["index", "key", "status", "png", "segments"]):
        if seen >= n:
            break
        if r["status"] != "labeled":
            continue
        seen += 1
        if store.fs.get_file_info(store.path(ls.OVERLAY_DIR, r["key"] + ".png")).type == pafs.FileType.File:
            continue
        task, offset = _locate(plan, r["index"])
        fs, path = storage.resolve(plan.task_path(task))
        with fs.open_input_file(path) as f:
            entry = pq.read_table(f).slice(offset, 1).to_pylist()[0]
        ids = decode_id_png(r["png"])
        gt = None
        if entry["shard"]:
            row = _read_shard_rows({"shard": [entry["shard"]], "row": [entry["row"]]})[entry["shard"], entry["row"]]
            image = decode_rgb(row["image"])
            gt = (decode_index_runs(row["panoptic"], *ids.shape),
                  [{"id": k + 1, "category_id": s["category_id"]} for k, s in enumerate(row["segments"])])
        else:
            image = decode_rgb(_read(entry["uri"]))
            if entry["gt_png"]:
                gt = (decode_id_png(storage.read_uri(entry["gt_png"])), json.loads(entry["gt_segments"]))
        buf = io.BytesIO()
        Image.fromarray(panel(image, ids, r["segments"], categories, gt=gt)).save(buf, format="PNG")
        store.write_overlay(r["key"], buf.getvalue())
        drawn += 1
    return drawn


def _locate(plan: Plan, index: int) -> tuple[int, int]:
    """(task, row in it) of a plan index."""
    for task, size in enumerate(plan.task_sizes):
        if index < size:
            return task, index
        index -= size
    raise IndexError(index)
