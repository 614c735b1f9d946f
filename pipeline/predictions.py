"""Labeling output in COCO panoptic format, written exactly once however often a job restarts.

Layout of an output folder (local path or filesystem URI)::

    panoptic/<key>.png           COCO panoptic PNG of each labeled image (id = R + 256 G + 256² B)
    overlays/<key>.png           pictures of the first N images, when asked for
    records/part-<digest>.json   one per finished batch: {"labeled": [...], "rejected": [...]}
    predictions.json             {"images", "annotations", "categories"}, built from the records
    rejects.json                 [{"file", "image_id", "reason"}] for images that could not be read
    metrics.json                 PQ, when the job had ground truth

Protocol. Every file is written to a temporary name and moved into place, so no reader ever
sees half a file. A batch writes its PNGs (and overlays) first and its record last: a record
vouches for whole files. An image is finished once a record lists it as labeled; a re-run
labels exactly the images no record lists and leaves the others untouched. A rejected image is
tried again by the next run (the file may have been fixed). ``predictions.json`` and
``rejects.json`` are rebuilt from the records at the end of every run, one entry per key
(a batch that Ray retries rewrites the same record name, its digest being that of its keys), and
temporary files of killed runs are removed then. One job at a time per output folder.

A labeled record: {key, image_id, file_name, height, width, segments_info}; a rejected one:
{key, image_id, file, reason}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from pipeline import coco
from pipeline.image_sources import InputImage

PANOPTIC_DIR = "panoptic"
OVERLAY_DIR = "overlays"
RECORD_DIR = "records"
PREDICTIONS = "predictions.json"
REJECTS = "rejects.json"
METRICS = "metrics.json"


class PredictionStore:
    """The output folder of a labeling job (see the module docstring)."""

    def __init__(self, out_uri: str):
        self.uri = out_uri.rstrip("/")
        self.fs, self.base = coco.resolve(out_uri)

    def path(self, *parts: str) -> str:
        """A path inside the folder, on ``self.fs``."""
        return "/".join([self.base.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """The same, as a path or URI that ``coco.resolve`` takes."""
        return "/".join([self.uri, *parts])

    def create(self) -> None:
        for d in (PANOPTIC_DIR, OVERLAY_DIR, RECORD_DIR):
            self.fs.create_dir(self.path(d), recursive=True)

    # ----------------------------------------------------------------------------- a batch

    def write_png(self, key: str, data: bytes) -> None:
        coco.write_bytes_atomic(self.fs, self.path(PANOPTIC_DIR, key + ".png"), data)

    def write_overlay(self, key: str, data: bytes) -> None:
        coco.write_bytes_atomic(self.fs, self.path(OVERLAY_DIR, key + ".png"), data)

    def commit(self, labeled: Sequence[dict], rejected: Sequence[dict]) -> str:
        """Record a finished batch, after its files are in place; returns the record's name."""
        keys = sorted(r["key"] for r in (*labeled, *rejected))
        if not keys:
            raise ValueError("a record needs at least one image")
        name = f"part-{hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:16]}.json"
        doc = {"labeled": list(labeled), "rejected": list(rejected)}
        coco.write_bytes_atomic(self.fs, self.path(RECORD_DIR, name), json.dumps(doc).encode())
        return name

    # ---------------------------------------------------------------------------- reading

    def _list(self, folder: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path(folder)))
        except FileNotFoundError:
            return []

    def _read_record(self, info: pafs.FileInfo) -> dict:
        try:
            doc = json.loads(coco.read_bytes(self.fs, info.path))
            return {"labeled": list(doc["labeled"]), "rejected": list(doc["rejected"])}
        except (ValueError, KeyError, TypeError) as e:
            raise coco.DatasetError(f"{self.uri_of(RECORD_DIR, info.base_name)}: unreadable record "
                                    f"({type(e).__name__}: {e}); delete it to label its images again") from None

    def records(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(labeled, rejected) entries of every record, by key; a key labeled anywhere is not
        in ``rejected``. Records are read in name order, the first entry of a key kept."""
        infos = sorted((i for i in self._list(RECORD_DIR)
                        if i.base_name.startswith("part-") and i.base_name.endswith(".json")),
                       key=lambda i: i.base_name)
        with ThreadPoolExecutor(16) as pool:  # object stores answer many small reads in parallel
            docs = list(pool.map(self._read_record, infos))
        labeled: dict[str, dict] = {}
        rejected: dict[str, dict] = {}
        for doc in docs:
            for r in doc["labeled"]:
                labeled.setdefault(r["key"], r)
            for r in doc["rejected"]:
                rejected.setdefault(r["key"], r)
        return labeled, {k: r for k, r in rejected.items() if k not in labeled}

    # ---------------------------------------------------------------------------- the end

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary files of interrupted writes; returns their names."""
        removed = []
        for folder in ("", PANOPTIC_DIR, OVERLAY_DIR, RECORD_DIR):
            for info in self._list(folder):
                if ".tmp-" in info.base_name and info.type == pafs.FileType.File:
                    self.fs.delete_file(info.path)
                    removed.append(info.base_name)
        return removed

    def finalize(self, images: Sequence[InputImage], categories: list[dict],
                 records: tuple[dict, dict] | None = None) -> dict:
        """Write ``predictions.json`` and ``rejects.json`` from the records of the images in
        ``images`` (input order) and remove temporaries. ``records``: what :meth:`records`
        returned, if the caller has it. Returns {"labeled", "rejected", "pending"} counts
        (pending: neither labeled nor rejected, e.g. not yet run)."""
        labeled, rejected = records or self.records()
        doc = {"images": [], "annotations": [], "categories": categories}
        rejects = []
        for im in images:
            if im.key in labeled:
                r = labeled[im.key]
                doc["images"].append({"id": r["image_id"], "file_name": r["file_name"],
                                      "height": r["height"], "width": r["width"]})
                doc["annotations"].append({"image_id": r["image_id"], "file_name": im.key + ".png",
                                           "segments_info": r["segments_info"]})
            elif im.key in rejected:
                r = rejected[im.key]
                rejects.append({"file": r["file"], "image_id": r["image_id"], "reason": r["reason"]})
        coco.write_bytes_atomic(self.fs, self.path(PREDICTIONS), json.dumps(doc).encode())
        coco.write_bytes_atomic(self.fs, self.path(REJECTS), (json.dumps(rejects, indent=1) + "\n").encode())
        self.remove_temporaries()
        n_labeled = len(doc["annotations"])
        return {"labeled": n_labeled, "rejected": len(rejects),
                "pending": len(images) - n_labeled - len(rejects)}
