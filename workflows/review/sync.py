"""The review queue in an annotation tool, Label Studio: push and pull (the tool's side in
``workflows.review.client``, the conversions of segments to and from brush regions in
``workflows.review.convert``).

``push`` sends the N least confident labeled images of a labeling output (``pipeline.label.store``;
the order of ``_review.csv``: quality, lowest first) to a Label Studio project, which it creates
when there is none of that title, with a labeling config naming the output's categories.

* The images are uploaded (``client.upload``: their bytes, whatever the input was), then one
  import per batch creates the tasks, ``data = {image: the upload's URL, ciae_key, ciae_image_id,
  ciae_file_name, ciae_quality}``, each with one prediction (``convert.prediction_of``: every
  segment as a brush region; its score is the image's quality).
* Idempotent: the keys of the project's tasks (``data.ciae_key``) are read first and those
  images are skipped, so a second push of the same output adds nothing (one project per review
  round: an image already in the project is not pushed again, even from another output).

``pull`` reads the tasks back into COCO panoptic (PNGs + JSON; ``convert.panoptic_png``). By
default it reads each task's latest annotation and skips (and lists) tasks whose latest
annotation was cancelled ("skipped" in the tool) or that have none; ``source="predictions"``
reads the pushed predictions instead (the round trip's check).

Speed (~100 images/s each way with 2 cores and a local server, ``benchmarks/review``): the
converter is pure Python, so ``workers`` processes (default: one per CPU) encode the predictions
while the images upload, and decode them on pull.

Lineage: ``panoptic.json``'s ``info.ciae_review`` names where the annotations came from (``url``,
``project``, ``project_id``, ``from``: annotations or predictions, ``labels``: the labeling
output, ``pulled``: when). ``ciae prepare`` keeps it in the manifest (``source.review``), and
``ciae train`` on those shards tags the run and its registered model version with it
(``ciae.review.*``), beside the ``--init`` model (``ciae.init*``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import pyarrow as pa

from pipeline.data import storage
from pipeline.data.storage import public_uri
from pipeline.label.exports import least_confident_indices
from pipeline.label.sources import Plan, load_plan
from pipeline.label.store import LabelStore
from workflows.review.client import (IMAGE, IMAGE_TYPES, KEY, ReviewError, connect, ensure_project,
                                     find_project, import_tasks, project_keys, project_tasks, upload)
from workflows.review.convert import panoptic_png, prediction_of

REVIEW_INFO = "ciae_review"  # pull's provenance in panoptic.json's info: prepare's manifest and training keep it
BATCH = 32                  # images per upload and per task import


# ------------------------------------------------------------------------------ the workers

def default_workers() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _pool(workers: int):
    """An ordered ``map`` over ``workers`` processes, or the builtin ``map`` for one. The pool's
    map submits every item at once, so that they run while this process talks to the server. Its
    workers fork from a server process that imports the converters (``convert`` and the tool's,
    ~1 s of CPU: the SDK's converter package imports nltk and scipy), started here so that it does
    so while the caller connects; forking from it is as safe as spawning (nothing inherited from a
    threaded parent) without paying the imports per worker."""
    if workers <= 1:
        yield map
        return
    import multiprocessing
    import multiprocessing.forkserver
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["workflows.review.convert", "label_studio_sdk.converter.brush"])
        multiprocessing.forkserver.ensure_running()
    else:
        context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield pool.map


# ------------------------------------------------------------------------------ the output

def open_output(labels: str) -> tuple[LabelStore, Plan, list[dict]]:
    """(store, plan, categories) of a labeling output; ReviewError when it is not one."""
    from pipeline.label.sources import categories_of

    store = LabelStore(labels)
    plan = load_plan(store.plan_uri)
    if plan is None or not store.sealed():
        raise ReviewError(f"{labels}: no labels there (run `ciae label` first)")
    return store, plan, categories_of(plan)


def _rows(store: LabelStore, plan: Plan, indices: list[int]) -> Iterator[dict]:
    """The rows of these plan indices, read from their tasks' shards only."""
    import pyarrow.compute as pc

    from pipeline.label.store import task_name

    columns = ["index", "key", "image_id", "file_name", "height", "width", "png", "segments", "quality"]
    tasks: dict[int, list[int]] = {}
    for i in indices:
        tasks.setdefault(plan.locate(i)[0], []).append(i)
    for task, wanted in sorted(tasks.items()):
        table = storage.read_parquet(store.uri_of(store.layout.labels, task_name(task) + ".parquet"),
                                     columns=columns)
        yield from table.filter(pc.is_in(table["index"], value_set=pa.array(wanted, pa.int64()))).to_pylist()


def _entries(plan: Plan, indices: list[int]) -> dict[int, dict]:
    """Plan index -> plan entry, each task file read once."""
    by_task: dict[int, list[tuple[int, int]]] = {}
    for i in indices:
        task, row = plan.locate(i)
        by_task.setdefault(task, []).append((i, row))
    out = {}
    for task, items in by_task.items():
        entries = Plan.read_task(plan.dir, task)
        for i, row in items:
            out[i] = entries[row]
    return out


def _image_name(key: str, file_name: str, data: bytes) -> str:
    ext = os.path.splitext(file_name)[1].lower()
    if ext not in IMAGE_TYPES:
        ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    return key.replace("/", "__") + ext


@dataclass
class PushResult:
    project_id: int
    project: str
    selected: int           # the n least confident labeled images
    pushed: int             # new tasks
    present: int            # already in the project (skipped)

    def line(self) -> str:
        return (f"{self.pushed} images pushed to project {self.project!r} (id {self.project_id}), "
                f"{self.present} already there, of the {self.selected} least confident")


def push(labels: str, url: str, token: str | None, project: str, n: int, model_version: str = "ciae",
         progress: bool = True, batch: int = BATCH, workers: int | None = None) -> PushResult:
    """Send the ``n`` least confident images of the labeling output ``labels`` to the project
    titled ``project`` on the Label Studio at ``url`` (see the module docstring); the predictions
    are encoded by ``workers`` processes (default: one per CPU) while the images upload."""
    from tqdm import tqdm

    from pipeline.label.stages import load_entry, read_shard_rows

    if n < 1:
        raise ReviewError(f"--n {n}: push at least one image")
    store, plan, categories = open_output(labels)
    with _pool(min(workers or default_workers(), n)) as mapped:
        client = connect(url, token)
        proj = ensure_project(client, project, categories)
        names = {int(c["id"]): c["name"] for c in categories}
        present = project_keys(client, proj.id)
        chosen = least_confident_indices(store, n)       # job.json's review rows when they suffice
        rows = {r["index"]: r for r in _rows(store, plan, chosen)}
        todo = [i for i in chosen if rows[i]["key"] not in present]
        entries = _entries(plan, todo)
        predictions = mapped(partial(prediction_of, names=names, model_version=model_version),
                             (rows[i] for i in todo))
        with tqdm(total=len(todo), unit="img", desc="push", disable=not progress) as bar:
            for start in range(0, len(todo), batch):
                part = todo[start:start + batch]
                shard_rows = read_shard_rows([entries[i] for i in part])
                files = []
                for i in part:
                    data, _ = load_entry(entries[i], shard_rows)
                    files.append((_image_name(rows[i]["key"], rows[i]["file_name"], data), data))
                urls = upload(client, proj.id, files)
                tasks = []
                for i, image_url in zip(part, urls):
                    r = rows[i]
                    tasks.append({"data": {IMAGE: image_url, KEY: r["key"], "ciae_image_id": int(r["image_id"]),
                                           "ciae_file_name": r["file_name"], "ciae_quality": float(r["quality"])},
                                  "predictions": [next(predictions)]})
                import_tasks(client, proj.id, tasks)
                bar.update(len(part))
    return PushResult(proj.id, project, len(chosen), len(todo), len(chosen) - len(todo))


# ------------------------------------------------------------------------------ back

def _to_pull(client, project_id: int, source: str) -> tuple[list[tuple[dict, tuple]], list[dict]]:
    """The project's tasks that have regions to pull, as (task data, (regions, height, width)),
    and the others as skipped: [{key, why}]."""
    todo, skipped = [], []
    for t in project_tasks(client, project_id, fields="all"):
        data = t.get("data") or {}
        if KEY not in data:
            continue
        key, items = data[KEY], t.get(source) or []
        if source == "annotations":
            items = sorted(items, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
        if not items:
            skipped.append({"key": key, "why": f"no {source[:-1]}"})
            continue
        latest = items[-1]
        if latest.get("was_cancelled"):
            skipped.append({"key": key, "why": "skipped by the reviewer"})
            continue
        results = latest.get("result") or []
        sizes = {(int(r["original_height"]), int(r["original_width"])) for r in results if "original_height" in r}
        if not sizes:
            skipped.append({"key": key, "why": "no regions"})
            continue
        if len(sizes) > 1:
            raise ReviewError(f"task {t['id']} ({key}): regions of several image sizes {sorted(sizes)}")
        (h, w), = sizes
        todo.append((data, (results, h, w)))
    return todo, skipped


def pull(labels: str, url: str, token: str | None, project: str, out: str, source: str = "annotations",
         progress: bool = True, workers: int | None = None) -> dict:
    """Write ``out/panoptic/<key>.png``, ``out/panoptic.json`` (COCO panoptic) and
    ``out/skipped.json`` ({"skipped": [{key, why}]}) from the tasks of the project (see the
    module docstring); the regions are decoded by ``workers`` processes (default: one per CPU).
    Returns {"images", "skipped", "json"}."""
    from tqdm import tqdm

    if source not in ("annotations", "predictions"):
        raise ReviewError(f"source {source!r}: annotations or predictions")
    _, _, categories = open_output(labels)
    images, annotations = [], []
    with _pool(workers or default_workers()) as mapped:
        client = connect(url, token)
        proj = find_project(client, project)
        if proj is None:
            raise ReviewError(f"{url}: no project {project!r}")
        todo, skipped = _to_pull(client, proj.id, source)
        maps = mapped(partial(panoptic_png, categories=categories), (job for _, job in todo))
        for (data, (_, h, w)), (png_bytes, segments) in tqdm(zip(todo, maps), total=len(todo), unit="img",
                                                             desc="pull", disable=not progress):
            png = data[KEY] + ".png"
            storage.write_uri(storage.join(out, "panoptic", png), png_bytes)
            image_id = int(data.get("ciae_image_id", len(images) + 1))
            images.append({"id": image_id, "file_name": data.get("ciae_file_name", data[KEY]), "height": h,
                           "width": w})
            annotations.append({"image_id": image_id, "file_name": png, "segments_info": segments})
    provenance = {"url": url.rstrip("/"), "project": project, "project_id": proj.id, "from": source,
                  "labels": public_uri(labels), "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc = {"info": {"description": f"ciae review pull of project {project!r} ({source})", REVIEW_INFO: provenance},
           "images": images, "annotations": annotations, "categories": categories}
    storage.write_uri(storage.join(out, "skipped.json"), json.dumps({"skipped": skipped}).encode())
    storage.write_uri(storage.join(out, "panoptic.json"), json.dumps(doc).encode())
    return {"images": len(images), "skipped": skipped, "json": storage.join(out, "panoptic.json")}
