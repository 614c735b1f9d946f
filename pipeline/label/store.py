"""The output of a labeling job: Parquet shards, one per task of the plan, written exactly once
however often the job restarts. The exports made from them are ``pipeline.label.exports``'s.

Layout of an output folder (local path or filesystem URI), ``LAYOUT``. Read as a Parquet dataset
(``pandas.read_parquet(OUT)``, ``pyarrow.dataset.dataset(OUT, format="parquet")``, Spark) it
gives one row per image: every name beside ``labels/`` starts with ``_`` (and temporaries with
``.``), which those readers skip::

    labels/task-KKKKKK.parquet      a task's results, sealed: one row per image of the task
    _plan/                          the input, planned once (``pipeline.label.sources``)
    _parts/task-KKKKKK/*.parquet    results of the batches of a task not yet sealed
    _summaries/task-KKKKKK.json     a sealed task's summary (``Summary``), written with its shard
    _summaries/job.json             the summaries of every sealed task folded into one
    _coco/panoptic/<key>.png        COCO panoptic PNGs, when asked for (written as batches finish)
    _coco/predictions.json          COCO panoptic JSON, when asked for (streamed from the shards)
    _coco/instances.json            COCO instances JSON of the thing segments (RLE), when asked for
    _rejects.json, _review.csv, _metrics.json, _overlays/<key>.png

A folder written before this layout (``plan/``, ``parts/``, ``panoptic/``, ``predictions.json``,
... beside ``labels/``: ``LEGACY_LAYOUT``) is recognised by ``plan/plan.json`` without ``_plan/``,
and is resumed and exported in its own layout.

A row (``SCHEMA``): ``index`` (in the plan), ``key``, ``image_id``, ``file_name``, ``height``,
``width``, ``status`` ("labeled" or "rejected"), ``reason``, ``png`` (the COCO panoptic PNG at the
image's size), ``segments`` (id, category_id, iscrowd, area, bbox, score and, for things, the
COCO RLE ``rle``), ``quality`` (the image's confidence), ``pq`` (the image's PQ with ground
truth) and ``pq_stats`` (its PQ statistics, ``PQAccumulator.to_json`` as JSON, summed into the
metrics).

Protocol. Every file is written whole or not at all (``storage.open_atomic``: a temporary name
moved into place, or on an object store one upload under its name). A batch writes its
PNGs first and its part last, named by a digest of its keys, so a retried batch rewrites the
same part. A task is done once its shard exists: sealing reads the task's parts, keeps one row
per key, writes the shard (footer: the task's PQ statistics) and the task's summary (its counts,
PQ statistics, rejects and the job's ``review`` least confident of its images, with the shard's
size), then removes the parts. A re-run lists ``labels/`` (one name per task) and the parts of the
unsealed tasks (removing those of sealed tasks: a seal killed before it removed them), and labels
only what neither holds.

What the end of a job needs beyond the COCO files and panels (counts, rejects, review list, PQ)
comes from ``LabelStore.summary``: ``job.json`` when it was made from the shards listed now (the
same names and sizes) and holds enough review rows, else the tasks' summaries folded (a task's
summary made again from its shard when it is missing, of another size or of too few review rows:
an output written before summaries, or a job killed between a shard and its summary) and written
as ``job.json``. So a finished job's re-run lists ``labels/`` and reads one small object, whatever
its size. A retry of the rejected images (``rejected_tasks``) reads only the shards of the tasks
whose summaries count some, or that have none. Before it first changes a shard (``seal``,
``unseal_rejected``) a store deletes ``job.json``, and ``unseal_rejected`` deletes the task's
summary before its shard: a summary is never read for a shard it was not made from. The COCO
exports and panels read the shards; ``ciae review push`` takes its images from ``job.json`` when it
holds enough review rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ciae.data.panoptic import CategoryTable, DatasetError
from pipeline.data import storage
from pipeline.evaluation.pq import PQAccumulator
from pipeline.label.sources import PLAN_FILE

PQ_KEY = b"ciae.pq"           # a sealed shard's footer: its PQ statistics (PQAccumulator.to_json), JSON
PNGS_KEY = b"ciae.pngs"       # a part's footer: its rows' COCO panoptic PNGs were written with it


@dataclass(frozen=True)
class Layout:
    """Where each part of an output lives, relative to the output folder."""

    plan: str
    parts: str
    labels: str
    panoptic: str               # COCO panoptic PNGs, <key>.png
    predictions: str            # COCO panoptic JSON
    instances: str              # COCO instances JSON
    rejects: str
    review: str
    metrics: str
    overlays: str               # panels, <key>.png
    summaries: str              # the tasks' summaries, task-KKKKKK.json, and job.json

    def folders(self) -> list[str]:
        """The folders (besides the output itself and the parts) that files are written into."""
        coco = self.predictions.rpartition("/")[0]
        return [f for f in (self.plan, self.labels, self.panoptic, self.overlays, coco, self.summaries) if f]


LAYOUT = Layout(plan="_plan", parts="_parts", labels="labels", panoptic="_coco/panoptic",
                predictions="_coco/predictions.json", instances="_coco/instances.json",
                rejects="_rejects.json", review="_review.csv", metrics="_metrics.json", overlays="_overlays",
                summaries="_summaries")
LEGACY_LAYOUT = Layout(plan="plan", parts="parts", labels="labels", panoptic="panoptic",
                       predictions="predictions.json", instances="instances.json", rejects="rejects.json",
                       review="review.csv", metrics="metrics.json", overlays="overlays", summaries="summaries")

SEGMENT = pa.struct([("id", pa.int64()), ("category_id", pa.int32()), ("iscrowd", pa.int8()),
                     ("area", pa.int64()), ("bbox", pa.list_(pa.int32(), 4)), ("score", pa.float32()),
                     ("rle", pa.string())])
SCHEMA = pa.schema([
    ("index", pa.int64()), ("key", pa.string()), ("image_id", pa.int64()), ("file_name", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("png", pa.binary()), ("segments", pa.list_(SEGMENT)), ("quality", pa.float32()),
    ("pq", pa.float64()), ("pq_stats", pa.string()),
])

SUMMARY_FORMAT = 1          # a summary of another format is made again from its shard
PNGS_RECORD = ".pngs"       # task-KKKKKK.pngs.json: the task's COCO panoptic PNGs are written
JOB_SUMMARY = "job.json"
SUMMARY_COLUMNS = ["index", "key", "file_name", "image_id", "status", "reason", "quality", "pq", "segments"]
# a review row: its rank (quality, then plan index), what _review.csv shows of the image, and its
# least confident segment (None for each when it has none)
REVIEW_FIELDS = ("quality", "index", "key", "file_name", "image_id", "pq", "segment", "category_id", "score")


def review_row(row: dict) -> list:
    """A labeled row (``SUMMARY_COLUMNS``) as a review row (``REVIEW_FIELDS``)."""
    low = min(row["segments"], key=lambda s: s["score"], default=None)
    return [row["quality"], row["index"], row["key"], row["file_name"], row["image_id"], row["pq"],
            *((None, None, None) if low is None else (low["id"], low["category_id"], low["score"]))]


def least_confident_rows(rows: Iterable[list], n: int) -> list[list]:
    """The ``n`` review rows of lowest quality, lowest first (ties: plan order)."""
    return heapq.nsmallest(n, rows, key=lambda r: (r[0], r[1]))


@dataclass
class Summary:
    """What the end of a job needs of some sealed shards (one task's, or every sealed one's),
    as JSON: {"format", the fields, and "shard_bytes" (a task's) or "shards" (job.json: name ->
    size of each shard it was made from)}."""

    labeled: int
    rejected: int
    pq: dict | None             # their PQ statistics summed (PQAccumulator.to_json); None: none in their footers
    rejects: list[dict]         # {file, key, image_id, reason} of each rejected image, in plan order
    review: list[list]          # review rows of the least confident labeled images, lowest first
    review_n: int               # ``review`` holds the review_n least confident (or all, when fewer are labeled)

    def serves(self, n: int) -> bool:
        """Whether ``review`` holds the ``n`` least confident labeled images."""
        return n <= self.review_n or len(self.review) == self.labeled

    def to_json(self, **extra) -> dict:
        return {"format": SUMMARY_FORMAT, **dataclasses.asdict(self), **extra}

    @classmethod
    def from_json(cls, doc: dict) -> Summary | None:
        """The summary in ``to_json``'s ``doc``; None when it is of another format."""
        if doc.get("format") != SUMMARY_FORMAT:
            return None
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def of_rows(cls, rows: list[dict], pq: dict | None, review: int) -> Summary:
        """The summary of a task's rows (``SUMMARY_COLUMNS``), keeping its ``review`` least confident."""
        rejects = [{"file": r["file_name"], "key": r["key"], "image_id": r["image_id"], "reason": r["reason"]}
                   for r in rows if r["status"] == "rejected"]
        labeled = [review_row(r) for r in rows if r["status"] == "labeled"]
        return cls(len(labeled), len(rejects), pq, rejects, least_confident_rows(labeled, review), review)

    @classmethod
    def folded(cls, summaries: Iterable[Summary], categories: CategoryTable, review: int) -> Summary:
        """The summary of the shards of ``summaries`` (in task order), each serving ``review``,
        folded one at a time: what it holds is bounded by ``review`` and the rejects, not by the
        number of tasks."""
        acc, any_pq = PQAccumulator(categories), False
        total = cls(0, 0, None, [], [], review)
        for s in summaries:
            total.labeled += s.labeled
            total.rejected += s.rejected
            if s.pq is not None:
                acc.add_json(s.pq)
                any_pq = True
            total.rejects.extend(s.rejects)
            total.review = least_confident_rows([*total.review, *s.review], review)
        total.pq = acc.to_json() if any_pq else None
        return total


