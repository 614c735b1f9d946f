"""Pictures of panoptic predictions and pixel embeddings.

* :func:`overlay`: the image blended with one colour per segment (the category's COCO colour,
  varied per instance so that no two segments share a colour), instance outlines, and class
  names written on the segments.
* :func:`embedding_pca`: a [D, h, w] embedding map as an RGB picture of its first three
  principal components, as in the paper's Fig. 4c.
* :func:`panel`: side by side, as the paper's Fig. 6: the image, the prediction, the ground
  truth (when known) and the embedding PCA (when given), each captioned.

Training logs panels of held-out images to MLflow; labeling writes them for the first images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUTLINE = (255, 255, 255)
GREY = (128, 128, 128)


def segment_colors(segments_info: Sequence[dict], categories: Sequence[dict]) -> dict[int, tuple]:
    """segment id -> (r, g, b): its category's colour (grey for an unknown category), shifted
    deterministically (seeded by the segment id) until it differs from every other segment's."""
    by_id = {int(c["id"]): c for c in categories}
    used: set[tuple] = set()
    colors = {}
    for s in segments_info:
        base = np.array(by_id.get(int(s["category_id"]), {}).get("color", GREY), dtype=np.int64)
        color = tuple(int(v) for v in base)
        rng = np.random.default_rng(int(s["id"]))
        while color in used:
            color = tuple(int(v) for v in np.clip(base + rng.integers(-64, 65, 3), 0, 255))
        used.add(color)
        colors[int(s["id"])] = color
    return colors


def instance_boundaries(ids: np.ndarray, instance_ids: Sequence[int]) -> np.ndarray:
    """[H, W] bool: pixels of the given segments with a 4-neighbour of another id (the image
    border does not count as a boundary)."""
    edge = np.zeros(ids.shape, bool)
    dy = ids[1:] != ids[:-1]
    dx = ids[:, 1:] != ids[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge & np.isin(ids, np.asarray(list(instance_ids), dtype=ids.dtype))


def label_position(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` [H, W] closest to the mask's centroid (inside the
    segment even when it is not convex)."""
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(xs[k]), int(ys[k])


def overlay(image: np.ndarray, ids: np.ndarray, segments_info: Sequence[dict],
            categories: Sequence[dict], alpha: float = 0.5, labels: bool = True,
            min_label_area: int = 64) -> np.ndarray:
    """image [H, W, 3] uint8, ids [H, W] segment ids (0 void), its COCO ``segments_info`` and
    the COCO ``categories`` (id, name, isthing, color) -> [H, W, 3] uint8.

    Segment pixels become (1 - alpha) * image + alpha * colour (void keeps the image), pixels
    on the boundary of a thing segment are white, and with ``labels`` each segment of at least
    ``min_label_area`` pixels gets its class name at its centre, white on a dark box."""
    image = np.asarray(image)
    ids = np.asarray(ids)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != ids.shape:
        raise ValueError(f"image {image.shape} and ids {ids.shape} must be [H, W, 3] and [H, W]")
    known = {int(s["id"]) for s in segments_info}
    present = set(np.unique(ids).tolist()) - {0}
    if present - known:
        raise ValueError(f"ids {sorted(present - known)[:10]} are not in segments_info")
    colors = segment_colors(segments_info, categories)
    lut_ids = np.array(sorted(colors), dtype=np.int64)
    lut = np.array([colors[i] for i in lut_ids], dtype=np.float32).reshape(-1, 3)
    pos = np.searchsorted(lut_ids, ids)
    seg = ids != 0
    out = image.astype(np.float32)
    out[seg] = (1 - alpha) * out[seg] + alpha * lut[pos[seg]]
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)

    by_id = {int(c["id"]): c for c in categories}
    things = [int(s["id"]) for s in segments_info if by_id.get(int(s["category_id"]), {}).get("isthing")]
    out[instance_boundaries(ids, things)] = OUTLINE
    if labels:
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        for s in segments_info:
            mask = ids == int(s["id"])
            if mask.sum() < min_label_area:
                continue
            name = str(by_id.get(int(s["category_id"]), {}).get("name", s["category_id"]))
            x, y = label_position(mask)
            box = draw.textbbox((x, y), name, font=font, anchor="mm")
            # moved inside the picture where the segment touches its border
            x += max(0, 1 - box[0]) - max(0, box[2] + 1 - (out.shape[1] - 1))
            y += max(0, 1 - box[1]) - max(0, box[3] + 1 - (out.shape[0] - 1))
            box = draw.textbbox((x, y), name, font=font, anchor="mm")
            draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
            draw.text((x, y), name, fill=(255, 255, 255), font=font, anchor="mm")
        out = np.asarray(picture)
    return out


def embedding_pca(emb, size: tuple[int, int] | None = None) -> np.ndarray:
    """emb [D, h, w] (numpy or torch) -> [h, w, 3] uint8: the projections on the first three
    principal components (over the pixels) as R, G, B, each stretched from its 1st to its
    99th percentile to [0, 255]. Each component's sign makes its largest loading positive, so
    the colours are deterministic. ``size`` (H, W): resize the picture (bilinear)."""
    if hasattr(emb, "detach"):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 3:
        raise ValueError(f"expected a [D, h, w] map, got shape {emb.shape}")
    d, h, w = emb.shape
    x = emb.reshape(d, -1).T
    x = x - x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x / max(len(x), 1))
    vecs = vecs[:, ::-1][:, :3]                       # [D, <=3], largest variance first
    vecs = vecs * np.where(vecs[np.abs(vecs).argmax(axis=0), range(vecs.shape[1])] < 0, -1, 1)
    proj = np.zeros((len(x), 3))
    proj[:, : vecs.shape[1]] = x @ vecs
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    rgb = (proj - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).reshape(h, w, 3)
    if size is not None and tuple(size) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
    return rgb


PANEL_GAP = 4
CAPTION_HEIGHT = 14


def panel(image: np.ndarray, ids: np.ndarray, segments_info: Sequence[dict], categories: Sequence[dict],
          gt: tuple[np.ndarray, Sequence[dict]] | None = None, embedding=None) -> np.ndarray:
    """image [H, W, 3] uint8, the predicted ``ids`` [H, W] and ``segments_info``; optionally
    ``gt`` = (ground-truth ids [H, W], its segments_info) and ``embedding`` [D, h, w] ->
    [CAPTION_HEIGHT + H, n W + (n - 1) PANEL_GAP, 3] uint8: "image | prediction | ground truth |
    embedding PCA" (the parts given), each under its caption, on black."""
    h, w = image.shape[:2]
    parts = [("image", np.asarray(image)), ("prediction", overlay(image, ids, segments_info, categories))]
    if gt is not None:
        parts.append(("ground truth", overlay(image, gt[0], gt[1], categories)))
    if embedding is not None:
        parts.append(("embedding PCA", embedding_pca(embedding, size=(h, w))))
    out = np.zeros((CAPTION_HEIGHT + h, len(parts) * (w + PANEL_GAP) - PANEL_GAP, 3), np.uint8)
    picture = Image.fromarray(out)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for k, (caption, part) in enumerate(parts):
        x = k * (w + PANEL_GAP)
        picture.paste(Image.fromarray(part), (x, CAPTION_HEIGHT))
        draw.text((x + 2, 1), caption, fill=(255, 255, 255), font=font)
    return np.asarray(picture)
