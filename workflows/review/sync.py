"""The review queue in an annotation tool: Label Studio, over HTTP through ``label-studio-sdk``.

``push`` sends the N least confident labeled images of a labeling output (``pipeline.label.store``;
the order of ``_review.csv``: quality, lowest first) to a Label Studio project, which it creates
when there is none of that title, with a labeling config naming the output's categories (things
and stuff, COCO names: ``BrushLabels`` over an ``Image``, and a per-region ``crowd`` choice).

* Images are uploaded through the API (``POST /api/projects/<id>/import?commit_to_project=false``
  with the encoded image bytes, which gives file uploads and no tasks), so that it works whatever
  the input was (a local folder, S3 URIs, or prepared shards, whose images exist only inside
  Parquet) and wherever the server runs; referencing local files would need the server to see
  the same disk (``LOCAL_FILES_SERVING_ENABLED``) and shard images written out first.
* Then one import per batch creates the tasks, ``data = {image: the upload's URL, ciae_key,
  ciae_image_id, ciae_file_name, ciae_quality}``, each with one prediction: every segment as a
  brush region in Label Studio's RLE (``label_studio_sdk.converter.brush.mask2rle``, the tool's
  own converter), labeled with its category's name and carrying its score; crowd segments also
  get the per-region ``crowd`` choice. The prediction's score is the image's quality.
* Idempotent: the keys of the project's tasks (``data.ciae_key``) are read first and those
  images are skipped, so a second push of the same output adds nothing (one project per review
  round: an image already in the project is not pushed again, even from another output).

``pull`` reads the tasks back into COCO panoptic (PNGs + JSON): each region's mask decoded with
the converter's ``decode_rle`` and painted in result order into one id map (a later region wins
where two overlap; unpainted pixels are void, id 0); regions of one stuff category merge into one
segment, each thing region is its own segment, ``iscrowd`` from the region's ``crowd`` choice.
By default it reads each task's latest annotation and skips (and lists) tasks whose latest
annotation was cancelled ("skipped" in the tool) or that have none; ``source="predictions"``
reads the pushed predictions instead (the round trip's check). What the format cannot carry:
segment ids (renumbered 1, 2, ... in region order) and per-segment scores of annotations.

Orientation: maps and regions are as viewers show the image, its EXIF orientation applied (as
``ciae.data.transform.decode_rgb`` labels it); the image is uploaded as its bytes are, tag included,
and Label Studio shows it turned the same way (the browser's ``<img>`` applies the tag), so
regions drawn there have the same size.

Speed (~100 images/s each way with 2 cores and a local server, ``benchmarks/review``): the
converter is pure Python (~4 ms an image to encode, ~10 to decode at 256x256), so ``workers``
processes (default: one per CPU) encode the predictions while the images upload, and decode
them on pull. Tasks are imported and listed as JSON through the SDK's HTTP client, not its
typed models, which walk every number of every RLE. Over http every request gets its own
connection (see ``connect``: the tool's development server answers ~40 ms late on a reused
one); over https they are kept alive.

Lineage: ``panoptic.json``'s ``info.ciae_review`` names where the annotations came from (``url``,
``project``, ``project_id``, ``from``: annotations or predictions, ``labels``: the labeling
output, ``pulled``: when). ``ciae prepare`` keeps it in the manifest (``source.review``), and
``ciae train`` on those shards tags the run and its registered model version with it
(``ciae.review.*``), beside the ``--init`` model (``ciae.init*``).

The token is a Label Studio personal access token (a JWT refresh token; the SDK trades it for
access tokens) or a legacy token where the organization allows them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from pipeline.data import storage
from pipeline.data.storage import public_uri
from pipeline.label.exports import least_confident
from pipeline.label.sources import Plan, load_plan
from pipeline.label.store import LabelStore

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
IMAGE = "image"             # the Image tag's name and the task data field of its URL
LABELS = "label"            # the BrushLabels tag
CROWD = "crowd"             # the per-region Choices tag (and its one choice)
KEY = "ciae_key"            # task data: the image's key in the labeling output
REVIEW_INFO = "ciae_review"  # pull's provenance in panoptic.json's info: prepare's manifest and training keep it
BATCH = 32                  # images per upload and per task import
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class ReviewError(ValueError):
    """A user's mistake: bad URL, refused token, not a labeling output, another project's config."""


# ------------------------------------------------------------------------------ the tool

def labeling_config(categories: list[dict]) -> str:
    """Label Studio's labeling config for the categories (COCO panoptic dicts: id, name,
    isthing, color): a brush label per category, things first, and a per-region crowd flag."""
    def label(c):
        color = c.get("color")
        bg = f' background="#{color[0]:02x}{color[1]:02x}{color[2]:02x}"' if color else ""
        kind = "thing" if c.get("isthing") else "stuff"
        return f'    <Label value={quoteattr(c["name"])}{bg} hint="{kind} {int(c["id"])}"/>'

    ordered = sorted(categories, key=lambda c: (not c.get("isthing"), int(c["id"])))
    return "\n".join([
        "<View>",
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true" zoomControl="true"/>',
        f'  <BrushLabels name="{LABELS}" toName="{IMAGE}">',
        *(label(c) for c in ordered),
        "  </BrushLabels>",
        f'  <Choices name="{CROWD}" toName="{IMAGE}" perRegion="true">',
        f'    <Choice value="{CROWD}"/>',
        "  </Choices>",
        "</View>",
    ])


def connect(url: str, token: str | None):
    """A ``label_studio_sdk.LabelStudio`` client whose token the server accepts; ReviewError
    (one line) for a missing token, an unreachable URL or a refused token."""
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    if not token:
        raise ReviewError(f"no Label Studio token: set {TOKEN_ENV} (a personal access token from the "
                          "tool's Account & Settings page)")
    if not url.startswith(("http://", "https://")):
        raise ReviewError(f"{url}: not an http(s) URL of a Label Studio server")
    # Label Studio's own server (``label-studio start``: Django's development server, http only)
    # answers a request on a kept-alive connection ~40 ms late (the last segment of its reply
    # waits, by Nagle's rule, for the client's delayed ACK): over http every request gets a new
    # connection instead, which costs well under a millisecond on a local network
    keepalive = {} if url.startswith("https://") else {"limits": httpx.Limits(max_keepalive_connections=0)}
    client = LabelStudio(base_url=url.rstrip("/"), api_key=token,
                         httpx_client=httpx.Client(timeout=120, follow_redirects=True, **keepalive))
    try:
        client.users.whoami()
    except (httpx.HTTPError, OSError) as e:
        raise ReviewError(f"{url}: cannot reach Label Studio ({type(e).__name__}: {e})") from None
    except ApiError as e:
        if e.status_code in (401, 403):
            raise ReviewError(f"{url}: the token was refused ({e.status_code}: {_detail(e.body)})") from None
        raise ReviewError(f"{url}: not a Label Studio server? ({e.status_code}: {_detail(e.body)})") from None
    except Exception as e:      # a token that is not a JWT and not a legacy one, an HTML page, ...
        raise ReviewError(f"{url}: the token was refused or this is no Label Studio server "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return client


def _detail(body) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body)
    return " ".join(str(body).split())[:200]


def find_project(client, title: str):
    """The project of that title, or None."""
    for p in client.projects.list(title=title):
        if p.title == title:
            return p
    return None


def ensure_project(client, title: str, categories: list[dict]):
    """The project of that title, created with ``labeling_config(categories)`` when there is
    none; ReviewError when one exists whose config lacks some category."""
    config = labeling_config(categories)
    project = find_project(client, title)
    if project is None:
        return client.projects.create(title=title, label_config=config,
                                      description="ciae review queue: the least confident images "
                                                  "of a labeling output, with the model's segments as predictions")
    have = client.projects.get(project.id).label_config or ""
    missing = [c["name"] for c in categories if f"value={quoteattr(c['name'])}" not in have]
    if missing:
        raise ReviewError(f"project {title!r} exists with another labeling config (no label for "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): give another --project")
    return project


def _http(client):
    """The SDK's HTTP client (its auth and base URL), for the calls that carry brush regions: the
    SDK's typed models walk every number of every RLE to encode or parse a task."""
    return client._client_wrapper.httpx_client


