"""What a labeling job reads, planned once: a folder (with its subfolders), a list file, or
prepared shards, cut into tasks of consecutive images written as Parquet files.

``make_plan(input, plan_dir, ...)`` streams the input's listing (a folder is walked directory by
directory; a list file read line by line; shards row group by row group), sorts it where the
order is by name with an external merge sort (runs of ``SORT_RUN`` entries on disk), and writes
``task-KKKKKK.parquet`` files of ``task_images`` entries each, then ``plan.json``, last and
atomically. So the planner holds at most one run of entries, whatever the size of the input,
and a plan is whole or absent.

* Folder: the files under it (recursively) with an image extension (``IMAGE_EXTENSIONS``), in
  the sorted order of their paths relative to it.
* List file: one path or URI per line, in file order; blank lines and lines starting with ``#``
  are skipped; a relative path is relative to the list file's folder.
* Shards: every row of the manifest's shards, in shard order; the image bytes (and the
  ground truth) stay in the shards until a task reads them.

**Keys.** An image's ``key`` is its path relative to the input root without the extension
(``a/0001`` for ``a/0001.jpg``; shards: the row's ``file_name`` likewise); outputs are named
after it (``_coco/panoptic/a/0001.png``), so two inputs with one key (``a/1.jpg`` and ``a/1.png``)
are an error.

**Image ids.** Shards: the row's ``image_id``. Folders and lists: with a ground-truth JSON, the
id of the ground-truth image whose ``file_name`` is the input's relative path, or else its base
name; inputs the ground truth lacks get max(ground-truth id) + 1, + 2, ... in input order.
Without one: the stem as a number when every stem is a decimal number and no two are equal
(COCO's ``000000000139.jpg`` -> 139), else 1, 2, ... in input order. Two inputs with one id are
an error. The same input gives the same plan.

Plan rows: ``index`` (position in the plan), ``key``, ``file_name``, ``image_id``, ``uri`` (an
image file) or ``shard`` + ``row`` (a shard row), and with ground truth from a JSON
``gt_png`` (its PNG's path or URI) and ``gt_segments`` (JSON).

**Credentials.** A plan records no credential given in a URI: its rows hold their URIs as
``storage.public_uri`` gives them (``s3://***@bucket/...``), and ``Plan.read_task`` puts back
those of the job's own URIs (``credentials``: the input and ground-truth folder, as the job got
them, run after run), or else none (``ciae review`` reads with the environment's). A list
file's line with credentials of its own is refused.
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ciae.data.panoptic import CategoryTable, DatasetError
from pipeline.data import storage
from pipeline.data.shards import manifest_file, read_manifest, shard_paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PLAN_FILE = "plan.json"
PLAN_VERSION = 1
SORT_RUN = 200_000            # entries per sorted run of the external sort
TASK_IMAGES = 1024            # images per task (one output shard each)
URI_COLUMNS = ("uri", "shard", "gt_png")     # plan columns of URIs: written without credentials

PLAN_SCHEMA = pa.schema([
    ("index", pa.int64()), ("key", pa.string()), ("file_name", pa.string()), ("image_id", pa.int64()),
    ("uri", pa.string()), ("shard", pa.string()), ("row", pa.int64()),
    ("gt_png", pa.string()), ("gt_segments", pa.string()),
])


@dataclass(frozen=True)
class Plan:
    """A written plan: where its tasks are, how many images each holds, and what the job needs
    to know of the input (``categories``: the ground truth's, the manifest's or None)."""

    dir: str
    input: str
    kind: str                         # "folder", "list" or "shards"
    images: int
    task_sizes: tuple[int, ...]
    ground_truth: str | None          # "json" (rows carry it), "shards" (the shard rows do) or None
    categories: list[dict] | None
    # the job's (``credentials`` of its URIs), never written
    credentials: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def task_path(self, task: int) -> str:
        return self.task_file(self.dir, task)

    @staticmethod
    def task_file(plan_dir: str, task: int) -> str:
        return storage.join(plan_dir, f"task-{task:06d}.parquet")

    @staticmethod
    def read_task(plan_dir: str, task: int, credentials: dict[str, str] | None = None) -> list[dict]:
        """The plan rows (``PLAN_SCHEMA``) of one task, in plan order, their URIs with
        ``credentials`` (the plan's) put back."""
        rows = storage.read_parquet(Plan.task_file(plan_dir, task)).to_pylist()
        for row in rows:
            for k in URI_COLUMNS:
                row[k] = with_credentials(row[k], credentials or {})
        return rows

    def locate(self, index: int) -> tuple[int, int]:
        """(task, row in it) of a plan index."""
        for task, size in enumerate(self.task_sizes):
            if index < size:
                return task, index
            index -= size
        raise IndexError(index)

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "input": storage.public_uri(self.input), "kind": self.kind,
                "images": self.images,
                "task_sizes": list(self.task_sizes), "ground_truth": self.ground_truth,
                "categories": self.categories}


