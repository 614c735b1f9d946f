"""Panoptic segmentation from the embedding map and the detections (paper Sec. IV-C, Eq. 16).

Queries are the stuff memory (one per stuff class) and one embedding per instance: the pixel
embedding at the location that produced the detection (or, in oracle mode, Table IV, the mean
embedding inside the ground-truth mask). Each pixel takes the query of highest cosine
similarity, an instance's similarity being 0 outside its box. Stuff segments smaller than the
(size-scaled) stuff area become void, as do instance segments under ``min_instance_area``;
instance segments take the detector's class, or the nearest thing memory entry (Table II).
"""

from __future__ import annotations

import numpy as np
import torch

from ciae.box_ops import box_iou
from ciae.config import InferenceConfig
from ciae.embedding import full_resolution, normalize, sample_at
from kernels import dispatch
from pipeline.coco import measure_segments


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
             stuff_ids: list[int], thing_ids: list[int], cfg: InferenceConfig,
             stride: int = 4, backend: str = "auto") -> tuple[np.ndarray, list[dict]]:
    """Assign pixels and build the COCO panoptic output of one image.

    emb [D, h, w] pre-normalisation embeddings of the padded input: the stride-4 map P' + P''
    (``stride`` 4; upsampling and normalisation are fused into the assignment) or a
    full-resolution map (``stride`` 1); image_size (H, W) the unpadded input size;
    stuff_memory [C_st, D]; queries [N, D], boxes [N, 4] xyxy and classes [N] (contiguous thing
    classes) of the instances.

    Returns (ids [H, W] int32 segment ids, 0 = void; segments_info with id, category_id,
    iscrowd, area, bbox — COCO category ids)."""
    h, w = image_size
    out_h, out_w = emb.shape[1] * stride, emb.shape[2] * stride
    c_st = stuff_memory.shape[0]
    all_queries = torch.cat([normalize(stuff_memory, dim=1), queries], dim=0).to(emb.dtype)
    full = boxes.new_tensor([[0.0, 0.0, float(out_w), float(out_h)]]).expand(c_st, 4)
    all_boxes = torch.cat([full, boxes.to(full.dtype)], dim=0)
    if stride == 4:
        labels, _ = dispatch.assign_upsampled(emb, (out_h, out_w), all_queries, all_boxes, backend=backend)
    else:
        labels, _ = dispatch.assign(emb, all_queries, all_boxes, backend=backend)
    labels = labels[:h, :w].cpu().numpy()

    q = all_queries.shape[0]
    areas = np.bincount(labels.ravel(), minlength=q)
    min_stuff = stuff_area_threshold(cfg, h, w)
    lut = np.zeros(q, np.int32)
    segments = []
    classes = classes.cpu().numpy()
    for k in range(q):
        area = int(areas[k])
        if area == 0 or (k < c_st and area < min_stuff) or (k >= c_st and area < max(cfg.min_instance_area, 1)):
            continue
        lut[k] = len(segments) + 1
        category = stuff_ids[k] if k < c_st else thing_ids[int(classes[k - c_st])]
        segments.append({"id": len(segments) + 1, "category_id": int(category), "iscrowd": 0, "area": area})
    ids = lut[labels]
    _, boxes_xywh = measure_segments(ids, len(segments))
    for s, box in zip(segments, boxes_xywh.tolist()):
        s["bbox"] = box
    return ids, segments


def classes_from_embedding(queries: torch.Tensor, thing_memory: torch.Tensor) -> torch.Tensor:
    """Table II, 'inference from embedding': each instance query's nearest thing memory entry."""
    return (queries @ normalize(thing_memory, dim=1).t()).argmax(dim=1)