def _checked(r, doing: str):
    if r.status_code >= 300:
        raise RuntimeError(f"{doing}: {r.status_code} {r.text[:300]}")
    return r


def project_tasks(client, project_id: int, **params) -> Iterator[dict]:
    """The project's tasks as the API gives them (JSON objects), a page of 1000 at a time."""
    page, seen = 1, 0
    while True:
        r = _http(client).request("api/tasks/", method="GET", params={
            "project": project_id, "page": page, "page_size": 1000, "resolve_uri": "false", **params})
        if r.status_code == 404:        # past the last page
            return
        body = _checked(r, f"listing the tasks of project {project_id}").json()
        yield from body["tasks"]
        seen, page = seen + len(body["tasks"]), page + 1
        if not body["tasks"] or seen >= body.get("total", 0):
            return


def project_keys(client, project_id: int) -> dict[str, int]:
    """{data.ciae_key: task id} of the project's tasks."""
    return {t["data"][KEY]: t["id"] for t in project_tasks(client, project_id, include="id,data")
            if KEY in (t.get("data") or {})}


def _upload(client, project_id: int, files: list[tuple[str, bytes]]) -> list[str]:
    """Upload images (name, bytes) as file uploads of the project, no tasks made; returns their
    URLs in the order given."""
    # one form field per file: the server reads one file per field name
    parts = {f"file{i}": (name, data, IMAGE_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream"))
             for i, (name, data) in enumerate(files)}
    r = _checked(_http(client).request(f"api/projects/{project_id}/import", method="POST",
                                       params={"commit_to_project": "false"}, files=parts),
                 f"uploading {len(files)} images")
    ids = r.json().get("file_upload_ids") or []
    uploads = client.files.list(project_id, ids=json.dumps(ids))
    by_name: dict[str, str] = {}
    for u in uploads:
        # the API gives the stored name ("upload/<project>/<uuid>-<name>"); the tool serves it
        # under its MEDIA_URL, /data/ (FileUpload.url), as it does for images imported directly
        url = u.file if u.file.startswith(("/", "http://", "https://")) else "/data/" + u.file
        by_name[url.rsplit("/", 1)[-1].split("-", 1)[-1]] = url  # stored as <uuid>-<name>
    missing = [name for name, _ in files if name not in by_name]
    if missing:
        raise RuntimeError(f"uploaded images missing from the project's file uploads: {missing[:3]}")
    return [by_name[name] for name, _ in files]


def _import(client, project_id: int, tasks: list[dict]) -> None:
    """Create tasks (with their predictions) in the project: one request, the JSON encoded here."""
    _checked(_http(client).request(f"api/projects/{project_id}/import", method="POST",
                                   content=json.dumps(tasks).encode(), headers={"Content-Type": "application/json"}),
             f"importing {len(tasks)} tasks")


# ------------------------------------------------------------------------------ the workers

def default_workers() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _pool(workers: int):
    """An ordered ``map`` over ``workers`` processes, or the builtin ``map`` for one. The pool's
    map submits every item at once, so that they run while this process talks to the server. Its
    workers fork from a server process that imports this module and the tool's converter (~1 s
    of CPU: the SDK's converter package imports nltk and scipy), started here so that it does so
    while the caller connects; forking from it is as safe as spawning (nothing inherited from a
    threaded parent) without paying the imports per worker."""
    if workers <= 1:
        yield map
        return
    import multiprocessing
    import multiprocessing.forkserver
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "label_studio_sdk.converter.brush"])
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