def credentials(*uris: str | None) -> dict[str, str]:
    """Where the credentials given in ``uris`` apply, as plan rows name it, and the part of the
    URI that carries them: {``s3://***@bucket``: ``s3://KEY:SECRET@bucket``}."""
    out = {}
    for uri in uris:
        if uri and storage.public_uri(uri) != uri:
            head = _authority(uri)
            out[storage.public_uri(head)] = head
    return out


def with_credentials(uri: str | None, creds: dict[str, str]) -> str | None:
    """A plan row's ``uri`` with the credentials of its place (``creds``: ``credentials``) put
    back; where they are unknown, with none (the environment's apply)."""
    if not uri or "://" not in uri:
        return uri
    head = _authority(uri)
    if head in creds:
        return creds[head] + uri[len(head):]
    scheme, _, host = head.partition("://")
    return f"{scheme}://{host.rpartition('@')[2]}{uri[len(head):]}"


def _authority(uri: str) -> str:
    """``scheme://[userinfo@]host`` of a URI."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def key_of(path: str) -> str:
    """The key of a relative path: the path without its extension, '/'-separated."""
    return os.path.splitext(path.replace("\\", "/"))[0]


# ------------------------------------------------------------------------------ listings


def _walk(fs: pafs.FileSystem, root: str) -> Iterator[str]:
    """Relative paths of the image files under ``root``, one directory at a time (a local
    directory is read as a stream of entries)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        path = storage.join(root, rel) if rel else root
        if isinstance(fs, pafs.LocalFileSystem):
            with os.scandir(path) as entries:
                for e in entries:
                    name = f"{rel}/{e.name}" if rel else e.name
                    if e.is_dir():
                        stack.append(name)
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                        yield name
            continue
        for info in fs.get_file_info(pafs.FileSelector(path)):
            name = f"{rel}/{info.base_name}" if rel else info.base_name
            if info.type == pafs.FileType.Directory:
                stack.append(name)
            elif info.base_name.lower().endswith(IMAGE_EXTENSIONS):
                yield name


def _list_lines(fs: pafs.FileSystem, path: str, uri: str) -> Iterator[tuple[str, str]]:
    """(path or URI, relative name) of each line of a list file, streamed."""
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    with fs.open_input_stream(path) as f:
        for raw in _lines(f):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            absolute = "://" in line or os.path.isabs(line)
            yield (line if absolute else storage.join(base, line)), (os.path.basename(line) if absolute else line)


def _lines(stream, chunk: int = 1 << 20) -> Iterator[str]:
    rest = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from (line.decode("utf-8") for line in lines)
    if rest:
        yield rest.decode("utf-8")


def _shard_rows(uri: str, manifest: dict) -> Iterator[tuple[int, str, str, int]]:
    """(image id, file name, shard, row) of every row, one row group at a time."""
    for path in shard_paths(uri, manifest):
        with storage.parquet_file(path) as file:
            row = 0
            for g in range(file.num_row_groups):
                t = file.read_row_group(g, columns=["image_id", "file_name"])
                for iid, name in zip(t["image_id"].to_pylist(), t["file_name"].to_pylist()):
                    yield int(iid), name, path, row
                    row += 1


# ----------------------------------------------------------------------- external sort


def external_sort(items: Iterable, workdir: str, run: int = SORT_RUN) -> Iterator:
    """``sorted(items)`` holding at most ``run`` items in memory: sorted runs are written to
    ``workdir`` and merged."""
    paths, buf = [], []
    for item in items:
        buf.append(item)
        if len(buf) >= run:
            paths.append(_write_run(sorted(buf), workdir, len(paths)))
            buf = []
    if not paths:
        yield from sorted(buf)
        return
    if buf:
        paths.append(_write_run(sorted(buf), workdir, len(paths)))
    files = [open(p, "rb") for p in paths]
    try:
        yield from heapq.merge(*(_read_run(f) for f in files))
    finally:
        for f in files:
            f.close()


def _write_run(items: list, workdir: str, k: int) -> str:
    path = os.path.join(workdir, f"run-{k:05d}")
    with open(path, "wb") as f:
        for start in range(0, len(items), 4096):
            pickle.dump(items[start:start + 4096], f)
    return path


