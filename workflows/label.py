"""Batch labeling: a registered model over a folder, a list file or shards, as a Ray Data job.

The driver lists the input (``pipeline.image_sources``), reads which images earlier runs
finished (``pipeline.predictions``), and sends the rest through ``map_batches`` on a pool of
``workers`` actors (``num_gpus=gpus_per_worker`` each). Each actor loads the registered model
once with plain ``mlflow.pyfunc.load_model`` (the registry contract of ``workflows.pyfunc``),
and per batch reads the image bytes (from the files, or from the shards' row groups that hold
the batch's rows), predicts, writes each PNG and then the batch's record. An unreadable image
(missing, corrupt, truncated) is rejected with its reason and the job goes on. The driver counts images on a progress bar, then
builds ``predictions.json`` and ``rejects.json`` from the records, draws the overlays of the
first N images, and with ground truth computes PQ with the file evaluator
(``workflows.evaluate``, panopticapi's rules) on the labeled images.

Killing a job and running it again labels every image exactly once: see ``pipeline.predictions``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pyarrow.fs as pafs

from pipeline import coco
from pipeline.image_sources import (ImageSource, InputImage, open_source, read_image_file,
                                    read_shard_images)
from pipeline.predictions import METRICS, OVERLAY_DIR, PANOPTIC_DIR, PREDICTIONS, PredictionStore

POOL_MIN_IMAGES = 256  # PQ of fewer labeled images runs in one process


class Labeler:
    """Ray Data actor: the registered model, loaded once; a batch of rows in (``key``,
    ``image_id``, ``file_name`` and either ``uri``, an image file, or ``shard``, the shard that
    holds the image), one row per image out (``key``, ``status`` "labeled" / "rejected")."""

    def __init__(self, model_uri: str, tracking_uri: str, out_uri: str, batch_size: int, threads: int):
        import mlflow.pyfunc
        import torch

        from workflows.tracking import configure

        torch.set_num_threads(threads)
        configure(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.batch_size = batch_size
        self.store = PredictionStore(out_uri)

    def _predict(self, rows: list[dict]) -> list[tuple[dict, dict | str]]:
        """(row, prediction row or the reason it failed) for each row. The batch goes to the
        model at once; if that fails, image by image, so that one bad image fails alone."""
        import pandas as pd

        def run(chunk):
            df = pd.DataFrame({"image": [r["bytes"] for r in chunk],
                               "image_id": [int(r["image_id"]) for r in chunk]})
            return self.model.predict(df, params={"batch_size": self.batch_size}).to_dict("records")

        try:
            return list(zip(rows, run(rows)))
        except Exception:
            out = []
            for r in rows:
                try:
                    out.append((r, run([r])[0]))
                except Exception as e:  # a bad image must not stop the job: it is rejected
                    out.append((r, f"{type(e).__name__}: {e}"))
            return out

    def __call__(self, batch):
        import pandas as pd

        labeled, rejected, readable = [], [], []
        rows = batch.to_dict("records")
        if not rows:
            return pd.DataFrame({"key": [], "status": []})
        for row, data in zip(rows, _read_images(rows)):
            source = row["uri"] or f"{row['shard']} ({row['file_name']})"
            entry = {"key": row["key"], "image_id": int(row["image_id"]), "file": source}
            if isinstance(data, str):
                rejected.append({**entry, "reason": data})
            else:
                readable.append({**row, "bytes": data, "entry": entry})
        for row, pred in self._predict(readable):
            if isinstance(pred, str):
                rejected.append({**row["entry"], "reason": pred})
                continue
            self.store.write_png(row["key"], pred["panoptic_png"])
            labeled.append({"key": row["key"], "image_id": int(row["image_id"]),
                            "file_name": row["file_name"], "height": int(pred["height"]),
                            "width": int(pred["width"]), "segments_info": json.loads(pred["segments_info"])})
        self.store.commit(labeled, rejected)
        return pd.DataFrame({"key": [r["key"] for r in labeled] + [r["key"] for r in rejected],
                             "status": ["labeled"] * len(labeled) + ["rejected"] * len(rejected)})


def _read_images(rows: list[dict]) -> list[bytes | str]:
    """The encoded bytes of each row's image, or why they cannot be read. Shard rows are read
    shard by shard, one read per shard for the whole batch."""
    wanted: dict[str, list[int]] = {}
    for r in rows:
        if r["shard"]:
            wanted.setdefault(r["shard"], []).append(int(r["image_id"]))
    from_shards: dict[str, dict[int, bytes] | str] = {}
    for shard, ids in wanted.items():
        try:
            from_shards[shard] = read_shard_images(shard, ids)
        except OSError as e:
            from_shards[shard] = f"cannot read shard {shard} ({e})"
    out = []
    for r in rows:
        if r["uri"]:
            try:
                out.append(read_image_file(r["uri"]))
            except OSError as e:
                out.append(f"cannot read the file ({e})")
            continue
        got = from_shards[r["shard"]]
        out.append(got if isinstance(got, str) else
                   got.get(int(r["image_id"]), f"image {r['image_id']} is not in shard {r['shard']}"))
    return out


def _categories(gt: dict | None, source: ImageSource) -> list[dict]:
    """For predictions.json and the overlays: the ground truth's, else the manifest's, else
    COCO's (the model's category ids are COCO ids)."""
    if gt is not None:
        return coco.CategoryTable.from_json(gt["categories"], "ground truth").to_json()
    if source.categories is not None:
        return source.categories
    from pipeline.synth import coco_categories

    return coco_categories().to_json()


def _image_bytes(im: InputImage) -> bytes:
    if im.uri is not None:
        return read_image_file(im.uri)
    return read_shard_images(im.shard, [im.image_id])[im.image_id]


def draw_overlays(store: PredictionStore, source: ImageSource, labeled: dict[str, dict],
                  categories: list[dict], n: int) -> int:
    """Overlays (``pipeline.visualize.overlay``) of the first ``n`` labeled images of the input
    that have none yet; ``labeled``: the store's labeled records. Returns how many were drawn."""
    import io

    from PIL import Image

    from ciae.predictor import decode_rgb
    from pipeline.panoptic_png import decode_id_png
    from pipeline.visualize import overlay

    if n <= 0:
        return 0
    drawn = 0
    for im in [im for im in source.images if im.key in labeled][:n]:
        if store.fs.get_file_info(store.path(OVERLAY_DIR, im.key + ".png")).type == pafs.FileType.File:
            continue
        image = decode_rgb(_image_bytes(im))
        ids = decode_id_png(coco.read_bytes(store.fs, store.path(PANOPTIC_DIR, im.key + ".png")))
        buf = io.BytesIO()
        Image.fromarray(overlay(image, ids, labeled[im.key]["segments_info"], categories)).save(buf, format="PNG")
        store.write_overlay(im.key, buf.getvalue())
        drawn += 1
    return drawn