def prediction_of(row: dict, names: dict[int, str], model_version: str) -> dict:
    """A labeled row -> one Label Studio prediction: a brush region per segment (the tool's RLE,
    ``mask2rle``), labeled with its category's name, with its score; crowd segments also carry
    the per-region crowd choice. Its score is the image's quality."""
    from label_studio_sdk.converter.brush import mask2rle

    from pipeline.data.panoptic_png import decode_id_png

    ids = decode_id_png(row["png"])
    h, w = ids.shape
    result = []
    for s in row["segments"]:
        mask = np.where(ids == s["id"], np.uint8(255), np.uint8(0))
        region = f"s{int(s['id'])}"
        common = {"id": region, "from_name": LABELS, "to_name": IMAGE, "original_width": w,
                  "original_height": h, "image_rotation": 0}
        result.append(common | {"type": "brushlabels", "score": round(float(s["score"]), 6),
                                "value": {"format": "rle", "rle": mask2rle(mask),
                                          "brushlabels": [names[int(s["category_id"])]]}})
        if s["iscrowd"]:
            result.append(common | {"from_name": CROWD, "type": "choices", "value": {"choices": [CROWD]}})
    return {"model_version": model_version, "score": round(float(row["quality"]), 6), "result": result}


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
        chosen = [r["index"] for r in least_confident(store, n, ["index"])]
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
                urls = _upload(client, proj.id, files)
                tasks = []
                for i, image_url in zip(part, urls):
                    r = rows[i]
                    tasks.append({"data": {IMAGE: image_url, KEY: r["key"], "ciae_image_id": int(r["image_id"]),
                                           "ciae_file_name": r["file_name"], "ciae_quality": float(r["quality"])},
                                  "predictions": [next(predictions)]})
                _import(client, proj.id, tasks)
                bar.update(len(part))
    return PushResult(proj.id, project, len(chosen), len(todo), len(chosen) - len(todo))


