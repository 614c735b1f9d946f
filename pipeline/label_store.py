"""The output of a labeling job: Parquet shards, one per task of the plan, written exactly once
however often the job restarts. The exports made from them are ``pipeline.label_exports``'s.

Layout of an output folder (local path or filesystem URI), ``LAYOUT``. Read as a Parquet dataset
(``pandas.read_parquet(OUT)``, ``pyarrow.dataset.dataset(OUT, format="parquet")``, Spark) it
gives one row per image: every name beside ``labels/`` starts with ``_`` (and temporaries with
``.``), which those readers skip::

    labels/task-KKKKKK.parquet      a task's results, sealed: one row per image of the task
    _plan/                          the input, planned once (``pipeline.image_sources``)
    _parts/task-KKKKKK/*.parquet    results of the batches of a task not yet sealed
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
per key, writes the shard (footer: the task's PQ statistics), then removes the parts. A re-run
lists ``labels/`` (one name per task) and the parts of the unsealed tasks, and labels only what
neither holds. Exports read the shards only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ciae.evaluation.pq import PQAccumulator
from ciae.panoptic import CategoryTable, DatasetError
from pipeline import storage
from pipeline.image_sources import PLAN_FILE

PQ_KEY = b"ciae.pq"           # a sealed shard's footer: its PQ statistics (PQAccumulator.to_json), JSON


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

    def folders(self) -> list[str]:
        """The folders (besides the output itself and the parts) that files are written into."""
        coco = self.predictions.rpartition("/")[0]
        return [f for f in (self.plan, self.labels, self.panoptic, self.overlays, coco) if f]


LAYOUT = Layout(plan="_plan", parts="_parts", labels="labels", panoptic="_coco/panoptic",
                predictions="_coco/predictions.json", instances="_coco/instances.json",
                rejects="_rejects.json", review="_review.csv", metrics="_metrics.json", overlays="_overlays")
LEGACY_LAYOUT = Layout(plan="plan", parts="parts", labels="labels", panoptic="panoptic",
                       predictions="predictions.json", instances="instances.json", rejects="rejects.json",
                       review="review.csv", metrics="metrics.json", overlays="overlays")

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
            self.fs.create_dir(self.base, recursive=True)
            storage.write_bytes_atomic(self.fs, probe, b"")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.uri}: cannot write the output there ({e})") from None

    # ----------------------------------------------------------------------------- writing

    def write_png(self, key: str, data: bytes) -> None:
        self.write(self.path(self.layout.panoptic, key + ".png"), data)

    def write_overlay(self, key: str, data: bytes) -> None:
        self.write(self.path(self.layout.overlays, key + ".png"), data)

    def write(self, path: str, data: bytes) -> None:
        """Write ``data`` atomically to ``path`` (on ``self.fs``), creating its folder."""
        self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        storage.write_bytes_atomic(self.fs, path, data)

    def _write_table(self, path: str, table: pa.Table, **options) -> None:
        self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        with storage.open_atomic(self.fs, path) as f:
            pq.write_table(table, f, compression="zstd", **options)

    def write_part(self, task: int, rows: list[dict]) -> str:
        """Write one batch's rows of a task (``SCHEMA``) as a part; returns its name."""
        keys = sorted(r["key"] for r in rows)
        name = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:16] + ".parquet"
        self._write_table(self.path(self.layout.parts, task_name(task), name),
                          pa.Table.from_pylist(rows, schema=SCHEMA))
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
        return {int(i.base_name[5:11]) for i in storage.list_folder(self.fs, self.path(self.layout.labels))
                if i.base_name.startswith("task-") and i.base_name.endswith(".parquet")}

    def _shard(self, task: int) -> str:
        return self.path(self.layout.labels, task_name(task) + ".parquet")

    def seal(self, task: int, size: int, categories: CategoryTable) -> None:
        """Merge a task's parts into its shard (one row per key, plan order), then remove the
        parts. Raises RuntimeError when they do not hold ``size`` images."""
        tables = [storage.read_parquet(uri) for uri in self._parts(task)]
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
        self._write_table(self._shard(task), table.replace_schema_metadata(schema.metadata), row_group_size=256)
        self.fs.delete_dir(self.path(self.layout.parts, task_name(task)))

    def unseal_rejected(self, task: int) -> list[str]:
        """Turn a sealed task with rejected images back into parts holding its labeled rows, so
        that a run labels the rejected ones again; returns their keys."""
        table = storage.read_parquet(self.uri_of(self.layout.labels, task_name(task) + ".parquet"))
        rejected = pc.equal(table["status"], "rejected")
        if not pc.any(rejected).as_py():
            return []
        keep = table.filter(pc.invert(rejected))
        if keep.num_rows:
            self.write_part(task, keep.to_pylist())
        else:
            self.fs.create_dir(self.path(self.layout.parts, task_name(task)), recursive=True)
        self.fs.delete_file(self._shard(task))
        return table.filter(rejected)["key"].to_pylist()

    def remove_temporaries(self) -> None:
        """Delete the temporaries of interrupted writes (in the folder, its plan, shards, PNG,
        panel and COCO folders, and the parts of unsealed tasks)."""
        storage.remove_temporaries(self.fs, self.base)
        for folder in self.layout.folders():
            storage.remove_temporaries(self.fs, self.path(folder))
        for task in self.unsealed_tasks():
            storage.remove_temporaries(self.fs, self.path(self.layout.parts, task_name(task)))

    # ----------------------------------------------------------------------------- reading

    def shards(self) -> list[str]:
        """The URIs of the sealed shards, in task order."""
        return [self.uri_of(self.layout.labels, task_name(t) + ".parquet") for t in sorted(self.sealed())]

    def rows(self, columns: list[str]) -> Iterator[dict]:
        """The rows of every shard, in plan order, holding only ``columns`` (one row group of
        one shard in memory at a time)."""
        for uri in self.shards():
            with storage.parquet_file(uri) as file:
                for g in range(file.num_row_groups):
                    yield from file.read_row_group(g, columns=columns).to_pylist()

    def counts(self) -> dict:
        """{"labeled", "rejected"} over the shards, from one column."""
        counts = {"labeled": 0, "rejected": 0}
        for r in self.rows(["status"]):
            counts[r["status"]] += 1
        return counts

    def pq_total(self, categories: CategoryTable) -> PQAccumulator:
        """The PQ statistics of every sealed shard, from their footers."""
        acc = PQAccumulator(categories)
        for uri in self.shards():
            with storage.parquet_file(uri) as file:
                meta = file.schema_arrow.metadata or {}
            if PQ_KEY in meta:
                acc.add_json(json.loads(meta[PQ_KEY]))
        return acc

    def file_size(self, *parts: str) -> int | None:
        """The size of a file in the folder, None when there is none."""
        info = self.fs.get_file_info(self.path(*parts))
        return info.size if info.type == pafs.FileType.File else None
