"""Our segments (an id map and its segments_info) to and from Label Studio brush regions, in the
tool's RLE through its own converter (``label_studio_sdk.converter.brush``).

``prediction_of``: a labeled image -> one prediction: every segment as a brush region
(``mask2rle``), labeled with its category's name and carrying its score; crowd segments also get
the per-region ``crowd`` choice. The prediction's score is the image's quality.

``panoptic_png``: a task's regions -> COCO panoptic (an id PNG and its segments_info): each
region's mask decoded with ``decode_rle`` and painted in result order into one id map (a later
region wins where two overlap; unpainted pixels are void, id 0); regions of one stuff category
merge into one segment, each thing region is its own segment, ``iscrowd`` from the region's
``crowd`` choice. What the format cannot carry: segment ids (renumbered 1, 2, ... in region
order) and per-segment scores of annotations.

Orientation: maps and regions are as viewers show the image, its EXIF orientation applied (as
``ciae.data.transform.decode_rgb`` labels it); the image is uploaded as its bytes are, tag included,
and Label Studio shows it turned the same way (the browser's ``<img>`` applies the tag), so
regions drawn there have the same size.

The converter is pure Python (~4 ms an image to encode, ~10 to decode at 256x256): these functions
are what ``workflows.review.sync`` runs in its worker processes.
"""

from __future__ import annotations

import numpy as np

from workflows.review.client import CROWD, IMAGE, LABELS, ReviewError


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


def panoptic_png(job: tuple[list[dict], int, int], categories: list[dict]) -> tuple[bytes, list[dict]]:
    """(regions, height, width) -> (the id PNG, segments_info): ``_painted``, encoded."""
    from pipeline.data.panoptic_png import encode_id_png

    ids, segments = _painted(*job, categories)
    return encode_id_png(ids), segments
