"""Panoptic segmentation from the embedding map and the detections (paper Sec. IV-C, Eq. 16).

Queries are the stuff memory (one per stuff class) and one embedding per instance: the pixel
embedding at the location that produced the detection (or, in oracle mode, Table IV, the mean
embedding inside the ground-truth mask). Each pixel takes the query of highest cosine
similarity, an instance's similarity being 0 outside its box. Stuff segments smaller than the
(size-scaled) stuff area become void, as do instance segments under ``min_instance_area``;
instance segments take the detector's class, or the nearest thing memory entry (Table II).

Beyond the paper, each segment gets a confidence ``score`` (``segment_score``: how clearly its
pixels chose it over the second-best query, and the detector's score for an instance) and an
image a ``quality`` (``image_quality``), so that labelers can review the doubtful images first.
"""

from __future__ import annotations

import math

import torch

from ciae.box_ops import box_iou
from ciae.config import InferenceConfig
from ciae.embedding import full_resolution, normalize, sample_at
from ciae.panoptic import measure_segments
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
    instance found from two locations, and two queries would split its pixels between them."""
    order = torch.argsort(scores, descending=True)
    order = order[scores[order] >= cfg.instance_score_thresh]
    if len(order) < 2:
        return order
    sim = queries[order] @ queries[order].t()
    overlap = box_iou(boxes[order], boxes[order]) > 0
    dup = (sim >= cfg.duplicate_similarity) & overlap
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(1, len(order)):
        keep[i] = not bool((dup[i, :i] & keep[:i]).any())
    return order[keep]


def assemble(emb: torch.Tensor, image_size: tuple[int, int], stuff_memory: torch.Tensor,
             queries: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor,
             scores: torch.Tensor, stuff_ids: list[int], thing_ids: list[int], cfg: InferenceConfig,
             stride: int = 4, backend: str = "auto") -> tuple[torch.Tensor, list[dict]]:
    """Assign pixels and build the COCO panoptic output of one image, on emb's device.

    emb [D, h, w] pre-normalisation embeddings of the padded input: the stride-4 map P' + P''
    (``stride`` 4; upsampling and normalisation are fused into the assignment) or a
    full-resolution map (``stride`` 1); image_size (H, W) the unpadded input size;
    stuff_memory [C_st, D]; queries [N, D], boxes [N, 4] xyxy, classes [N] (contiguous thing
    classes) and scores [N] (detector scores) of the instances.

    Returns (ids [H, W] int32 tensor of segment ids on emb's device, 0 = void; segments_info
    with id, category_id, iscrowd, area, bbox (COCO category ids) and ``score``, the
    confidence of ``segment_scores``). Only a few numbers per query cross to the host."""
    h, w = image_size
    out_h, out_w = emb.shape[1] * stride, emb.shape[2] * stride
    c_st = stuff_memory.shape[0]
    all_queries = torch.cat([normalize(stuff_memory, dim=1), queries], dim=0).to(emb.dtype)
    full = boxes.new_tensor([[0.0, 0.0, float(out_w), float(out_h)]]).expand(c_st, 4)
    all_boxes = torch.cat([full, boxes.to(full.dtype)], dim=0)
    if stride == 4:
        labels, best, second = dispatch.assign_upsampled(emb, (out_h, out_w), all_queries, all_boxes,
                                                         backend=backend)
    else:
        labels, best, second = dispatch.assign(emb, all_queries, all_boxes, backend=backend)
    labels = labels[:h, :w]
    q = all_queries.shape[0]
    flat = labels.reshape(-1)
    areas = torch.bincount(flat, minlength=q)
    margins = torch.zeros(q, dtype=torch.float64, device=flat.device).index_add_(
        0, flat, (best - second)[:h, :w].reshape(-1).double())
    areas, margins = areas.tolist(), margins.tolist()
    min_stuff = stuff_area_threshold(cfg, h, w)
    lut = torch.zeros(q, dtype=torch.int32)
    segments = []
    classes, scores = classes.tolist(), scores.tolist()
    for k in range(q):
        area = areas[k]
        if area == 0 or (k < c_st and area < min_stuff) or (k >= c_st and area < max(cfg.min_instance_area, 1)):
            continue
        lut[k] = len(segments) + 1
        category = stuff_ids[k] if k < c_st else thing_ids[int(classes[k - c_st])]
        score = segment_score(margins[k] / area, None if k < c_st else scores[k - c_st])
        segments.append({"id": len(segments) + 1, "category_id": int(category), "iscrowd": 0,
                         "area": area, "score": score})
    ids = lut.to(labels.device)[labels]
    _, boxes_xywh = measure_segments(ids, len(segments))
    for seg, box in zip(segments, boxes_xywh.tolist()):
        seg["bbox"] = box
    return ids, segments


def segment_score(mean_margin: float, detection_score: float | None) -> float:
    """The confidence of a segment, in [0, 1]: its pixels' mean margin between the best and the
    second-best query (how clearly they chose it; at least 0, clipped at 1), and for an instance
    the geometric mean of that and the detector's score."""
    margin = min(max(mean_margin, 0.0), 1.0)
    return round(margin if detection_score is None else math.sqrt(margin * detection_score), 4)


def image_quality(segments: list[dict], height: int, width: int) -> float:
    """The confidence of an image's labels, in [0, 1]: its segments' scores weighted by their
    areas over the whole image (void counts as 0)."""
    return round(sum(s["score"] * s["area"] for s in segments) / max(height * width, 1), 4)


def classes_from_embedding(queries: torch.Tensor, thing_memory: torch.Tensor) -> torch.Tensor:
    """Table II, 'inference from embedding': each instance query's nearest thing memory entry."""
    return (queries @ normalize(thing_memory, dim=1).t()).argmax(dim=1)
