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
from collections.abc import Sequence

import numpy as np
import torch

from ciae.config import InferenceConfig
from ciae.data.panoptic import measure_resized
from ciae.data.transform import nearest_cover, resize_nearest, sizes_on
from ciae.modeling.box_ops import box_iou
from ciae.modeling.embedding import full_resolution, normalize, sample_at
from kernels import dispatch


def stuff_area_threshold(cfg: InferenceConfig, height, width):
    """The stuff area of an image (ints; or per image, float64 tensors)."""
    return cfg.stuff_area * height * width / cfg.stuff_area_ref


def _full(emb: torch.Tensor, stride: int) -> torch.Tensor:
    """[D, h, w] map at ``stride`` (1 or 4) -> the normalised full-resolution map [D, H, W]."""
    return normalize(full_resolution(emb[None])[0] if stride == 4 else emb, dim=0)


def detection_queries(emb: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """emb [B, D, h, w] the stride-4 maps P' + P'', locations [B, K, 2] pixel (x, y)
    -> [B, K, D] unit queries: the pixel embeddings there."""
    return normalize(sample_at(emb, locations.long()), dim=2)


def oracle_queries(emb: torch.Tensor, seg: torch.Tensor, num_stuff: int, num_instances: int,
                   stride: int = 4) -> torch.Tensor:
    """Mean embedding inside each ground-truth instance mask (Table IV).

    seg [H, W] (instance j = num_stuff + j) at full resolution -> [num_instances, D]."""
    sums, _ = dispatch.segment_sums(_full(emb, stride)[None], seg[None], num_stuff + num_instances)
    return normalize(sums[0, num_stuff:], dim=1)


def select_instances(queries: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                     valid: torch.Tensor, cfg: InferenceConfig, backend: str = "auto") -> torch.Tensor:
    """The detections that become instance queries, on the queries' device without a host sync.

    queries [B, M, D] unit, boxes [B, M, 4], scores [B, M], valid [B, M]: each image's
    detections sorted by decreasing score (``fcos_detect``'s slots) -> keep [B, M] bool. Drops
    detections under ``instance_score_thresh``, then, greedily in that order
    (``kernels.dispatch.greedy_keep``), any whose query has cosine >= ``duplicate_similarity``
    with a kept query whose box overlaps its own: such pairs are one instance found from two
    locations, and two queries would split its pixels between them. The similarities are
    computed in float32 under any autocast."""
    q = queries.float()
    with torch.autocast(q.device.type, enabled=False):
        sim = q @ q.transpose(1, 2)
    duplicate = (sim >= cfg.duplicate_similarity) & (box_iou(boxes, boxes) > 0)         # [B, M, M]
    return dispatch.greedy_keep(duplicate, valid & (scores >= cfg.instance_score_thresh),
                                backend=backend)


# the columns of ``assemble``'s per-query table
SEGMENT_ID, THING_CLASS, AREA, BBOX, SIMILARITY, DETECTION = 0, 1, 2, slice(3, 7), 7, 8


def assemble(emb: torch.Tensor, image_sizes: Sequence[tuple[int, int]], stuff_memory: torch.Tensor,
             queries: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor,
             scores: torch.Tensor, valid: torch.Tensor, cfg: InferenceConfig, stride: int = 4,
             backend: str = "auto", out_sizes: Sequence[tuple[int, int]] | None = None
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Assign pixels and measure the segments of a batch, all on emb's device without a host
    sync.

    emb [B, D, h, w] pre-normalisation embeddings of the padded inputs: the stride-4 maps
    P' + P'' (``stride`` 4; upsampling and normalisation are fused into the assignment) or
    full-resolution maps (``stride`` 1); image_sizes: the unpadded (H, W) of each input;
    stuff_memory [C_st, D]; the instances in M slots per image: queries [B, M, D], boxes
    [B, M, 4] xyxy, classes [B, M] (contiguous thing classes), scores [B, M] (detector scores)
    and valid [B, M] (the slots that hold one; the others never win a pixel); ``out_sizes``
    the size of each output map (default ``image_sizes``; nearest resampling,
    ``ciae.data.transform.resize_nearest``).

    Queries are each image's stuff memory then its M slots, Q = C_st + M. Segments are the
    valid queries that win enough pixels at the input size (stuff: the scaled stuff area;
    instances: ``min_instance_area``), numbered 1.. in query order. Returns (per image ids
    [H', W'] int32 at its out size, 0 = void; table [B, Q, 9] float64, per query: its segment id
    (0: none), thing class (-1 for stuff), area and COCO bbox measured at the out size, mean
    cosine similarity of its pixels to it at the input size, detector score) for
    ``segments_info`` to read on the host."""
    b, _, low_h, low_w = emb.shape
    height, width = low_h * stride, low_w * stride          # the padded maps' size
    dev = emb.device
    c_st, m = stuff_memory.shape[0], queries.shape[1]
    q = c_st + m
    stuff = normalize(stuff_memory.float(), dim=1).expand(b, c_st, -1)
    all_queries = torch.cat([stuff, queries.float()], dim=1)                           # [B, Q, D]
    whole = torch.cat([boxes.new_zeros(b, c_st, 2), boxes.new_full((b, c_st, 2), max(height, width))], 2)
    all_boxes = torch.cat([whole.float(), boxes.float()], dim=1)                        # [B, Q, 4]
    all_valid = torch.cat([valid.new_ones(b, c_st), valid], dim=1)                       # [B, Q]
    if stride == 4:
        labels, best, _ = dispatch.assign_upsampled(emb, (height, width), all_queries, all_boxes,
                                                    valid=all_valid, backend=backend)
    else:
        labels, best, _ = dispatch.assign(emb, all_queries, all_boxes, valid=all_valid,
                                          backend=backend)
    out_sizes = out_sizes or image_sizes
    sizes = sizes_on([(*s, *o) for s, o in zip(image_sizes, out_sizes)], dev)          # [B, 4]
    inside = ((torch.arange(height, device=dev) < sizes[:, :1])[:, :, None]
              & (torch.arange(width, device=dev) < sizes[:, 1:2])[:, None, :])          # [B, H, W]
    # query k of image i -> bin i Q + k; the padding -> the last bin
    bins = torch.where(inside, labels + q * torch.arange(b, device=dev)[:, None, None], b * q).view(-1)
    areas = torch.zeros(b * q + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, bins, torch.ones_like(bins))[:-1].view(b, q)
    similarity = torch.zeros(b * q + 1, dtype=torch.float64, device=dev).scatter_add_(
        0, bins, best.view(-1).double())[:-1].view(b, q)
    stuff_area = stuff_area_threshold(cfg, sizes[:, 0].double(), sizes[:, 1]).float()  # [B]
    is_stuff = torch.arange(q, device=dev) < c_st
    min_area = torch.where(is_stuff, stuff_area[:, None], float(max(cfg.min_instance_area, 1)))
    keep = all_valid & (areas > 0) & (areas >= min_area)
    segment = torch.cumsum(keep, 1) * keep                                      # [B, Q], 0 = dropped
    index = segment.to(torch.int32).gather(1, labels.view(b, -1)).view(b, height, width)
    ids = [resize_nearest(index[i, :h, :w], out)
           for i, ((h, w), out) in enumerate(zip(image_sizes, out_sizes))]
    rows = nearest_cover(sizes[:, 0], sizes[:, 2], height)
    cols = nearest_cover(sizes[:, 1], sizes[:, 3], width)
    measured, bbox = measure_resized(index, q, rows, cols)                      # by segment id
    at = (segment - 1).clamp_min(0)
    table = torch.zeros(b, q, 9, dtype=torch.float64, device=dev)
    table[..., SEGMENT_ID] = segment
    table[..., THING_CLASS] = torch.cat([classes.new_full((b, c_st), -1), classes], 1).double()
    table[..., AREA] = torch.where(keep, measured.gather(1, at), 0)
    table[..., BBOX] = torch.where(keep[..., None], bbox.gather(1, at[..., None].expand(b, q, 4)), 0).double()
    table[..., SIMILARITY] = similarity / areas.clamp_min(1)
    table[..., DETECTION] = torch.cat([scores.new_full((b, c_st), math.nan), scores], 1).double()
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


class HostCopy:
    """Tensors of one device copied to the host in one transfer, queued at once and waited for
    by ``wait``: their bytes packed into one buffer on the device; on a GPU copied into pinned
    memory with a non-blocking copy and an event, on the CPU read at the wait (``.cpu()``,
    which ``ciae.utils.opcount`` counts as the wait it stands for)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.parts = [(t.dtype, tuple(t.shape), t.numel() * t.element_size()) for t in tensors]
        self.buffer = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
        self.event = None
        if self.buffer.is_cuda:
            host = torch.empty(self.buffer.shape, dtype=torch.uint8, pin_memory=True)
            self.buffer = host.copy_(self.buffer, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[np.ndarray]:
        """The tensors as numpy arrays, views of the one host buffer."""
        if self.event is not None:
            self.event.synchronize()
        data = self.buffer.cpu().numpy()
        out, start = [], 0
        for dtype, shape, nbytes in self.parts:
            out.append(data[start:start + nbytes].view(str(dtype).removeprefix("torch.")).reshape(shape))
            start += nbytes
        return out


def classes_from_embedding(queries: torch.Tensor, thing_memory: torch.Tensor) -> torch.Tensor:
    """Table II, 'inference from embedding': each instance query's nearest thing memory entry
    (cosines in float32 under any autocast)."""
    with torch.autocast(queries.device.type, enabled=False):
        return (queries.float() @ normalize(thing_memory.float(), dim=1).t()).argmax(dim=1)
