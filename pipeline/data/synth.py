"""Synthetic datasets in exact COCO panoptic format: the embedded default data.

Each image is a stack of textured stuff bands (each stuff class has its own texture, base
colour and preferred height in the image) under overlapping thing instances (each thing class
has its own shape and colour family; instances vary in size, aspect, shade and position). Some
images hold a crowd segment (a cluster of small things labelled as one ``iscrowd`` segment),
and void pixels appear as blobs and as thin rings around some instances, as in COCO.
Everything is deterministic in (seed, image index).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image

from ciae.data.panoptic import CategoryTable, measure_segments
from pipeline.data.panoptic_png import MAX_SEGMENT_ID, encode_id_png

DEFAULT_CATEGORIES = ("sky-other-merged", "wall-brick", "grass-merged", "road",
                      "person", "car", "sports ball", "kite")
SHAPES = ("ellipse", "box", "disc", "diamond")
TEXTURES = ("gradient", "bricks", "stripes", "speckle", "waves")


def coco_categories() -> CategoryTable:
    """The 133 COCO panoptic categories shipped with the package."""
    text = resources.files("pipeline").joinpath("data/coco_panoptic_categories.json").read_text()
    return CategoryTable.from_json(json.loads(text), "coco_panoptic_categories.json")


def select_categories(names: list[str] | tuple[str, ...] = DEFAULT_CATEGORIES) -> CategoryTable:
    """A subset of the COCO categories, by name or id; needs at least one stuff and one thing."""
    table = coco_categories()
    by_key = {c.name: c for c in table.categories} | {str(c.id): c for c in table.categories}
    unknown = [n for n in names if str(n) not in by_key]
    if unknown:
        raise ValueError(f"unknown COCO panoptic categories: {unknown}")
    chosen = CategoryTable(tuple(sorted({by_key[str(n)] for n in names}, key=lambda c: c.id)))
    if not chosen.stuff_ids or not chosen.thing_ids:
        raise ValueError("the subset needs at least one stuff and one thing category")
    return chosen


@dataclass
class SynthSpec:
    height: int = 256
    width: int = 256
    min_things: int = 2
    max_things: int = 6
    crowd_prob: float = 0.25
    void_prob: float = 0.4


def _texture(kind: str, color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng) -> np.ndarray:
    """[H, W, 3] float image of a stuff texture around ``color``."""
    h, w = yy.shape
    if kind == "gradient":
        t = (yy / h - 0.5)[..., None] * 60.0
    elif kind == "bricks":
        row = (yy // 12).astype(int)
        mortar = ((yy % 12) < 2) | (((xx + 12 * (row % 2)) % 24) < 2)
        t = np.where(mortar, -70.0, 0.0)[..., None]
    elif kind == "stripes":
        t = (25.0 * np.sin(xx * 0.9 + 0.3 * yy))[..., None]
    elif kind == "speckle":
        t = rng.normal(0, 22.0, (h, w, 1))
    else:  # waves
        t = (30.0 * np.sin(yy * 0.5 + 4 * np.sin(xx * 0.08)))[..., None]
    return color + t + rng.normal(0, 6.0, (h, w, 3))


def _shape_mask(shape: str, yy, xx, cy, cx, ry, rx) -> np.ndarray:
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    if shape in ("ellipse", "disc"):
        return dy * dy + dx * dx <= 1.0
    if shape == "box":
        return (np.abs(dy) <= 1.0) & (np.abs(dx) <= 1.0)
    return np.abs(dy) + np.abs(dx) <= 1.0  # diamond


def render(categories: CategoryTable, index: int, seed: int, spec: SynthSpec):
    """One synthetic image.

    Returns (rgb [H, W, 3] uint8, ids [H, W] uint32 COCO segment ids, segments_info list)."""
    rng = np.random.default_rng([seed, index])
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stuff = [categories.by_id[i] for i in categories.stuff_ids]
    things = [categories.by_id[i] for i in categories.thing_ids]
    img = np.zeros((h, w, 3), np.float32)
    seg_cat = np.zeros((h, w), np.int64)   # stuff category or -(thing instance number)
    instances: list[tuple[int, int]] = []  # (category_id, iscrowd) per thing instance

    # Stuff: 1-3 bands in their preferred order top to bottom, with wavy boundaries.
    k = rng.integers(1, min(3, len(stuff)) + 1)
    bands = sorted(rng.choice(len(stuff), size=k, replace=False))
    cuts = np.sort(rng.uniform(0.25, 0.8, size=k - 1)) * h
    band_of = np.zeros((h, w), np.int64)
    for j, cut in enumerate(cuts):
        wave = cut + rng.uniform(4, 14) * np.sin(xx * rng.uniform(0.02, 0.06) + rng.uniform(0, 6.3))
        band_of += (yy > wave).astype(np.int64)
    for j, b in enumerate(bands):
        cat = stuff[b]
        tex = _texture(TEXTURES[categories.stuff_ids.index(cat.id) % len(TEXTURES)],
                       np.asarray(cat.color, np.float32), yy, xx, rng)
        m = band_of == j
        img[m] = tex[m]
        seg_cat[m] = cat.id

    void = np.zeros((h, w), bool)
    noise = rng.normal(0, 5.0, (h, w, 3)).astype(np.float32)
    n_things = int(rng.integers(spec.min_things, spec.max_things + 1))
    plan = [("instance", rng.integers(len(things))) for _ in range(n_things)]
    if rng.random() < spec.crowd_prob:
        plan.insert(int(rng.integers(len(plan) + 1)), ("crowd", rng.integers(len(things))))
    for kind, t in plan:
        cat = things[t]
        shape = SHAPES[categories.thing_ids.index(cat.id) % len(SHAPES)]
        base = np.asarray(cat.color, np.float32)
        if kind == "crowd":  # a cluster of small shapes forming one crowd segment
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            mask = np.zeros((h, w), bool)
            for _ in range(int(rng.integers(4, 8))):
                r = rng.uniform(0.03, 0.05) * min(h, w)
                mask |= _shape_mask(shape, yy, xx, cy + rng.normal(0, 0.06 * h),
                                    cx + rng.normal(0, 0.06 * w), r * 1.3, r)
        else:
            size = rng.uniform(0.08, 0.25) * min(h, w)
            aspect = {"ellipse": 1.8, "box": 0.6}.get(shape, 1.0) * rng.uniform(0.85, 1.2)
            ry, rx = size * np.sqrt(aspect), size / np.sqrt(aspect)
            cy, cx = rng.uniform(ry * 0.5, h - ry * 0.5), rng.uniform(rx * 0.5, w - rx * 0.5)
            mask = _shape_mask(shape, yy, xx, cy, cx, ry, rx)
            if rng.random() < 0.3:  # an unlabelled ring around the object, as COCO has
                ring = _shape_mask(shape, yy, xx, cy, cx, ry + 2, rx + 2) & ~mask
                void |= ring
        if not mask.any():
            continue
        shade = base + rng.uniform(-45, 45, size=3)
        img[mask] = shade * (1.0 + 0.35 * (yy[mask] - cy) / h)[:, None] + noise[mask]
        instances.append((cat.id, int(kind == "crowd")))
        seg_cat[mask] = -len(instances)
        void &= ~mask

    if rng.random() < spec.void_prob:  # an unlabelled blob
        r = rng.uniform(0.04, 0.1) * min(h, w)
        blob = _shape_mask("ellipse", yy, xx, rng.uniform(0, h), rng.uniform(0, w), r, r * 1.5)
        void |= blob
        img[blob] = rng.normal(25.0, 8.0, (int(blob.sum()), 3))
    seg_cat[void] = 0

    # Segments: every non-void label with at least 16 pixels (smaller slivers left by occlusion
    # become void), with distinct random 24-bit ids, as COCO's colour-derived ids are.
    keys, inverse = np.unique(seg_cat, return_inverse=True)
    counts = np.bincount(inverse.ravel(), minlength=len(keys))
    kept = np.flatnonzero((keys != 0) & (counts >= 16))
    lut = np.zeros(len(keys), np.int64)
    lut[kept] = np.arange(1, len(kept) + 1)
    index = lut[inverse.reshape(h, w)]
    seg_ids = rng.choice(MAX_SEGMENT_ID, size=len(kept), replace=False) + 1
    ids = np.r_[0, seg_ids].astype(np.uint32)[index]
    areas, boxes = measure_segments(index, len(kept))
    segments = []
    for j, key in enumerate(keys[kept]):
        cid, crowd = (int(key), 0) if key > 0 else instances[-int(key) - 1]
        segments.append({"id": int(seg_ids[j]), "category_id": cid, "iscrowd": crowd,
                         "area": int(areas[j]), "bbox": boxes[j].tolist()})
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return rgb, ids, segments


def write_dataset(out: str, n_images: int = 32, seed: int = 0, categories: CategoryTable | None = None,
                  spec: SynthSpec | None = None, progress: bool = False) -> dict:
    """Write ``out/images/*.jpg``, ``out/panoptic/*.png`` and ``out/panoptic.json``.

    Returns the panoptic JSON document. Image ids are 1..n_images."""
    from tqdm import tqdm

    categories = categories or select_categories()
    spec = spec or SynthSpec()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "panoptic"), exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(n_images), desc="synth", unit="img", disable=not progress):
        rgb, ids, segments = render(categories, i, seed, spec)
        stem = f"synth_{seed:04d}_{i:06d}"
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
        with open(os.path.join(out, "images", stem + ".jpg"), "wb") as f:
            f.write(buf.getvalue())
        with open(os.path.join(out, "panoptic", stem + ".png"), "wb") as f:
            f.write(encode_id_png(ids))
        images.append({"id": i + 1, "file_name": stem + ".jpg", "height": spec.height, "width": spec.width})
        annotations.append({"image_id": i + 1, "file_name": stem + ".png", "segments_info": segments})
    doc = {"info": {"description": f"ciae-panoptic synthetic dataset, seed {seed}"},
           "images": images, "annotations": annotations, "categories": categories.to_json()}
    with open(os.path.join(out, "panoptic.json"), "w") as f:
        json.dump(doc, f)
    return doc