# ------------------------------------------------------------------------------ back

def _painted(results: list[dict], height: int, width: int, categories: list[dict]):
    """Brush regions -> (ids [H, W] uint32, segments_info); see the module docstring."""
    from label_studio_sdk.converter.brush import decode_rle

    by_name = {c["name"]: c for c in categories}
    crowd = {r.get("id") for r in results if r.get("from_name") == CROWD
             and CROWD in (r.get("value") or {}).get("choices", [])}
    ids = np.zeros((height, width), np.uint32)
    segments: list[dict] = []
    stuff_segment: dict[int, int] = {}
    for r in results:
        if r.get("type") != "brushlabels" or (r.get("value") or {}).get("format", "rle") != "rle":
            continue
        labels = r["value"].get("brushlabels") or []
        if len(labels) != 1 or labels[0] not in by_name:
            raise ReviewError(f"a region labeled {labels}: expected one of the project's categories")
        cat = by_name[labels[0]]
        h, w = int(r.get("original_height", height)), int(r.get("original_width", width))
        if (h, w) != (height, width):
            raise ReviewError(f"a region of {w}x{h} on an image of {width}x{height}")
        mask = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
        if not cat.get("isthing") and int(cat["id"]) in stuff_segment:
            sid = stuff_segment[int(cat["id"])]
        else:
            sid = len(segments) + 1
            segments.append({"id": sid, "category_id": int(cat["id"]),
                             "iscrowd": int(bool(cat.get("isthing")) and r.get("id") in crowd)})
            if not cat.get("isthing"):
                stuff_segment[int(cat["id"])] = sid
        ids[mask] = sid
    # one pass over the map for every segment's area and the rows and columns it reaches
    n = len(segments) + 1
    area = np.bincount(ids.ravel(), minlength=n)
    in_row = np.zeros((n, height), bool)
    in_row[ids, np.arange(height)[:, None]] = True
    in_col = np.zeros((n, width), bool)
    in_col[ids, np.arange(width)] = True
    out, renum = [], np.zeros(n, np.uint32)
    for s in segments:
        sid = s["id"]
        if not area[sid]:
            continue
        renum[sid] = len(out) + 1
        y0, x0 = int(in_row[sid].argmax()), int(in_col[sid].argmax())
        y1, x1 = height - int(in_row[sid, ::-1].argmax()), width - int(in_col[sid, ::-1].argmax())
        out.append(s | {"id": len(out) + 1, "area": int(area[sid]), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    return renum[ids], out


def _panoptic_png(job: tuple[list[dict], int, int], categories: list[dict]) -> tuple[bytes, list[dict]]:
    """(regions, height, width) -> (the id PNG, segments_info): ``_painted``, encoded."""
    from pipeline.data.panoptic_png import encode_id_png

    ids, segments = _painted(*job, categories)
    return encode_id_png(ids), segments


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
        maps = mapped(partial(_panoptic_png, categories=categories), (job for _, job in todo))
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