def evaluate_labeled(store: PredictionStore, labeled: dict[str, dict], gt: dict, gt_dir: str) -> dict:
    """PQ of the labeled images against the ground truth (``workflows.evaluate.evaluate`` on the
    ground-truth images that have a prediction), plus ``images``: {"evaluated", "ground_truth",
    "without_prediction"}. Written to ``metrics.json``. Under ``POOL_MIN_IMAGES`` images it runs
    in this process: a worker pool costs more to start than it saves."""
    from workflows.evaluate import evaluate, write_metrics

    ids = {int(r["image_id"]) for r in labeled.values()}
    subset = {**gt, "images": [im for im in gt["images"] if int(im["id"]) in ids],
              "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in ids]}
    with tempfile.TemporaryDirectory() as tmp:
        gt_json = os.path.join(tmp, "ground_truth.json")
        with open(gt_json, "w") as f:
            json.dump(subset, f)
        metrics = evaluate(gt_json, gt_dir, store.uri_of(PREDICTIONS), store.uri_of(PANOPTIC_DIR),
                           workers=1 if len(subset["images"]) < POOL_MIN_IMAGES else None)
    metrics["images"] = {"evaluated": len(subset["images"]), "ground_truth": len(gt["images"]),
                         "without_prediction": len(gt["images"]) - len(subset["images"])}
    write_metrics(store.uri_of(METRICS), metrics)
    return metrics


def label(model_uri: str, input_uri: str, out_uri: str, *, tracking_uri: str | None = None,
          address: str | None = None, workers: int = 1, batch_size: int = 8,
          gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, gt_json: str | None = None,
          gt_dir: str | None = None, overlays: int = 0, progress: bool = True) -> dict:
    """Label ``input_uri`` (folder, list file or shards) with ``model_uri`` (``models:/NAME@ALIAS``
    or any MLflow model URI) into ``out_uri``; paths or URIs. Re-running resumes.

    Returns {"out", "images" (in the input), "labeled", "rejected", "pending" (totals over all
    runs), "skipped" (finished before this run), "processed" (by this run), "seconds",
    "images_per_second" (this run's labeling stage), "overlays" (drawn by this run),
    "metrics" (PQ summary with ground truth, else None)}."""
    import mlflow

    from workflows.tracking import configure

    if workers < 1 or batch_size < 1 or overlays < 0 or gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ValueError("workers and batch_size must be >= 1, overlays and gpus_per_worker >= 0, "
                         "cpus_per_worker > 0")
    if (gt_json is None) != (gt_dir is None):
        raise ValueError("give both gt_json and gt_dir, or neither")
    # actors may run in another folder: local paths travel absolute
    input_uri, out_uri, gt_json, gt_dir = (p if p is None or "://" in p else os.path.abspath(p)
                                           for p in (input_uri, out_uri, gt_json, gt_dir))
    tracking = configure(tracking_uri)
    try:
        mlflow.models.get_model_info(model_uri)
    except Exception as e:
        raise ValueError(f"{model_uri}: no such model in {tracking} ({type(e).__name__}: {e})") from None

    gt = coco.read_json(gt_json, "ground-truth JSON") if gt_json else None
    gt_ids = {os.path.basename(im["file_name"]): int(im["id"]) for im in gt["images"]} if gt else None
    source = open_source(input_uri, gt_ids)
    categories = _categories(gt, source)
    store = PredictionStore(out_uri)
    store.create()
    finished, _ = store.records()
    todo = [im for im in source.images if im.key not in finished]

    start = time.perf_counter()
    if todo:
        from tqdm import tqdm

        from pipeline.ray_runtime import connect

        with connect(address):
            import ray.data

            items = [{"key": im.key, "image_id": im.image_id, "file_name": im.file_name,
                      "uri": im.uri or "", "shard": im.shard or ""} for im in todo]
            per_task = max(1, min(batch_size, -(-len(items) // workers)))   # work for every actor
            blocks = min(-(-len(items) // per_task), 2000)
            ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                Labeler, batch_size=per_task, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking, "out_uri": out_uri,
                                       "batch_size": batch_size, "threads": max(1, int(cpus_per_worker))})
            with tqdm(total=len(todo), unit="img", desc="label", disable=not progress) as bar:
                for done in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    bar.update(done.num_rows)
    seconds = time.perf_counter() - start

    labeled, rejected = store.records()
    counts = store.finalize(source.images, categories, (labeled, rejected))
    summary = {"out": out_uri, "images": len(source.images), **counts,
               "skipped": len(source.images) - len(todo), "processed": len(todo),
               "seconds": seconds, "images_per_second": len(todo) / seconds if todo and seconds > 0 else None,
               "overlays": draw_overlays(store, source, labeled, categories, overlays), "metrics": None}
    if gt is not None:
        summary["metrics"] = evaluate_labeled(store, labeled, gt, gt_dir)
    return summary