def task_name(task: int) -> str:
    return f"task-{task:06d}"


def shard_names(sizes: dict[int, int]) -> dict[str, int]:
    """{shard name: size} of ``shard_sizes``'s {task: size}, in task order (``job.json``'s "shards")."""
    return {task_name(t): sizes[t] for t in sorted(sizes)}


def layout_of(fs: pafs.FileSystem, base: str) -> Layout:
    """The layout of the output folder at ``base``: ``LEGACY_LAYOUT`` when it holds a whole plan
    in ``plan/`` and no ``_plan/``, else ``LAYOUT`` (new folders included)."""
    legacy = (storage.file_type(fs, storage.join(base, LEGACY_LAYOUT.plan, PLAN_FILE)) == pafs.FileType.File
              and storage.file_type(fs, storage.join(base, LAYOUT.plan)) == pafs.FileType.NotFound)
    return LEGACY_LAYOUT if legacy else LAYOUT


class LabelStore:
    """The output folder of a labeling job (see the module docstring); ``layout`` is found once,
    when the store is made."""

    def __init__(self, out_uri: str, layout: Layout | None = None):
        self.uri = out_uri.rstrip("/")
        self.fs, self.base = storage.resolve(out_uri)
        self.layout = layout or layout_of(self.fs, self.base)
        self._job_summary_current = True     # job.json may be there: deleted before a shard changes

    def path(self, *parts: str) -> str:
        """A path inside the folder, on ``self.fs``."""
        return storage.join(self.base, *parts)

    def uri_of(self, *parts: str) -> str:
        """The same, as a path or URI that ``storage.resolve`` takes."""
        return storage.join(self.uri, *parts)

    @property
    def plan_uri(self) -> str:
        return self.uri_of(self.layout.plan)

    def check_writable(self) -> None:
        """Create the folder and write a file there, or raise DatasetError saying why not."""
        probe = self.path(f".ciae-probe{storage.TMP_MARK}")
        try:
            storage.create_folder(self.fs, self.base)
            storage.write_bytes_atomic(self.fs, probe, b"")
            storage.delete_file(self.fs, probe)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.uri}: cannot write the output there ({e})") from None

    # ----------------------------------------------------------------------------- writing

    def write_png(self, key: str, data: bytes) -> None:
        self.write(self.path(self.layout.panoptic, key + ".png"), data)

    def write_overlay(self, key: str, data: bytes) -> None:
        self.write(self.path(self.layout.overlays, key + ".png"), data)

    def write(self, path: str, data: bytes) -> None:
        """Write ``data`` atomically to ``path`` (on ``self.fs``), creating its folder."""
        storage.create_folder(self.fs, path.rpartition("/")[0])
        storage.write_bytes_atomic(self.fs, path, data)

    def _write_table(self, path: str, table: pa.Table, **options) -> int:
        """Write ``table`` atomically to ``path`` (on ``self.fs``); returns its size in bytes."""
        storage.create_folder(self.fs, path.rpartition("/")[0])
        with storage.open_atomic(self.fs, path) as f:
            pq.write_table(table, f, compression="zstd", **options)
            return f.tell()

    def write_part(self, task: int, rows: list[dict], pngs: bool = False) -> str:
        """Write one batch's rows of a task (``SCHEMA``) as a part, noting whether their COCO
        panoptic PNGs were written before it (``pngs``); returns its name."""
        keys = sorted(r["key"] for r in rows)
        name = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:16] + ".parquet"
        schema = SCHEMA.with_metadata({PNGS_KEY: b"1"}) if pngs else SCHEMA
        self._write_table(self.path(self.layout.parts, task_name(task), name), pa.Table.from_pylist(rows, schema=schema))
        return name

    def part_keys(self, task: int) -> set[str]:
        """The keys in the parts of an unsealed task."""
        keys: set[str] = set()
        for uri in self._parts(task):
            keys.update(storage.read_parquet(uri, columns=["key"])["key"].to_pylist())
        return keys

    def _parts(self, task: int) -> list[str]:
        """The URIs of a task's parts."""
        folder = (self.layout.parts, task_name(task))
        return [self.uri_of(*folder, i.base_name) for i in storage.list_folder(self.fs, self.path(*folder))
                if i.base_name.endswith(".parquet") and storage.TMP_MARK not in i.base_name]

    def unsealed_tasks(self) -> list[int]:
        """Tasks with parts (a task sealed before its parts were removed included)."""
        return sorted(int(i.base_name.split("-")[1])
                      for i in storage.list_folder(self.fs, self.path(self.layout.parts))
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("task-"))

    def sealed(self) -> set[int]:
        """The tasks whose shard exists."""
        return set(self.shard_sizes())

    def shard_sizes(self) -> dict[int, int]:
        """{task: its shard's size in bytes} of the sealed tasks, from one listing."""
        return {int(i.base_name[5:11]): i.size for i in storage.list_folder(self.fs, self.path(self.layout.labels))
                if i.base_name.startswith("task-") and i.base_name.endswith(".parquet")}

    def _shard(self, task: int) -> str:
        return self.path(self.layout.labels, task_name(task) + ".parquet")

    def seal(self, task: int, size: int, categories: CategoryTable, review: int) -> None:
        """Merge a task's parts into its shard (one row per key, plan order), write its summary
        (its ``review`` least confident images kept) and, when every part's PNGs were written
        with it, the record that the task's COCO panoptic PNGs are (``PNGS_RECORD``), then remove
        the parts. Raises RuntimeError when they do not hold ``size`` images."""
        tables = [storage.read_parquet(uri) for uri in self._parts(task)]
        pngs = bool(tables) and all((t.schema.metadata or {}).get(PNGS_KEY) for t in tables)
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        _, first = np.unique(table["index"].to_numpy(), return_index=True)
        table = table.take(pa.array(first)).sort_by("index")
        if table.num_rows != size:
            raise RuntimeError(f"task {task}: {table.num_rows} of its {size} images are in its parts")
        acc = PQAccumulator(categories)
        for stats in table["pq_stats"].to_pylist():
            if stats:
                acc.add_json(json.loads(stats))
        schema = SCHEMA.with_metadata({PQ_KEY: json.dumps(acc.to_json()).encode()})
        self._forget_job_summary()
        shard_bytes = self._write_table(self._shard(task), table.replace_schema_metadata(schema.metadata),
                                        row_group_size=256)
        summary = Summary.of_rows(table.select(SUMMARY_COLUMNS).to_pylist(), acc.to_json(), review)
        self._write_json(self._task_summary_path(task), summary.to_json(shard_bytes=shard_bytes))
        if pngs:
            self.set_export_record(task_name(task) + PNGS_RECORD, {"shard_bytes": shard_bytes})
        self.remove_parts(task)

    def remove_parts(self, task: int) -> None:
        storage.delete_folder(self.fs, self.path(self.layout.parts, task_name(task)))

    def rejected_tasks(self) -> list[int]:
        """The sealed tasks that may hold rejected images, in task order: none when ``job.json``
        is current and counts none, else those whose summary (made from a shard of this size)
        counts some and those without one (``unseal_rejected`` reads their shard). The summaries
        are read one at a time."""
        sizes = self.shard_sizes()
        job = self.job_summary(sizes)
        if job is not None and job.rejected == 0:
            return []
        stored = {i.base_name for i in storage.list_folder(self.fs, self.path(self.layout.summaries))}
        tasks = []
        for t in sorted(sizes):
            found = self._stored_task_summary(t, sizes[t]) if task_name(t) + ".json" in stored else None
            if found is None or found.rejected:
                tasks.append(t)
        return tasks

    def unseal_rejected(self, task: int) -> list[str]:
        """Turn a sealed task with rejected images back into parts holding its labeled rows, so
        that a run labels the rejected ones again; returns their keys."""
        table = storage.read_parquet(self.uri_of(self.layout.labels, task_name(task) + ".parquet"))
        rejected = pc.equal(table["status"], "rejected")
        if not pc.any(rejected).as_py():
            return []
        self._forget_job_summary()
        self._delete(self._task_summary_path(task))
        self._delete(self.path(self.layout.summaries, task_name(task) + PNGS_RECORD + ".json"))
        keep = table.filter(pc.invert(rejected))
        if keep.num_rows:
            self.write_part(task, keep.to_pylist())
        else:
            storage.create_folder(self.fs, self.path(self.layout.parts, task_name(task)))
        storage.delete_file(self.fs, self._shard(task))
        return table.filter(rejected)["key"].to_pylist()

    def remove_temporaries(self) -> None:
        """Delete the temporaries of interrupted writes (in the folder, its plan, shards, PNG,
        panel and COCO folders, and the parts of unsealed tasks); on an object store there are
        none, and nothing is listed."""
        if storage.is_object_store(self.fs):
            return
        storage.remove_temporaries(self.fs, self.base)
        for folder in self.layout.folders():
            storage.remove_temporaries(self.fs, self.path(folder))
        for task in self.unsealed_tasks():
            storage.remove_temporaries(self.fs, self.path(self.layout.parts, task_name(task)))

    # ----------------------------------------------------------------------------- reading

    def rows(self, columns: list[str]) -> Iterator[dict]:
        """The rows of every shard, in plan order, holding only ``columns`` (one row group of
        one shard in memory at a time)."""
        for task in sorted(self.sealed()):
            yield from self.task_rows(task, columns)

    def task_rows(self, task: int, columns: list[str]) -> Iterator[dict]:
        """The rows of a sealed task's shard, as ``rows``."""
        with storage.parquet_file(self.uri_of(self.layout.labels, task_name(task) + ".parquet")) as file:
            for g in range(file.num_row_groups):
                yield from file.read_row_group(g, columns=columns).to_pylist()

    def export_record(self, name: str, made_from: dict) -> dict | None:
        """The record ``name`` (``set_export_record``) in the summaries' folder when it holds
        ``made_from`` (what the export was made from: shard names and sizes), else None."""
        doc = self._read_json(self.path(self.layout.summaries, name + ".json"))
        return doc if doc is not None and doc.get("made_from") == made_from else None

    def set_export_record(self, name: str, made_from: dict, **values) -> None:
        """Record that an export ``name`` is whole and was made from ``made_from``, with ``values``."""
        self._write_json(self.path(self.layout.summaries, name + ".json"), {"made_from": made_from, **values})

    def summary(self, review: int, categories: CategoryTable) -> Summary:
        """The summary of every sealed shard, with (at least) its ``review`` least confident
        images: ``job.json`` when it was made from the shards listed now and serves ``review``,
        else the tasks' summaries folded (each made again from its shard when missing, of another
        size or serving fewer) and written as ``job.json``."""
        sizes = self.shard_sizes()
        found = self.job_summary(sizes)
        if found is not None and found.serves(review):
            return found
        stored = {i.base_name for i in storage.list_folder(self.fs, self.path(self.layout.summaries))}
        tasks = (self._task_summary(t, sizes[t], review, task_name(t) + ".json" in stored) for t in sorted(sizes))
        total = Summary.folded(tasks, categories, review)
        self._write_json(self._job_summary_path(), total.to_json(shards=shard_names(sizes)))
        self._job_summary_current = True
        return total

    def job_summary(self, sizes: dict[int, int] | None = None) -> Summary | None:
        """``job.json``'s summary when it was made from the shards listed now (``sizes``, default:
        ``shard_sizes()``), else None; nothing is written."""
        sizes = self.shard_sizes() if sizes is None else sizes
        doc = self._read_json(self._job_summary_path())
        return Summary.from_json(doc) if doc is not None and doc.get("shards") == shard_names(sizes) else None

    def _stored_task_summary(self, task: int, shard_bytes: int) -> Summary | None:
        """A sealed task's stored summary if made from a shard of this size, else None."""
        doc = self._read_json(self._task_summary_path(task))
        return Summary.from_json(doc) if doc is not None and doc.get("shard_bytes") == shard_bytes else None

    def _task_summary(self, task: int, shard_bytes: int, review: int, stored: bool) -> Summary:
        """A sealed task's summary serving ``review``: its stored one if made from a shard of
        this size, else one made from the shard (one read of ``SUMMARY_COLUMNS`` and the footer)
        and stored."""
        found = self._stored_task_summary(task, shard_bytes) if stored else None
        if found is not None and found.serves(review):
            return found
        with storage.parquet_file(self.uri_of(self.layout.labels, task_name(task) + ".parquet")) as file:
            rows = file.read(columns=SUMMARY_COLUMNS).to_pylist()
            meta = file.schema_arrow.metadata or {}
        summary = Summary.of_rows(rows, json.loads(meta[PQ_KEY]) if PQ_KEY in meta else None, review)
        self._write_json(self._task_summary_path(task), summary.to_json(shard_bytes=shard_bytes))
        return summary

    def _task_summary_path(self, task: int) -> str:
        return self.path(self.layout.summaries, task_name(task) + ".json")

    def _job_summary_path(self) -> str:
        return self.path(self.layout.summaries, JOB_SUMMARY)

    def _forget_job_summary(self) -> None:
        """Delete ``job.json`` before a shard changes (once per store, and once after each ``summary``)."""
        if self._job_summary_current:
            self._delete(self._job_summary_path())
            self._job_summary_current = False

    def _read_json(self, path: str):
        """The JSON document at ``path`` (on ``self.fs``), None when there is none."""
        try:
            return json.loads(storage.read_bytes(self.fs, path))
        except FileNotFoundError:
            return None

    def _write_json(self, path: str, doc) -> None:
        self.write(path, json.dumps(doc, separators=(",", ":")).encode())

    def _delete(self, path: str) -> None:
        """Delete a file (on ``self.fs``) if it is there."""
        try:
            storage.delete_file(self.fs, path)
        except FileNotFoundError:
            pass

    def file_size(self, *parts: str) -> int | None:
        """The size of a file in the folder, None when there is none."""
        info = self.fs.get_file_info(self.path(*parts))
        return info.size if info.type == pafs.FileType.File else None