def _read_run(f) -> Iterator:
    while True:
        try:
            yield from pickle.load(f)
        except EOFError:
            return


def _first_duplicates(values: Iterator, limit: int = 5) -> list:
    """Values that occur more than once in a sorted stream (at most ``limit``)."""
    dup, prev, first = [], None, True
    for v in values:
        if not first and v == prev and (not dup or dup[-1] != v):
            dup.append(v)
            if len(dup) >= limit:
                break
        prev, first = v, False
    return dup


# ------------------------------------------------------------------------------- planning


class _TaskWriter:
    """Writes plan rows into task files of ``size`` rows in the folder ``plan_dir`` (a path or
    URI; ``fs``, ``path``: its filesystem and path there)."""

    def __init__(self, fs: pafs.FileSystem, path: str, plan_dir: str, size: int, creds: dict[str, str]):
        self.fs, self.dir, self.uri, self.size, self.creds = fs, path, plan_dir, size, creds
        self.rows: list[dict] = []
        self.sizes: list[int] = []
        self.written = 0                      # rows in the task files so far

    def add(self, row: dict) -> None:
        row = {**row, "index": self.written + len(self.rows)}
        for k in URI_COLUMNS:
            if row.get(k):
                public = storage.public_uri(row[k])
                if with_credentials(public, self.creds) != row[k]:
                    raise DatasetError(f"{public}: credentials other than the input's and ground truth's, "
                                       "which the plan would record; give them in the environment instead")
                row[k] = public
        self.rows.append(row)
        if len(self.rows) == self.size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            with storage.open_atomic(self.fs, storage.join(self.dir, f"task-{len(self.sizes):06d}.parquet")) as f:
                pq.write_table(pa.Table.from_pylist(self.rows, schema=PLAN_SCHEMA), f)
            self.sizes.append(len(self.rows))
            self.written += len(self.rows)
            self.rows = []


def _ground_truth(gt_json: str) -> tuple[dict[str, object], int, CategoryTable]:
    """file name (as given, and its base name) -> record of a ground-truth JSON, the largest id,
    the categories."""
    from pipeline.data.coco import load_panoptic_json

    gt = load_panoptic_json(gt_json)
    by_name: dict[str, object] = {}
    for r in gt.records:
        by_name.setdefault(r.file_name, r)
        by_name.setdefault(os.path.basename(r.file_name), r)
    return by_name, max((r.image_id for r in gt.records), default=0), gt.categories


def load_plan(plan_dir: str, *uris: str | None) -> Plan | None:
    """The plan written in ``plan_dir``, or None when there is none (or only a partial one);
    ``uris``: the job's input and ground-truth folder, whose ``credentials`` it reads with."""
    fs, path = storage.resolve(plan_dir)
    try:
        doc = json.loads(storage.read_bytes(fs, storage.join(path, PLAN_FILE)))
    except FileNotFoundError:
        return None
    if doc.get("version") != PLAN_VERSION:
        raise DatasetError(f"{plan_dir}: plan version {doc.get('version')}, this code reads {PLAN_VERSION}")
    return Plan(plan_dir, doc["input"], doc["kind"], doc["images"], tuple(doc["task_sizes"]),
                doc["ground_truth"], doc["categories"], credentials(*uris))


