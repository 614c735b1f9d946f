"""The shard format: self-contained Parquet files, one row per image, and their manifest.

Columns (``SCHEMA``): ``image_id``, ``file_name``, ``height``, ``width``, ``image`` (the original
encoded image bytes), ``panoptic`` (the segment-index map, 0 = void and i = the i-th entry of
``segments``, run-length encoded along rows: see ``encode_index_runs``) and ``segments`` (list
of structs: id, category_id, iscrowd, area, bbox [x, y, w, h]). Shards never point back at
source paths.

Run-length encoding is lossless, costs nothing to produce (validation already walks the runs)
and decodes about 20x faster than a PNG, which the training reader feels on every step.

``_manifest.json`` beside the shards holds the schema version, the category table with its
contiguous stuff/thing index maps, counts, the shard list and every rejected record; its
``source`` names the input's paths and, for the output of ``ciae review pull``, the review
project the annotations came from (``source.review``: the JSON's ``info.ciae_review``). Its
leading ``_`` (and the temporaries' leading ``.``) makes pyarrow, pandas and Spark skip it, so
reading the folder as a Parquet dataset gives one row per image. Folders written before the
rename hold ``manifest.json``: readers fall back to it, and a re-run of ``prepare`` moves it to
the new name.

Writes are atomic: a shard is written to a hidden temporary name and moved into place (on an
object store, uploaded once under its name: ``storage.open_atomic``), so a reader never sees
half a file. Shard names carry a digest of their input records, so a re-run
skips the shards already written and a changed input never mixes with a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ciae.data.panoptic import CategoryTable, DatasetError, RecordError, measure_runs
from pipeline.data import coco, storage

SCHEMA_VERSION = 1
MANIFEST = storage.INTERNAL + "manifest.json"
LEGACY_MANIFEST = "manifest.json"      # the name before MANIFEST; still read
REJECTS_KEY = b"ciae.rejected"
PORTRAIT_KEY = b"ciae.portrait"        # ``encode_portraits``: rows taller than wide (aspect grouping)

SEGMENT_TYPE = pa.struct([
    ("id", pa.int64()),
    ("category_id", pa.int32()),
    ("iscrowd", pa.int8()),
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.int32(), 4)),
])
SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("image", pa.binary()),
    ("panoptic", pa.binary()),
    ("segments", pa.list_(SEGMENT_TYPE)),
], metadata={b"ciae.schema_version": str(SCHEMA_VERSION).encode()})


@dataclass(frozen=True)
class Source:
    """Where a COCO panoptic dataset lives (paths or URIs)."""

    images: str
    panoptic_json: str
    panoptic_dir: str


def convert_record(rec: coco.PanopticRecord, images: tuple, panoptic: tuple) -> dict:
    """Read, validate and encode one image as a shard row. Raises RecordError.

    ``images`` and ``panoptic`` are (filesystem, folder) pairs from ``storage.resolve``."""
    img_fs, img_base = images
    pan_fs, pan_base = panoptic
    image = coco.read_file(rec.name, "image", img_fs, storage.join(img_base, rec.file_name))
    coco.check_image(rec.name, image, rec.height, rec.width)
    png = coco.read_file(rec.name, "panoptic PNG", pan_fs, storage.join(pan_base, rec.panoptic_file))
    return encode_row(rec, image, coco.decode_panoptic(rec.name, png, rec.height, rec.width))


def encode_index_runs(run_index: np.ndarray, lengths: np.ndarray) -> bytes:
    """Row runs of a segment-index map -> bytes: uint32 lengths [R], then uint16 indices [R],
    little-endian."""
    if len(run_index) and int(run_index.max()) > 65535:
        raise ValueError("at most 65535 segments per image")
    return lengths.astype("<u4").tobytes() + run_index.astype("<u2").tobytes()


def decode_index_runs(data: bytes, height: int, width: int) -> np.ndarray:
    """``encode_index_runs`` bytes -> [H, W] int32 segment-index map."""
    n = len(data) // 6
    lengths = np.frombuffer(data, "<u4", count=n)
    values = np.frombuffer(data, "<u2", count=n, offset=4 * n)
    if len(data) != 6 * n or int(lengths.sum(dtype=np.int64)) != height * width:
        raise ValueError(f"panoptic runs do not cover a {width}x{height} image")
    return np.repeat(values.astype(np.int32), lengths).reshape(height, width)


def encode_row(rec: coco.PanopticRecord, image: bytes, ids: np.ndarray) -> dict:
    """A record, its image bytes and its [H, W] id map -> a shard row.

    Areas and boxes are measured on the map; where the JSON gives them they must agree."""
    starts, run_index, lengths = coco.index_runs(rec.name, ids, [s.id for s in rec.segments])
    areas, boxes = measure_runs(starts, run_index, lengths, rec.width, len(rec.segments))
    segments = []
    for s, area, box in zip(rec.segments, areas.tolist(), boxes.tolist()):
        if s.area is not None and s.area != area:
            raise RecordError(rec.name, f"segment {s.id}: JSON area {s.area}, PNG has {area} pixels")
        if s.bbox is not None and s.bbox != box:
            raise RecordError(rec.name, f"segment {s.id}: JSON bbox {s.bbox}, PNG gives {box}")
        segments.append({"id": s.id, "category_id": s.category_id, "iscrowd": s.iscrowd,
                         "area": area, "bbox": box})
    return {"image_id": rec.image_id, "file_name": rec.file_name, "height": rec.height,
            "width": rec.width, "image": image, "panoptic": encode_index_runs(run_index, lengths),
            "segments": segments}


def reject_entry(err: RecordError) -> dict:
    return {"image": err.image, "reason": err.problem}


def shard_name(k: int, records: list[coco.PanopticRecord], categories: CategoryTable) -> str:
    """``part-00007-<digest>.parquet``; the digest covers the records, their segments and the
    category table, so any change of input gives a new name."""
    h = hashlib.sha256(f"v{SCHEMA_VERSION}".encode())
    h.update(json.dumps(categories.to_json(), sort_keys=True).encode())
    for r in records:
        h.update(json.dumps([r.image_id, r.file_name, r.height, r.width, r.panoptic_file,
                             [s.to_json() for s in r.segments]]).encode())
    return f"part-{k:05d}-{h.hexdigest()[:12]}.parquet"


def encode_portraits(rows: list[dict]) -> str:
    """Which shard rows hold an image taller than wide, as the hex of a little-endian bit mask
    (row k: bit k % 8 of byte k // 8; 32 characters for 128 rows)."""
    mask = np.array([r["height"] > r["width"] for r in rows], bool)
    return np.packbits(mask, bitorder="little").tobytes().hex()


def decode_portraits(mask: str, rows: int) -> np.ndarray:
    """``encode_portraits``'s mask of a shard of ``rows`` rows -> [rows] bool."""
    bits = np.frombuffer(bytes.fromhex(mask), np.uint8)
    return np.unpackbits(bits, count=rows, bitorder="little").astype(bool)


def write_shard(fs, path: str, rows: list[dict], rejects: list[dict]) -> None:
    """Write rows to ``path`` atomically; the shard's rejects and portrait rows
    (``encode_portraits``) ride in the file metadata."""
    schema = SCHEMA.with_metadata({**SCHEMA.metadata, REJECTS_KEY: json.dumps(rejects).encode(),
                                   PORTRAIT_KEY: encode_portraits(rows).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    # images are compressed already: zstd would spend time for nothing
    compression = {name: "zstd" for name in SCHEMA.names} | {"image": "none"}
    with storage.open_atomic(fs, path) as f:
        pq.write_table(table, f, compression=compression, row_group_size=16)


def read_shard_summary(uri: str) -> dict:
    """Rows, rejects and portrait rows (``encode_portraits``; None in a shard written before
    they were kept) of a shard already on disk (path or URI), from its footer only."""
    with storage.parquet_file(uri) as file:
        meta = file.metadata
    rejects = json.loads(meta.metadata.get(REJECTS_KEY, b"[]"))
    portrait = meta.metadata.get(PORTRAIT_KEY)
    return {"rows": meta.num_rows, "rejected": rejects, "portrait": None if portrait is None else portrait.decode()}


def write_manifest(fs, out_dir: str, source: Source, categories: CategoryTable,
                   shards: list[dict], rejected: list[dict], n_source_records: int,
                   review: dict | None = None) -> dict:
    """``review``: where the annotations were reviewed (``ciae review pull``'s provenance), kept
    as ``source.review``."""
    rows = sum(s["rows"] for s in shards)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"images": storage.public_uri(source.images),
                   "panoptic_json": storage.public_uri(source.panoptic_json),
                   "panoptic_dir": storage.public_uri(source.panoptic_dir)},
        "categories": categories.to_json(),
        "stuff_index": {str(k): v for k, v in categories.stuff_index.items()},
        "thing_index": {str(k): v for k, v in categories.thing_index.items()},
        "counts": {"source_records": n_source_records, "images": rows, "rejected": len(rejected),
                   "shards": len(shards)},
        "shards": shards,
        "rejected": rejected,
    }
    if review:
        manifest["source"]["review"] = review
    storage.write_bytes_atomic(fs, storage.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    try:    # a folder of the old layout: its manifest now lives under MANIFEST, read first
        storage.delete_file(fs, storage.join(out_dir, LEGACY_MANIFEST))
    except FileNotFoundError:
        pass
    return manifest


# ----------------------------------------------------------------------------------- reading


def manifest_file(fs, base: str) -> str | None:
    """The path of the manifest of the prepared folder ``base`` on ``fs`` (``MANIFEST``, or
    ``LEGACY_MANIFEST`` in a folder of the old layout); None when there is none."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        if storage.file_type(fs, storage.join(base, name)) == pafs.FileType.File:
            return storage.join(base, name)
    return None


def read_manifest(shards_uri: str) -> dict:
    fs, base = storage.resolve(shards_uri)
    for name in (MANIFEST, LEGACY_MANIFEST):
        try:
            manifest = json.loads(storage.read_bytes(fs, storage.join(base, name)))
            break
        except FileNotFoundError:
            continue
    else:
        raise DatasetError(f"{shards_uri}: no {MANIFEST}; run `ciae prepare` first")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{shards_uri}: shard schema version {manifest.get('schema_version')}, "
                                f"this code reads version {SCHEMA_VERSION}")
    return manifest


def model_categories(manifest: dict) -> tuple[list[int], list[int], dict[int, str]]:
    """(stuff ids, thing ids) in contiguous-index order, and id -> name, of a manifest: what a
    model of these shards is built with."""
    stuff = [int(c) for c in sorted(manifest["stuff_index"], key=manifest["stuff_index"].get)]
    things = [int(c) for c in sorted(manifest["thing_index"], key=manifest["thing_index"].get)]
    return stuff, things, {int(c["id"]): c["name"] for c in manifest["categories"]}


def shard_paths(shards_uri: str, manifest: dict | None = None) -> list[str]:
    """The manifest's shard files as full URIs/paths (what Ray Data's read_parquet takes)."""
    manifest = manifest or read_manifest(shards_uri)
    base = shards_uri.rstrip("/")
    return [f"{base}/{s['file']}" for s in manifest["shards"]]


def read_table(shards_uri: str) -> pa.Table:
    """All rows of a prepared dataset as one Arrow table (for small sets and plain loops)."""
    tables = [read_shard(path) for path in shard_paths(shards_uri)]
    return pa.concat_tables(tables).replace_schema_metadata(SCHEMA.metadata) if tables \
        else SCHEMA.empty_table()


def read_shard(uri: str) -> pa.Table:
    """The rows of one shard file (a path or URI from ``shard_paths``)."""
    return storage.read_parquet(uri)


def decode_panoptic_row(row: dict) -> tuple[np.ndarray, list[dict]]:
    """A shard row -> ([H, W] int32 segment-index map, its segments list)."""
    return decode_index_runs(row["panoptic"], row["height"], row["width"]), list(row["segments"])
