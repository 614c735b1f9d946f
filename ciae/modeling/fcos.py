"""The proposal head (Section IV-A): FCOS on P3-P7 with positives only inside instance masks.

Layout shared by the targets, the losses and the detector: the locations of all levels are
concatenated in level order (P3 first), each level row-major (``y`` slow, ``x`` fast), so a
level's slice of ``L = sum(H_l * W_l)`` is ``head_out[key][l].flatten(2)`` in the same order.
Location ``(i, j)`` of a level with stride ``s`` sits at pixel ``(x, y) = (s // 2 + j * s,
s // 2 + i * s)``. Regression is in pixels throughout: ``box_reg`` and the ``reg`` targets are
the distances (left, top, right, bottom) from the location to the box sides.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ciae.config import FCOSConfig
from ciae.data.transform import sizes_on
from ciae.modeling.backbone import GroupNorm2d
from ciae.modeling.box_ops import giou_loss, iou_loss, sigmoid_focal_loss
from kernels import dispatch


class FCOSHead(nn.Module):
    """Shared over levels: a classification tower and a box tower of ``cfg.num_convs`` 3x3
    convs (+ GroupNorm + ReLU). Class logits come from the classification tower; centerness,
    box regression and the D-channel box embedding from the box tower.

    ``forward(feats)``, with ``feats`` the P3..P7 maps [B, in_channels, H_l, W_l] (one per
    ``cfg.strides``), returns a dict of per-level lists:

    * ``cls_logits`` [B, C_th, H_l, W_l]
    * ``centerness`` [B, 1, H_l, W_l] (logits)
    * ``box_reg``    [B, 4, H_l, W_l] ltrb in pixels: ``relu(scale_l * x) * stride_l``
    * ``box_embed``  [B, D, H_l, W_l] (not supervised here; fused by the embedding branch),
      only with an ``embed_dim`` (None: the branch fuses none, Table III, and the head has no
      parameter that the loss would not reach, as DDP requires)
    """

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int | None, cfg: FCOSConfig,
                 norm: str = "gn"):
        super().__init__()
        if norm not in ("gn", "none"):
            raise ValueError(f"norm must be 'gn' or 'none', got {norm!r}")
        self.strides = tuple(cfg.strides)
        self.cls_tower = _tower(in_channels, cfg.num_convs, norm)
        self.box_tower = _tower(in_channels, cfg.num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.box_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.box_embed = nn.Conv2d(in_channels, embed_dim, 3, padding=1) if embed_dim else None
        self.scales = nn.Parameter(torch.ones(len(self.strides)))  # one learnable scale per level

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feats)}")
        out: dict[str, list[torch.Tensor]] = {"cls_logits": [], "centerness": [], "box_reg": []}
        if self.box_embed is not None:
            out["box_embed"] = []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            c, b = self.cls_tower(x), self.box_tower(x)
            out["cls_logits"].append(self.cls_logits(c))
            out["centerness"].append(self.centerness(b))
            out["box_reg"].append(F.relu(self.scales[level] * self.box_reg(b)) * stride)
            if self.box_embed is not None:
                out["box_embed"].append(self.box_embed(b))
        return out


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    """num_convs x (3x3 conv, GroupNorm + ReLU in one module); without a norm, 3x3 conv and
    ReLU. The identity after each GroupNorm2d keeps the layers' indices (state-dict keys) as
    they were with a separate ReLU."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"))
        layers += [GroupNorm2d(channels, relu=True), nn.Identity()] if norm == "gn" else [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def compute_locations(sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                      device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per level (H_l, W_l) and stride -> [H_l * W_l, 2] float32 (x, y) pixel of each location,
    row-major: ``(stride // 2 + j * stride, stride // 2 + i * stride)``."""
    locations = []
    for (h, w), s in zip(sizes, strides):
        ys = torch.arange(h, dtype=torch.float32, device=device) * s + s // 2
        xs = torch.arange(w, dtype=torch.float32, device=device) * s + s // 2
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        locations.append(torch.stack([x.reshape(-1), y.reshape(-1)], dim=1))
    return locations


def fcos_targets(locations: Sequence[torch.Tensor], strides: Sequence[int],
                 size_ranges: Sequence[tuple[float, float]], seg: torch.Tensor,
                 boxes: Sequence[torch.Tensor], classes: Sequence[torch.Tensor], num_stuff: int,
                 center_sample_radius: float) -> dict[str, torch.Tensor]:
    """Per-location targets of a batch, over the concatenated locations (module docstring).

    A location is positive for thing instance ``j`` of image ``b`` iff

    * its pixel (clamped into the padded ``seg``) is on the instance: ``seg == num_stuff + j``
      (stuff, void and crowd pixels, -1, are never positive; masks are exclusive, so a location
      has at most one candidate instance);
    * it lies strictly within ``center_sample_radius * stride`` of the box centre in x and in y
      (``<= 0`` turns centre sampling off; the region is implicitly clipped to the box, since
      mask pixels lie in the box);
    * ``lo <= max(l, t, r, b) <= hi`` for its level's size range (FCOS's bounds).

    Args: ``locations`` per level [H_l * W_l, 2] (:func:`compute_locations`); ``seg`` [B, H, W]
    int64; per image ``boxes`` [N_b, 4] xyxy (exclusive ends) and ``classes`` [N_b] int64.

    Returns a dict, with ``L = sum(H_l * W_l)``:

    * ``labels``     [B, L] int64: thing class 0..C_th-1, or -1 for background
    * ``reg``        [B, L, 4] float32: ltrb distances in pixels (0 at background)
    * ``centerness`` [B, L] float32: ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` (0 at background)
    * ``instance``   [B, L] int64: the instance index ``j`` of a positive, -1 at background
    """
    device = seg.device
    locs = torch.cat(list(locations)).to(device)
    stride, lo, hi = _level_constants(tuple(len(loc) for loc in locations),
                                      tuple(float(s) for s in strides),
                                      tuple((float(a), float(b)) for a, b in size_ranges), device)
    x, y = locs.unbind(1)
    height, width = seg.shape[-2:]
    px = x.long().clamp(0, width - 1)
    py = y.long().clamp(0, height - 1)

    out = {"labels": [], "reg": [], "centerness": [], "instance": []}
    for b in range(seg.shape[0]):
        bx = boxes[b].to(device=device, dtype=torch.float32).reshape(-1, 4)
        cl = classes[b].to(device=device, dtype=torch.int64)
        inst = seg[b, py, px] - num_stuff
        pos = (inst >= 0) & (inst < len(bx))
        j = inst.clamp(0, max(len(bx) - 1, 0))
        if len(bx) == 0:  # gather from a dummy box; every location is background anyway
            bx, cl = bx.new_zeros(1, 4), cl.new_zeros(1)
        box = bx[j]
        ltrb = torch.stack([x - box[:, 0], y - box[:, 1], box[:, 2] - x, box[:, 3] - y], dim=1)
        if center_sample_radius > 0:
            centre = (box[:, :2] + box[:, 2:]) / 2
            reach = center_sample_radius * stride
            pos &= ((x - centre[:, 0]).abs() < reach) & ((y - centre[:, 1]).abs() < reach)
        extent = ltrb.max(dim=1).values
        pos &= (extent >= lo) & (extent <= hi)

        out["labels"].append(torch.where(pos, cl[j], -1))
        out["reg"].append(torch.where(pos[:, None], ltrb, 0.0))
        out["centerness"].append(torch.where(pos, _centerness(ltrb), 0.0))
        out["instance"].append(torch.where(pos, j, -1))
    return {k: torch.stack(v) for k, v in out.items()}


@functools.lru_cache(maxsize=32)
def _level_constants(counts: tuple[int, ...], strides: tuple[float, ...],
                     size_ranges: tuple[tuple[float, float], ...], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per location of the concatenated levels ([L] float32 each): its level's stride and the
    lo, hi bounds of its size range. Made on ``device`` by fills (no copy from the host, no
    data-dependent size) once per level layout, then reused: a step reads them, never writes."""
    with torch.inference_mode(False):
        def per_location(values):
            return torch.cat([torch.full((n,), v, dtype=torch.float32, device=device)
                              for n, v in zip(counts, values)])
        return (per_location(strides), per_location([r[0] for r in size_ranges]),
                per_location([r[1] for r in size_ranges]))


def _centerness(ltrb: torch.Tensor) -> torch.Tensor:
    """[N, 4] ltrb -> [N] FCOS centerness (finite for any input; meaningful where ltrb >= 0)."""
    lr, tb = ltrb[:, 0::2].clamp_min(0), ltrb[:, 1::2].clamp_min(0)
    tiny = torch.finfo(ltrb.dtype).tiny
    ratio = (lr.min(1).values / lr.max(1).values.clamp_min(tiny)
             * tb.min(1).values / tb.max(1).values.clamp_min(tiny))
    return ratio.sqrt()


def flatten_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level [B, C, H_l, W_l] -> [B, L, C] in the location layout of the module docstring."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def fcos_normalisers(targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The local normalisers of :func:`fcos_losses`: [2] float32, the number of positive
    locations and the sum of their centerness targets."""
    pos = targets["labels"] >= 0
    ctr = torch.where(pos, targets["centerness"].float(), 0.0)     # no boolean mask: no host sync
    return torch.stack([pos.sum().float(), ctr.sum()])


def fcos_losses(head_out: dict[str, list[torch.Tensor]], locations: Sequence[torch.Tensor],
                targets: dict[str, torch.Tensor], cfg: FCOSConfig,
                normalisers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Losses of :class:`FCOSHead` outputs against :func:`fcos_targets`.

    * ``loss_cls``: sigmoid focal loss over all locations and classes, summed, / num_pos
    * ``loss_box``: ``cfg.box_loss`` ("iou": ``-log IoU``, "giou": ``1 - GIoU``) on positives,
      weighted by their centerness targets, / the sum of those targets
    * ``loss_ctr``: BCE-with-logits of centerness on positives, / num_pos

    ``normalisers``: (num_pos, the centerness sum), their means over data-parallel workers
    (default: this batch's own, :func:`fcos_normalisers`); num_pos is clamped to >= 1. With no positive,
    ``loss_box`` and ``loss_ctr`` are zeros whose (zero) gradients still reach ``box_reg`` and
    ``centerness`` (the sums run over every location, the background's terms zeroed, so a
    step issues the same kernels and no host sync whatever the targets); ``loss_cls`` is then the focal
    loss of the negatives alone, as in FCOS. Computed in float32 whatever the head's dtype;
    ``locations`` is only checked against the layout."""
    cls = flatten_levels(head_out["cls_logits"]).float()         # [B, L, C]
    ctr = flatten_levels(head_out["centerness"])[..., 0].float()  # [B, L]
    reg = flatten_levels(head_out["box_reg"]).float()             # [B, L, 4]
    if cls.shape[1] != sum(len(loc) for loc in locations):
        raise ValueError("head outputs and locations disagree on the number of locations")
    labels = targets["labels"]
    pos = labels >= 0
    if normalisers is None:
        normalisers = fcos_normalisers(targets)
    num_pos = normalisers[0].clamp_min(1)

    # No boolean-mask selection (its size depends on the data: a host sync on a GPU): every
    # location is computed and the background's terms are zeroed. The one-hot of label -1 is
    # all zeros.
    onehot = (labels[..., None] == torch.arange(cls.shape[-1], device=labels.device)).to(cls.dtype)
    loss_cls = sigmoid_focal_loss(cls, onehot, cfg.focal_alpha, cfg.focal_gamma, "sum") / num_pos

    ctr_t = torch.where(pos, targets["centerness"].float(), 0.0)              # [B, L]
    box_fn = giou_loss if cfg.box_loss == "giou" else iou_loss
    # background boxes become unit ltrb (prediction and target alike): their loss is exactly 0
    # and its gradient finite, where an arbitrary pair could give a nan that no ``where`` after
    # the loss would keep out of the gradient (0 * nan)
    pos4 = pos[..., None]
    box = box_fn(torch.where(pos4, reg, 1.0).reshape(-1, 4),
                 torch.where(pos4, targets["reg"].float(), 1.0).reshape(-1, 4)).view_as(ctr_t)
    ctr_sum = normalisers[1].clamp_min(torch.finfo(ctr_t.dtype).eps)
    loss_box = (box * ctr_t).sum() / ctr_sum                                  # ctr_t: 0 at background
    ctr_bce = F.binary_cross_entropy_with_logits(ctr, ctr_t, reduction="none")
    loss_ctr = torch.where(pos, ctr_bce, 0.0).sum() / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}


@torch.no_grad()
def fcos_detect(head_out: dict[str, list[torch.Tensor]], locations: Sequence[torch.Tensor],
                image_sizes: Sequence[tuple[int, int]], cfg: FCOSConfig,
                backend: str = "auto") -> dict[str, torch.Tensor]:
    """Detections of a batch from :class:`FCOSHead` outputs, on the outputs' device without a
    host sync, padded to M = min(``cfg.max_detections``, N) slots per image.

    Score of (location, class): ``sqrt(sigmoid(cls) * sigmoid(centerness))``, the geometric mean
    (on a probability scale, unlike FCOS's product; the ranking is the same). Per level, the
    ``cfg.pre_nms_topk`` best (location, class) pairs: N candidates per image; boxes decoded from
    location and ltrb, clipped to the image (h, w); a candidate is valid if its score is above
    ``cfg.score_thresh`` and its box not empty. Each image's candidates sorted by decreasing
    score (a stable sort: ties in candidate order; invalid ones last), class-wise NMS at
    ``cfg.nms_thresh`` (``kernels.dispatch.nms`` on ``backend``), and the first M kept ones
    moved to the slots.

    Returns a dict of [B, M, ...] tensors, each image's detections first by decreasing score,
    then empty slots (zeros):

    * ``boxes`` [B, M, 4] float xyxy, ``scores`` [B, M], ``classes`` [B, M] int64 (thing class)
    * ``locations`` [B, M, 2] int64 (x, y): the pixel of the location that produced the
      detection (clamped into the image), where the CIAE inference reads the query embedding
    * ``levels`` [B, M] int64: 0 for P3 ... 4 for P7
    * ``valid`` [B, M] bool: the slots that hold a detection
    """
    per_level = []
    for level, loc in enumerate(locations):        # every image at once: [B, ...]
        cls = head_out["cls_logits"][level].float().flatten(2).transpose(1, 2).sigmoid()  # [B, HW, C]
        ctr = head_out["centerness"][level].float().flatten(2).transpose(1, 2).sigmoid()  # [B, HW, 1]
        scores = (cls * ctr).sqrt().flatten(1)
        top, cand = scores.topk(min(cfg.pre_nms_topk, scores.shape[1]), dim=1)          # [B, K]
        idx, cls_id = cand // cls.shape[2], cand % cls.shape[2]
        reg = head_out["box_reg"][level].float().flatten(2).transpose(1, 2)               # [B, HW, 4]
        ltrb = reg.gather(1, idx[..., None].expand(-1, -1, 4))
        xy = loc.to(ltrb.device)[idx]                                                     # [B, K, 2]
        per_level.append((torch.cat([xy - ltrb[..., :2], xy + ltrb[..., 2:]], dim=2), top, cls_id,
                          xy, torch.full_like(cls_id, level)))
    boxes, scores, cls_id, xy, levels = (torch.cat(t, dim=1) for t in zip(*per_level))  # [B, N, ...]
    hw = sizes_on(image_sizes, boxes.device)                                              # [B, 2]
    boxes = torch.minimum(boxes.clamp_min(0), hw.flip(1).repeat(1, 2)[:, None].to(boxes.dtype))
    # the top-k of a level above the threshold are its best k among those above it
    ok = (scores > cfg.score_thresh) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    order = torch.sort(torch.where(ok, scores, -math.inf), dim=1, descending=True, stable=True).indices
    keep = dispatch.nms(boxes.gather(1, order[..., None].expand(-1, -1, 4)), cls_id.gather(1, order),
                        ok.gather(1, order), cfg.nms_thresh, backend=backend)           # [B, N]
    # the r-th kept candidate goes to slot r < M (the others to a slot M that is dropped)
    b, n = keep.shape
    m = min(cfg.max_detections, n)
    rank = keep.cumsum(1) - 1
    slot = torch.where(keep & (rank < m), rank, m)
    pick = torch.zeros(b, m + 1, dtype=torch.int64, device=keep.device).scatter_(1, slot, order)[:, :m]
    valid = torch.arange(m, device=keep.device) < keep.sum(1, keepdim=True)             # [B, M]

    def slots(t: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] per candidate -> [B, M, ...] per slot, zeros in the empty ones."""
        got = t.gather(1, pick.view(b, m, *[1] * (t.dim() - 2)).expand(b, m, *t.shape[2:]))
        return torch.where(valid.view(b, m, *[1] * (t.dim() - 2)), got, 0)

    pixel = torch.minimum(slots(xy).long().clamp_min(0), hw.flip(1)[:, None] - 1)
    return {"boxes": slots(boxes), "scores": slots(scores), "classes": slots(cls_id),
            "locations": pixel, "levels": slots(levels), "valid": valid}
