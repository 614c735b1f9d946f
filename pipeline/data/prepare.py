"""The data stage: COCO panoptic -> Parquet shards, as a Ray Data job (or, ``in_process``, a
plain loop in one process).

The driver reads and checks the JSON, plans shards of ``rows_per_shard`` images in image-id
order and skips those already written (shard names digest their input). Ray Data runs one task
per remaining shard: read each image and PNG, validate, encode (records whose files are behind
URIs ``READ_THREADS`` at a time, local ones one after the other), write the shard atomically.
A bad record is rejected with its reason and the job goes on. Finally the driver removes stale
shards and temporary files of earlier runs and writes the manifest (``_manifest.json``, hidden
from dataset readers: ``pandas.read_parquet(out)`` gives one row per image; see
``pipeline.data.shards``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from ciae.data.panoptic import RecordError
from pipeline.data import coco, storage
from pipeline.data.shards import (Source, convert_record, encode_portraits, read_shard_summary, reject_entry,
                                  shard_name, write_manifest, write_shard)

READ_THREADS = 8    # a shard's records converted at once when their files are behind URIs


def _record_to_json(r: coco.PanopticRecord) -> dict:
    return {"image_id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width,
            "panoptic_file": r.panoptic_file, "segments": [s.to_json() for s in r.segments]}


def _record_from_json(d: dict) -> coco.PanopticRecord:
    segs = [coco.Segment(**s) for s in d.pop("segments")]
    return coco.PanopticRecord(**d, segments=segs)


def _convert(rec: coco.PanopticRecord, images: tuple, panoptic: tuple) -> tuple[dict | None, dict | None]:
    """(``convert_record``'s shard row, None), or (None, the record's reject entry)."""
    try:
        return convert_record(rec, images, panoptic), None
    except RecordError as e:
        return None, reject_entry(e)
    except Exception as e:  # a record must never abort the job: report it instead
        return None, {"image": rec.name, "reason": f"unexpected {type(e).__name__}: {e}"}


def convert_shard(task: dict) -> dict:
    """Ray Data map function (or one step of the in-process loop): one planned shard in, its
    summary out. Records whose files are behind URIs are converted ``READ_THREADS`` at a time (a
    request to an object store waits for a round trip; each makes the requests it makes alone),
    local ones one after the other; rows and rejects come in record order either way."""
    source = Source(**json.loads(task["source"]))
    images, panoptic = storage.resolve(source.images), storage.resolve(source.panoptic_dir)
    records = [_record_from_json(d) for d in json.loads(task["records"])]
    if "://" in source.images or "://" in source.panoptic_dir:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            results = list(pool.map(lambda rec: _convert(rec, images, panoptic), records))
    else:
        results = [_convert(rec, images, panoptic) for rec in records]
    rows = [row for row, _ in results if row is not None]
    rejects = [reject for _, reject in results if reject is not None]
    fs, out = storage.resolve(task["out"])
    write_shard(fs, storage.join(out, task["file"]), rows, rejects)
    return {"file": task["file"], "rows": len(rows), "rejected": json.dumps(rejects),
            "portrait": encode_portraits(rows)}


def _clean_stale(fs: pafs.FileSystem, out: str, keep: set[str]) -> list[str]:
    """Remove shard files not in the plan and leftover temporary files of interrupted runs
    (names with ``storage.TMP_MARK``: hidden, and the visible ones of earlier versions), found in
    one listing of ``out``."""
    removed = []
    for info in storage.list_folder(fs, out):
        name = info.base_name
        stale = name.startswith("part-") and name.endswith(".parquet") and name not in keep
        if stale or (storage.TMP_MARK in name and info.type == pafs.FileType.File):
            storage.delete_file(fs, info.path)
            removed.append(name)
    return removed


def _converted(tasks: list[dict], address: str | None, in_process: bool) -> Iterator[dict]:
    """The summaries of ``convert_shard`` over ``tasks``: Ray Data tasks, or a plain loop in this
    process (Ray not imported)."""
    if in_process:
        yield from map(convert_shard, tasks)
        return
    from pipeline.cluster.ray_runtime import connect

    with connect(address):
        import ray.data

        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(convert_shard)
        yield from ds.iter_rows()


def prepare(source: Source, out: str, rows_per_shard: int = 128, address: str | None = None,
            progress: bool = True, in_process: bool = False) -> dict:
    """Convert ``source`` into shards under ``out`` (path or URI).

    ``in_process`` converts the planned shards one after the other in this process instead of
    as a Ray Data job (same plan, shards and manifest; for machines without Ray).
    Returns the manifest, plus ``skipped_shards``: how many shards an earlier run had written."""
    from tqdm import tqdm

    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be >= 1")
    if in_process and address is not None:
        raise ValueError("in_process runs without Ray: give no address")
    dataset = coco.load_panoptic_json(source.panoptic_json)
    records = dataset.records
    plan = []
    for k in range(0, len(records), rows_per_shard):
        chunk = records[k:k + rows_per_shard]
        plan.append((shard_name(k // rows_per_shard, chunk, dataset.categories), chunk))

    fs, out_base = storage.resolve(out)
    storage.create_folder(fs, out_base)
    present = {i.base_name for i in storage.list_folder(fs, out_base)}
    done = {name: read_shard_summary(storage.join(out, name)) for name, _ in plan if name in present}
    todo = [(name, chunk) for name, chunk in plan if name not in done]

    if todo:
        source_json = json.dumps(source.__dict__)
        tasks = [{"file": name, "source": source_json, "out": out,
                  "records": json.dumps([_record_to_json(r) for r in chunk])} for name, chunk in todo]
        # closed also when the job fails, before its error is told
        with tqdm(total=sum(len(c) for _, c in todo), unit="img", desc="prepare", disable=not progress) as bar:
            for r in _converted(tasks, address, in_process):
                rejects = json.loads(r["rejected"])
                done[r["file"]] = {"rows": r["rows"], "rejected": rejects, "portrait": r["portrait"]}
                bar.update(r["rows"] + len(rejects))

    _clean_stale(fs, out_base, {name for name, _ in plan})
    shards = [{"file": name, "rows": done[name]["rows"]}                 # no mask in an older shard
              | ({} if done[name]["portrait"] is None else {"portrait": done[name]["portrait"]})
              for name, _ in plan]
    rejected = [reject_entry(e) for e in dataset.rejects]
    rejected += [r for name, _ in plan for r in done[name]["rejected"]]
    manifest = write_manifest(fs, out_base, source, dataset.categories, shards, rejected,
                              n_source_records=len(records) + len(dataset.rejects),
                              review=dataset.info.get("ciae_review"))
    manifest["skipped_shards"] = len(plan) - len(todo)
    return manifest

