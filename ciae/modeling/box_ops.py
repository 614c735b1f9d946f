"""Box operations for the proposal head, in plain torch (torchvision's ops are not used; NMS is
``kernels.dispatch.nms``'s).

Boxes are ``[N, 4]`` xyxy with exclusive ends (``x2 = x1 + w``); ``ltrb`` boxes are the
distances (left, top, right, bottom) from a location to the four sides, as FCOS regresses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import dispatch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., N, 4] xyxy -> [..., N] areas (0 for degenerate boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of [..., N, 4] and [..., M, 4] xyxy boxes (leading dims broadcast: a batch)
    -> [..., N, M]; 0 where the union is empty."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    iw = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    return inter / union.clamp_min(torch.finfo(inter.dtype).tiny)


def _ltrb_areas(pred: torch.Tensor, target: torch.Tensor):
    """Matched [N, 4] ltrb pairs about the same location -> intersection, union, enclosing area."""
    inter = ((torch.min(pred[:, 0], target[:, 0]) + torch.min(pred[:, 2], target[:, 2]))
             * (torch.min(pred[:, 1], target[:, 1]) + torch.min(pred[:, 3], target[:, 3])))
    area_p = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    area_t = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    enclose = ((torch.max(pred[:, 0], target[:, 0]) + torch.max(pred[:, 2], target[:, 2]))
               * (torch.max(pred[:, 1], target[:, 1]) + torch.max(pred[:, 3], target[:, 3])))
    return inter, area_p + area_t - inter, enclose


def iou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """UnitBox IoU loss ``-log(IoU)`` of matched [N, 4] ltrb pairs -> [N].

    IoU is smoothed as in FCOS, ``(inter + eps) / (union + eps)`` (``eps`` in squared pixels), so
    the loss stays finite and has a gradient for a collapsed prediction."""
    inter, union, _ = _ltrb_areas(pred, target)
    return -torch.log((inter + eps) / (union + eps))


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Generalised IoU loss ``1 - GIoU`` of matched [N, 4] ltrb pairs -> [N] (``eps`` as in
    :func:`iou_loss`)."""
    inter, union, enclose = _ltrb_areas(pred, target)
    iou = (inter + eps) / (union + eps)
    giou = iou - (enclose - union) / (enclose + eps).clamp_min(torch.finfo(enclose.dtype).tiny)
    return 1 - giou


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """Focal loss (Lin et al., 2017) of logits against {0, 1} targets of the same shape.

    ``alpha`` < 0 turns the class balancing off; ``reduction``: "none", "mean" or "sum"."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_thresh: float, backend: str = "auto") -> torch.Tensor:
    """Class-wise greedy NMS of one image: [N, 4] xyxy boxes, [N] scores, [N] classes -> [K]
    int64 indices of the kept boxes, by decreasing score (ties keep the input order).

    A box is dropped when a kept box of its class with a higher score has IoU > ``iou_thresh``
    (float64) with it: ``kernels.dispatch.nms`` on the boxes sorted by score (detection runs it
    on a padded batch, ``ciae.modeling.fcos.fcos_detect``)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = dispatch.nms(boxes[order][None], classes[order][None],
                        torch.ones_like(order, dtype=torch.bool)[None], iou_thresh, backend=backend)
    return order[keep[0]]


def expand_boxes(boxes: torch.Tensor, factor: float,
                 image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Scale [N, 4] xyxy boxes by ``factor`` about their centres; with ``image_size`` (h, w),
    clip to the image ``[0, w] x [0, h]``."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    out = torch.cat([centre - half, centre + half], dim=1)
    return out if image_size is None else clip_boxes(out, image_size)


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clip [N, 4] xyxy boxes to the image ``[0, w] x [0, h]`` of ``image_size`` (h, w)."""
    h, w = image_size
    x = boxes[:, 0::2].clamp(0, w)
    y = boxes[:, 1::2].clamp(0, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
