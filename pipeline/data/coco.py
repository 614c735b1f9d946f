"""Reading and validating COCO panoptic datasets from a local path or a filesystem URI, and
the COCO RLE of an id map's segments (``segment_rles``).

A dataset is ``panoptic.json`` (images, annotations with ``segments_info``, categories), a
folder of images and a folder of panoptic PNGs. Problems with one image never stop the reader:
they come back as :class:`RecordError` naming the image and what is wrong, and the caller
decides whether to reject the record (the data stage) or raise (the evaluator).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ciae.data.panoptic import MAX_SEGMENT_ID, Category, CategoryTable, DatasetError, RecordError, row_runs
from pipeline.data.panoptic_png import decode_id_png
from pipeline.data.storage import read_bytes, read_uri

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# --------------------------------------------------------------------------------- records


@dataclass(slots=True)
class Segment:
    id: int
    category_id: int
    iscrowd: int
    area: int | None = None
    bbox: list[int] | None = None  # [x, y, w, h]

    def to_json(self) -> dict:
        return {"id": self.id, "category_id": self.category_id, "iscrowd": self.iscrowd,
                "area": self.area, "bbox": self.bbox}


@dataclass
class PanopticRecord:
    """One image of a COCO panoptic dataset, as its JSON describes it."""

    image_id: int
    file_name: str
    height: int
    width: int
    panoptic_file: str
    segments: list[Segment] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"image {self.image_id} ({self.file_name})"


@dataclass
class CocoPanoptic:
    """The JSON side of a dataset: records that passed the JSON checks, and the rejected ones."""

    categories: CategoryTable
    records: list[PanopticRecord]
    rejects: list[RecordError]
    info: dict = field(default_factory=dict)    # the JSON's "info" object ({} when absent)


def _parse_segment(name: str, k: int, s: dict, categories: dict[int, Category]) -> Segment:
    try:
        sid, cid, crowd, area, bbox = s["id"], s["category_id"], s.get("iscrowd", 0), s.get("area"), s.get("bbox")
        if not (type(sid) is int and type(cid) is int and type(crowd) is int):  # the common case skips int()
            sid, cid, crowd = int(sid), int(cid), int(crowd)
        if area is not None:
            area = int(area)
        if bbox is not None:
            bbox = [round(v) for v in bbox]
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(name, f"segments_info[{k}] is malformed ({e!r})") from None
    if not 0 < sid <= MAX_SEGMENT_ID:
        raise RecordError(name, f"segment id {sid} is outside [1, {MAX_SEGMENT_ID}] (0 is void)")
    if cid not in categories:
        raise RecordError(name, f"segment {sid} has unknown category_id {cid}")
    return Segment(sid, cid, crowd, area, bbox)


def annotations_by_image(annotations: list, what: str) -> tuple[list[tuple[int, dict]], list[RecordError]]:
    """(image id, annotation) of each annotation, and a RecordError for each without a valid
    ``image_id`` (``what`` names the kind of entry in the message)."""
    pairs, errors = [], []
    for k, ann in enumerate(annotations):
        try:
            pairs.append((int(ann["image_id"]), ann))
        except (KeyError, TypeError, ValueError):
            errors.append(RecordError(f"annotations[{k}]", f"{what} without a valid image_id"))
    return pairs, errors


def parse_panoptic_json(doc: dict, source: str, categories: CategoryTable | None = None) -> CocoPanoptic:
    """Check a parsed panoptic JSON and split its images into good records and rejects."""
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{source}: missing or malformed '{key}' list")
    if categories is None:
        if not isinstance(doc.get("categories"), list):
            raise DatasetError(f"{source}: missing or malformed 'categories' list")
        categories = CategoryTable.from_json(doc["categories"], source)
    cats = categories.by_id
    rejects: list[RecordError] = []

    images: dict[int, dict] = {}
    image_counts = Counter()
    for k, im in enumerate(doc["images"]):
        try:
            iid = int(im["id"])
            images.setdefault(iid, im)
            image_counts[iid] += 1
        except (KeyError, TypeError, ValueError):
            rejects.append(RecordError(f"images[{k}]", f"image entry without a valid id: {im}"))
    annotations: dict[int, dict] = {}
    ann_counts = Counter()
    pairs, errors = annotations_by_image(doc["annotations"], "annotation")
    rejects += errors
    for iid, ann in pairs:
        annotations.setdefault(iid, ann)
        ann_counts[iid] += 1

    records = []
    for iid in sorted(set(images) | set(annotations)):
        im = images.get(iid)
        name = f"image {iid} ({im.get('file_name', '?')})" if im else f"image {iid}"
        try:
            if image_counts[iid] > 1:
                raise RecordError(name, f"duplicate image id: {image_counts[iid]} entries in 'images'")
            if im is None:
                raise RecordError(name, "annotation for an image id missing from 'images'")
            if iid not in annotations:
                raise RecordError(name, "no annotation in 'annotations'")
            if ann_counts[iid] > 1:
                raise RecordError(name, f"{ann_counts[iid]} annotations for one image")
            ann = annotations[iid]
            try:
                rec = PanopticRecord(iid, str(im["file_name"]), int(im["height"]), int(im["width"]),
                                     str(ann["file_name"]))
            except (KeyError, TypeError, ValueError) as e:
                raise RecordError(name, f"missing or malformed field {e!r}") from None
            infos = ann.get("segments_info")
            if not isinstance(infos, list):
                raise RecordError(name, "annotation has no 'segments_info' list")
            rec.segments = [_parse_segment(name, k, s, cats) for k, s in enumerate(infos)]
            if len({s.id for s in rec.segments}) < len(rec.segments):
                dup = sorted(i for i, n in Counter(s.id for s in rec.segments).items() if n > 1)
                raise RecordError(name, f"duplicate segment ids {dup}")
            records.append(rec)
        except RecordError as e:
            rejects.append(e)
    info = doc.get("info")
    return CocoPanoptic(categories, records, rejects, info if isinstance(info, dict) else {})


def read_json(uri: str, what: str = "JSON"):
    """A JSON document from a path or URI; a missing or unparsable file is a DatasetError."""
    try:
        return json.loads(read_uri(uri))
    except FileNotFoundError:
        raise DatasetError(f"{uri}: file not found") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{uri}: cannot read {what} ({e})") from None


def load_panoptic_json(uri: str, categories: CategoryTable | None = None) -> CocoPanoptic:
    """Read and check a COCO panoptic JSON from a path or URI."""
    doc = read_json(uri, "panoptic JSON")
    if not isinstance(doc, dict):
        raise DatasetError(f"{uri}: expected a JSON object")
    return parse_panoptic_json(doc, uri, categories)


# ------------------------------------------------------------------------- per-image checks


def read_file(name: str, what: str, fs: pafs.FileSystem, path: str) -> bytes:
    """Read one file of a record; a missing or unreadable file is a RecordError."""
    try:
        return read_bytes(fs, path)
    except FileNotFoundError:
        raise RecordError(name, f"{what} file {path} is missing") from None
    except OSError as e:
        raise RecordError(name, f"{what} file {path} is unreadable ({e})") from None


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def check_image(name: str, data: bytes, height: int, width: int) -> str:
    """Check that encoded image bytes are whole and of the expected size; returns the format.

    The size is the one viewers show, the EXIF orientation applied as ``ciae.data.transform.decode_rgb``
    applies it: ground truth (the JSON's size, the panoptic PNG) is taken in that orientation,
    as annotation tools produce it. JPEG and PNG are checked by structure (a parsable header and
    the end marker in the last bytes, which a truncated file lacks) at a hundredth of a decode's
    cost; other formats are decoded in full."""
    from PIL import Image

    from ciae.data.transform import exif_orientation, oriented_size

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, stored = im.format, im.size
            marker = _END_MARKERS.get(fmt)
            if marker is None:
                im.load()
            elif data.rfind(marker, max(0, len(data) - 64)) < 0:
                raise OSError(f"no {fmt} end marker: the file is truncated")
            orientation = exif_orientation(im, data)
    except Exception as e:  # PIL raises many types for corrupt data
        raise RecordError(name, f"image is unreadable or truncated ({type(e).__name__}: {e})") from None
    size = oriented_size(stored, orientation)
    if size != (width, height):
        shown = (f"{size[0]}x{size[1]} as shown (EXIF orientation {orientation} applied; "
                 f"{stored[0]}x{stored[1]} as stored)" if orientation != 1 else f"{size[0]}x{size[1]}")
        raise RecordError(name, f"image is {shown} but the JSON says {width}x{height}")
    return fmt


def decode_panoptic(name: str, data: bytes, height: int, width: int, what: str = "panoptic PNG",
                    out: np.ndarray | None = None) -> np.ndarray:
    """Panoptic PNG bytes -> [H, W] uint32 ids (into ``out`` if given, see ``decode_id_png``),
    checking that it decodes and has the image's size; a problem is a RecordError naming the
    image and ``what`` (the data stage and the evaluator both decode here)."""
    try:
        ids = decode_id_png(data, out)
    except Exception as e:  # the decoders raise many types for corrupt data
        raise RecordError(name, f"{what} is unreadable or truncated ({type(e).__name__}: {e})") from None
    if ids.shape != (height, width):
        turned = (" (turned: panoptic PNGs are taken in the image's orientation as viewers show "
                  "it, its EXIF orientation applied)" if ids.shape == (width, height) else "")
        raise RecordError(name, f"{what} is {ids.shape[1]}x{ids.shape[0]} "
                                f"but the image is {width}x{height}{turned}")
    return ids


def index_runs(name: str, ids: np.ndarray, segment_ids: list[int]):
    """Row runs of an [H, W] id map as (starts [R], segment index [R], lengths [R]), the index
    being 0 for void and i for the (i-1)-th of ``segment_ids``.

    Raises RecordError when the PNG holds ids the list lacks, or the list has ids the PNG lacks.
    """
    starts, values, lengths = row_runs(ids)
    keys = np.asarray(segment_ids, dtype=np.uint32)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, values), max(len(keys) - 1, 0))
    known = sorted_keys[pos] == values if len(keys) else np.zeros(len(values), bool)
    stray = ~known & (values != 0)
    if stray.any():
        extra = np.unique(values[stray])
        raise RecordError(name, f"panoptic PNG has segment ids missing from segments_info: "
                                f"{extra[:10].tolist()}{' ...' if len(extra) > 10 else ''}")
    run_index = np.where(known, order[pos] + 1, 0)
    present = np.bincount(run_index, minlength=len(keys) + 1)[1:] > 0
    if not present.all():
        absent = [segment_ids[i] for i in np.flatnonzero(~present)]
        raise RecordError(name, f"segments_info ids not in the panoptic PNG: {absent[:10]}")
    return starts, run_index, lengths


def segment_rles(ids: np.ndarray, segment_ids) -> list[str]:
    """COCO compressed RLE counts of each of ``segment_ids`` in an [H, W] id map: for id k the
    string ``pycocotools.mask.encode(np.asfortranarray(ids == k))["counts"]`` gives, made from
    one pass over the map's runs down its columns (COCO's order) instead of a full-image mask
    per segment. An id the map lacks gets the empty mask's counts."""
    from pycocotools import mask

    h, w = ids.shape
    starts, values, lengths = row_runs(ids.T)     # a run stops at each column's end
    wanted = np.asarray(segment_ids, dtype=values.dtype)
    keep = np.isin(values, wanted)
    order = np.argsort(values[keep], kind="stable")   # per id, its runs in order
    starts, values, lengths = starts[keep][order], values[keep][order], lengths[keep][order]
    bounds = zip(np.searchsorted(values, wanted, "left").tolist(), np.searchsorted(values, wanted, "right").tolist())
    out = []
    for a, b in bounds:
        counts = [h * w]
        if b > a:
            s, n = starts[a:b], lengths[a:b]
            joined = np.flatnonzero(np.r_[True, s[1:] != s[:-1] + n[:-1]])   # runs going on past a column end
            s, n = s[joined], np.add.reduceat(n, joined)
            end = s + n
            counts = np.stack([s - np.r_[0, end[:-1]], n], axis=1).ravel().tolist()
            if end[-1] < h * w:
                counts.append(h * w - int(end[-1]))
        out.append(mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"].decode("ascii"))
    return out
