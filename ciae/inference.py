"""Panoptic segmentation from the embedding map and the detections (paper Sec. IV-C, Eq. 16).

Queries are the stuff memory (one per stuff class) and one embedding per instance: the pixel
embedding at the location that produced the detection (or, in oracle mode, Table IV, the mean
embedding inside the ground-truth mask). Each pixel takes the query of highest cosine
similarity, an instance's similarity being 0 outside its box. Stuff segments smaller than the
(size-scaled) stuff area become void, as do instance segments under ``min_instance_area``;
instance segments take the detector's class, or the nearest thing memory entry (Table II).

Beyond the paper, each segment gets a confidence ``score`` (``segment_score``: how similar its
pixels are to its query, and the detector's score for an instance) and an image a ``quality``
(``image_quality``: per category, as PQ averages), so that labelers review the doubtful images
first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ciae.box_ops import box_iou
from ciae.config import InferenceConfig
from ciae.embedding import full_resolution, normalize, sample_at
from ciae.panoptic import measure_segments
from ciae.transform import resize_nearest
from kernels import dispatch


def stuff_area_threshold(cfg: InferenceConfig, height: int, width: int) -> float:
    return cfg.stuff_area * height * width / cfg.stuff_area_ref


def _full(emb: torch.Tensor, stride: int) -> torch.Tensor:
    """[D, h, w] map at ``stride`` (1 or 4) -> the normalised full-resolution map [D, H, W]."""
    return normalize(full_resolution(emb[None])[0] if stride == 4 else emb, dim=0)


def detection_queries(emb: torch.Tensor, locations: torch.Tensor, stride: int = 4) -> torch.Tensor:
    """emb [D, h, w] (stride 4: P' + P''; stride 1: full resolution), locations [K, 2] pixel
    (x, y) -> [K, D] unit queries: the pixel embeddings there."""
    xy = locations.long()
    v = sample_at(emb, xy) if stride == 4 else emb[:, xy[:, 1], xy[:, 0]].t()
    return normalize(v, dim=1)


def oracle_queries(emb: torch.Tensor, seg: torch.Tensor, num_stuff: int, num_instances: int,
                   stride: int = 4) -> torch.Tensor:
    """Mean embedding inside each ground-truth instance mask (Table IV).

    seg [H, W] (instance j = num_stuff + j) at full resolution -> [num_instances, D]."""
    sums, _ = dispatch.segment_sums(_full(emb, stride)[None], seg[None], num_stuff + num_instances)
    return normalize(sums[0, num_stuff:], dim=1)


def select_instances(queries: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                     cfg: InferenceConfig) -> torch.Tensor:
    """Indices of the detections that become instance queries, best first.

    queries [K, D] unit, boxes [K, 4], scores [K] (any order). Drops detections under
    ``instance_score_thresh``, then, greedily by score, any whose query has cosine >=
    ``duplicate_similarity`` with a kept query whose box overlaps its own: such pairs are one
    instance found from two locations, and two queries would split its pixels between them.
    The duplicate matrix is made on the queries' device (in float32 under any autocast) and
    reaches the host once, where the greedy pass runs."""
    order = torch.argsort(scores, descending=True)
    order = order[scores[order] >= cfg.instance_score_thresh]
    if len(order) < 2:
        return order
    q = queries[order].float()
    with torch.autocast(q.device.type, enabled=False):
        sim = q @ q.t()
    dup = ((sim >= cfg.duplicate_similarity) & (box_iou(boxes[order], boxes[order]) > 0)).cpu().numpy()
    keep = np.ones(len(order), dtype=bool)
    for i in range(1, len(order)):
        keep[i] = not (dup[i, :i] & keep[:i]).any()
    return order[torch.from_numpy(np.flatnonzero(keep)).to(order.device)]


# the columns of ``assemble``'s per-query table
SEGMENT_ID, THING_CLASS, AREA, BBOX, SIMILARITY, DETECTION = 0, 1, 2, slice(3, 7), 7, 8


def assemble(emb: torch.Tensor, image_size: tuple[int, int], stuff_memory: torch.Tensor,
             queries: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor,
             scores: torch.Tensor, cfg: InferenceConfig, stride: int = 4, backend: str = "auto",
             out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign pixels and measure the segments of one image, all on emb's device.

    emb [D, h, w] pre-normalisation embeddings of the padded input: the stride-4 map P' + P''
    (``stride`` 4; upsampling and normalisation are fused into the assignment) or a
    full-resolution map (``stride`` 1); image_size (H, W) the unpadded input size;
    stuff_memory [C_st, D]; queries [N, D], boxes [N, 4] xyxy, classes [N] (contiguous thing
    classes) and scores [N] (detector scores) of the instances; ``out_size`` the size of the
    output map (default ``image_size``; nearest resampling, ``ciae.transform.resize_nearest``).

    Segments are the queries that win enough pixels at the input size (stuff: the scaled stuff
    area; instances: ``min_instance_area``), numbered 1.. in query order. Returns (ids [H', W']
    int32 at ``out_size``, 0 = void; table [C_st + N, 9] float64, per query: its segment id (0:
    none), thing class (-1 for stuff), area and COCO bbox measured at ``out_size``, mean cosine
    similarity of its pixels to it at the input size, detector score) for ``segments_info`` to
    read on the host."""
    h, w = image_size
    out_h, out_w = emb.shape[1] * stride, emb.shape[2] * stride
    c_st = stuff_memory.shape[0]
    all_queries = torch.cat([normalize(stuff_memory.float(), dim=1), queries.float()], dim=0)
    full = boxes.new_tensor([[0.0, 0.0, float(out_w), float(out_h)]], dtype=torch.float32)
    all_boxes = torch.cat([full.expand(c_st, 4), boxes.float()], dim=0)
    if stride == 4:
        labels, best, _ = dispatch.assign_upsampled(emb, (out_h, out_w), all_queries, all_boxes,
                                                    backend=backend)
    else:
        labels, best, _ = dispatch.assign(emb, all_queries, all_boxes, backend=backend)
    labels = labels[:h, :w]
    q = all_queries.shape[0]
    flat = labels.reshape(-1)
    areas = torch.bincount(flat, minlength=q)
    similarity = torch.zeros(q, dtype=torch.float64, device=flat.device).index_add_(
        0, flat, best[:h, :w].reshape(-1).double())
    is_stuff = torch.arange(q, device=flat.device) < c_st
    min_area = torch.where(is_stuff, stuff_area_threshold(cfg, h, w), max(cfg.min_instance_area, 1))
    keep = (areas > 0) & (areas >= min_area)
    segment = torch.cumsum(keep, 0) * keep                                    # [Q], 0 = dropped
    ids = resize_nearest(segment.to(torch.int32)[labels], out_size or image_size)
    measured, bbox = measure_segments(ids, q)                                 # by segment id
    at = (segment - 1).clamp_min(0)
    table = torch.zeros(q, 9, dtype=torch.float64, device=flat.device)
    table[:, SEGMENT_ID] = segment
    table[:, THING_CLASS] = torch.cat([classes.new_full((c_st,), -1), classes]).double()
    table[:, AREA] = torch.where(keep, measured[at], 0)
    table[:, BBOX] = torch.where(keep[:, None], bbox[at], 0).double()
    table[:, SIMILARITY] = similarity / areas.clamp_min(1)
    table[:, DETECTION] = torch.cat([scores.new_full((c_st,), math.nan), scores]).double()
    return ids, table


def segments_info(table: np.ndarray, stuff_ids: list[int], thing_ids: list[int]) -> list[dict]:
    """``assemble``'s table (numpy) -> COCO panoptic segments_info (COCO category ids) with a
    confidence ``score`` each; a segment left without pixels at the output size is dropped."""
    c_st = len(stuff_ids)
    segments = []
    for k, row in enumerate(table):
        if row[SEGMENT_ID] == 0 or row[AREA] == 0:
            continue
        thing = k >= c_st
        category = thing_ids[int(row[THING_CLASS])] if thing else stuff_ids[k]
        segments.append({"id": int(row[SEGMENT_ID]), "category_id": int(category), "iscrowd": 0,
                         "area": int(row[AREA]), "bbox": [int(v) for v in row[BBOX]],
                         "score": segment_score(float(row[SIMILARITY]),
                                                float(row[DETECTION]) if thing else None)})
    return segments


def segment_score(mean_similarity: float, detection_score: float | None) -> float:
    """The confidence of a segment, in [0, 1]: the mean cosine similarity of its pixels to its
    query (how well they match it; clipped to [0, 1]), and for an instance the geometric mean of
    that and the detector's score. (The mean similarity ranks images by PQ better than the margin
    over the second-best query: ``benchmarks/label/confidence.py``.)"""
    similarity = min(max(mean_similarity, 0.0), 1.0)
    return round(similarity if detection_score is None else math.sqrt(similarity * detection_score), 4)


def image_quality(segments: list[dict]) -> float:
    """The confidence of an image's labels, in [0, 1]: per category, its segments' mean score,
    then the mean over the categories, as PQ averages over categories (a small doubtful
    instance counts as much as the sky); 0 for an image without segments."""
    by_category: dict[int, list[float]] = {}
    for s in segments:
        by_category.setdefault(int(s["category_id"]), []).append(float(s["score"]))
    if not by_category:
        return 0.0
    return round(sum(sum(v) / len(v) for v in by_category.values()) / len(by_category), 4)


def classes_from_embedding(queries: torch.Tensor, thing_memory: torch.Tensor) -> torch.Tensor:
    """Table II, 'inference from embedding': each instance query's nearest thing memory entry
    (cosines in float32 under any autocast)."""
    with torch.autocast(queries.device.type, enabled=False):
        return (queries.float() @ normalize(thing_memory.float(), dim=1).t()).argmax(dim=1)