def make_plan(input_uri: str, plan_dir: str, gt_json: str | None = None, gt_dir: str | None = None,
              task_images: int = TASK_IMAGES) -> Plan:
    """Plan ``input_uri`` (folder, list file or shards; see the module docstring) into
    ``plan_dir``. Raises DatasetError when the input is missing, empty, or has clashing keys or
    ids."""
    fs, path = storage.resolve(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"{input_uri}: no such file or folder")
    if info.type == pafs.FileType.Directory and manifest_file(fs, path) is not None:
        kind = "shards"
        if gt_json:
            raise DatasetError(f"{input_uri}: shards carry their own ground truth; drop --gt-json/--gt-dir")
    else:
        kind = "folder" if info.type == pafs.FileType.Directory else "list"
    out_fs, out_path = storage.resolve(plan_dir)
    for stale in storage.list_folder(out_fs, out_path):       # a partial plan of a killed run
        storage.delete_file(out_fs, stale.path)
    storage.create_folder(out_fs, out_path)
    creds = credentials(input_uri, gt_dir)
    writer = _TaskWriter(out_fs, out_path, plan_dir, task_images, creds)
    with tempfile.TemporaryDirectory(prefix="ciae-plan-") as work:
        if kind == "shards":
            manifest = read_manifest(input_uri)
            categories, ground_truth = manifest["categories"], "shards"
            _check_unique((key_of(name) for _, name, _, _ in _shard_rows(input_uri, manifest)),
                          input_uri, "file names (without extension)", work)
            for iid, name, shard, row in _shard_rows(input_uri, manifest):
                writer.add({"key": key_of(name), "file_name": name, "image_id": iid, "shard": shard, "row": row})
        else:
            gt = _ground_truth(gt_json) if gt_json else None
            categories = gt[2].to_json() if gt else None
            ground_truth = "json" if gt else None
            entries = _entries(fs, path, input_uri, kind, work)
            _plan_files(entries, writer, gt, gt_dir, input_uri, work)
    writer.flush()
    if not writer.sizes:
        raise DatasetError(f"{input_uri}: no images (a folder needs files ending in "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
    plan = Plan(plan_dir, input_uri, kind, sum(writer.sizes), tuple(writer.sizes), ground_truth, categories, creds)
    storage.write_bytes_atomic(out_fs, storage.join(out_path, PLAN_FILE), json.dumps(plan.to_json()).encode())
    return plan


def _entries(fs, path: str, uri: str, kind: str, work: str):
    """(key, file name, uri) of every input in input order, listed once into a local file;
    returns a function that streams them again."""
    if kind == "folder":
        listing = ((key_of(rel), rel, storage.join(uri, rel))
                   for rel in external_sort(_walk(fs, path), tempfile.mkdtemp(dir=work)))
    else:
        listing = ((key_of(name), name, u) for u, name in _list_lines(fs, path, uri))
    spool = os.path.join(work, "entries")
    with open(spool, "wb") as f:
        chunk = []
        for entry in listing:
            chunk.append(entry)
            if len(chunk) == 4096:
                pickle.dump(chunk, f)
                chunk = []
        pickle.dump(chunk, f)

    def entries() -> Iterator[tuple[str, str, str]]:
        with open(spool, "rb") as f:
            yield from _read_run(f)
    return entries


def _plan_files(entries, writer: _TaskWriter, gt, gt_dir: str | None, uri: str, work: str) -> None:
    """Write the plan rows of a folder or list: keys checked unique, ids assigned by the rules
    of the module docstring and checked unique."""
    _check_unique((key for key, _, _ in entries()), uri, "keys (paths without extension)", work)
    if gt:
        by_name, next_id, _ = gt

        def image_id(name: str) -> int:
            nonlocal next_id
            rec = by_name.get(name) or by_name.get(os.path.basename(name))
            if rec is not None:
                return rec.image_id
            next_id += 1
            return next_id
    else:
        numeric = all(stem(name).isdecimal() for _, name, _ in entries())
        if numeric:
            numeric = not _first_duplicates(external_sort((int(stem(n)) for _, n, _ in entries()),
                                                          tempfile.mkdtemp(dir=work)))
        ordinal = 0

        def image_id(name: str) -> int:
            nonlocal ordinal
            ordinal += 1
            return int(stem(name)) if numeric else ordinal
    for key, name, u in entries():
        iid = image_id(name)
        row = {"key": key, "file_name": name, "image_id": iid, "uri": u}
        if gt:
            rec = by_name.get(name) or by_name.get(os.path.basename(name))
            if rec is not None and gt_dir is not None:
                row["gt_png"] = storage.join(gt_dir, rec.panoptic_file)
                row["gt_segments"] = json.dumps([s.to_json() for s in rec.segments])
        writer.add(row)
    if gt:
        _check_unique((r for r in _plan_ids(writer)), uri, "image ids (two inputs match one "
                      "ground-truth image)", work)


def _plan_ids(writer: _TaskWriter) -> Iterator[int]:
    """The image ids of the task files written so far and of the rows not yet flushed."""
    for k in range(len(writer.sizes)):
        yield from storage.read_parquet(Plan.task_file(writer.uri, k), columns=["image_id"])["image_id"].to_pylist()
    yield from (r["image_id"] for r in writer.rows)


def _check_unique(values: Iterable, uri: str, what: str, work: str) -> None:
    dup = _first_duplicates(external_sort(values, tempfile.mkdtemp(dir=work)))
    if dup:
        raise DatasetError(f"{uri}: {len(dup)}{'+' if len(dup) == 5 else ''} {what} occur twice, "
                           f"e.g. {', '.join(map(str, dup))}")


def categories_of(plan: Plan) -> list[dict]:
    """The ground truth's or the manifest's categories, else COCO's (the model's ids are COCO's)."""
    if plan.categories is not None:
        return plan.categories
    from pipeline.data.synth import coco_categories

    return coco_categories().to_json()
