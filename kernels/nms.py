"""Greedy non-maximum suppression over a padded batch: the PyTorch twins (the exact references).

Each image holds N candidates sorted by decreasing score (ties in input order) and a ``valid``
mask (padding, below the score threshold). The greedy pass keeps box j iff it is valid and no
kept box before it suppresses it: keep[j] = valid[j] and not any(keep[i] and suppress[i, j]
for i < j) (entries i >= j of ``suppress`` are ignored).

``nms``: i suppresses j iff i < j, same class and IoU(i, j) > iou_thresh, the IoU computed in
float64 as ``ciae.modeling.box_ops.box_iou`` computes it (inter / union.clamp_min(tiny), widths
clamp_min(0)): the boxes the one-box-at-a-time greedy NMS keeps, ties included
(``tests/test_nms.py`` holds that algorithm as the reference). ``ciae.modeling.box_ops.batched_nms`` is
the one-image form (boxes in any order).

Both twins resolve the boxes in blocks: a block's boxes
are first tested against the boxes kept before it; greedy inside the block is the fixed point of
keep = alive and not any(keep[i] and over[i, j], i < j), iterated from keep = alive (unique;
each round settles at least one more box). ``nms`` first moves each image's valid boxes to the
front (in order) and tests a block only against the kept boxes, gathered per image, so that
padding and suppressed boxes cost nothing and no [B, N, N] float64 tensor exists. The twins
read values on the host (block sizes, the fixed point's test): the CPU path; the sync-free
device path is ``kernels.nms_triton``.
"""

from __future__ import annotations

import torch

BLOCK = 64         # boxes resolved together
ROWS = 256         # rows of ``nms_suppression`` computed together
TINY = torch.finfo(torch.float64).tiny


def _area(b: torch.Tensor) -> torch.Tensor:
    """[B, 4, N] xyxy coordinate planes -> [B, N] areas, 0 for degenerate boxes."""
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


def _suppresses(a: torch.Tensor, ca: torch.Tensor, b: torch.Tensor, cb: torch.Tensor,
                iou_thresh: float) -> torch.Tensor:
    """a [B, 4, P] float64 xyxy coordinate planes, ca [B, P] classes, b [B, 4, Q] float64,
    cb [B, Q] -> [B, P, Q] bool: same class and IoU > iou_thresh, the IoU computed as
    ``ciae.modeling.box_ops.box_iou`` (the same operations in the same order; in place, and on planes:
    broadcasting [B, P, 1] views of [B, P, 4] boxes is far slower on a CPU)."""
    ac, bc = a[..., None], b[:, :, None, :]
    iw = torch.minimum(ac[:, 2], bc[:, 2]).sub_(torch.maximum(ac[:, 0], bc[:, 0])).clamp_min_(0)
    ih = torch.minimum(ac[:, 3], bc[:, 3]).sub_(torch.maximum(ac[:, 1], bc[:, 1])).clamp_min_(0)
    inter = iw.mul_(ih)
    union = torch.add(_area(a)[:, :, None], _area(b)[:, None, :]).sub_(inter).clamp_min_(TINY)
    return (inter.div_(union) > iou_thresh) & (ca[:, :, None] == cb[:, None, :])


def _planes(boxes: torch.Tensor) -> torch.Tensor:
    """[B, N, 4] boxes -> [B, 4, N] float64 contiguous coordinate planes."""
    return boxes.double().transpose(1, 2).contiguous()


def _resolve(alive: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    """alive [B, S] bool, over [B, S, S] bool, zero on and below the diagonal -> keep [B, S]:
    greedy inside the block, as the fixed point iterated from keep = alive."""
    keep = alive
    while True:
        new = alive & ~(keep[:, :, None] & over).any(1)
        if torch.equal(new, keep):
            return new
        keep = new


@torch.no_grad()
def greedy_keep(suppress: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """suppress [B, N, N] bool (i suppresses j; entries i >= j ignored), valid [B, N] bool
    -> keep [B, N] bool of the greedy pass."""
    n = valid.shape[1]
    keep = torch.zeros_like(valid)
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        alive = valid[:, s:e] & ~(keep[:, :s, None] & suppress[:, :s, s:e]).any(1)
        keep[:, s:e] = _resolve(alive, suppress[:, s:e, s:e].triu(1))
    return keep


@torch.no_grad()
def nms_suppression(boxes: torch.Tensor, classes: torch.Tensor, iou_thresh: float
                    ) -> torch.Tensor:
    """boxes [B, N, 4] float xyxy, classes [B, N] int64 -> [B, N, N] bool: i suppresses j iff
    i < j, same class and IoU(i, j) > iou_thresh (float64). Computed ROWS rows at a time."""
    n = classes.shape[1]
    x = _planes(boxes)
    idx = torch.arange(n, device=boxes.device)
    out = torch.empty(*classes.shape, n, dtype=torch.bool, device=boxes.device)
    for s in range(0, n, ROWS):
        e = min(s + ROWS, n)
        out[:, s:e] = (_suppresses(x[:, :, s:e], classes[:, s:e], x, classes, iou_thresh)
                       & (idx[s:e, None] < idx))
    return out


@torch.no_grad()
def nms(boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, iou_thresh: float
        ) -> torch.Tensor:
    """boxes [B, N, 4] float xyxy, classes [B, N] int64, valid [B, N] bool, each image sorted by
    decreasing score -> keep [B, N] bool: ``greedy_keep(nms_suppression(boxes, classes,
    iou_thresh), valid)``, without the [B, N, N] matrix."""
    b = valid.shape[0]
    dev = boxes.device
    pos = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices   # valid first
    m = int(valid.sum(1).max()) if valid.numel() else 0
    pos = pos[:, :m]
    live = valid.gather(1, pos)
    x = _planes(boxes).gather(2, pos[:, None].expand(-1, 4, -1))
    cls = classes.gather(1, pos)
    # the kept boxes of each image, in order; NaN boxes (never suppressing) past its count; the
    # last slot takes the writes of the boxes not kept
    kept_x = x.new_full((b, 4, m + 1), float("nan"))
    kept_cls = cls.new_empty(b, m + 1)
    count = torch.zeros(b, 1, dtype=torch.int64, device=dev)
    keep = torch.zeros_like(live)
    for s in range(0, m, BLOCK):
        e = min(s + BLOCK, m)
        bx, bc, alive = x[:, :, s:e], cls[:, s:e], live[:, s:e]
        k = int(count.max())
        if k:
            alive = alive & ~_suppresses(kept_x[:, :, :k], kept_cls[:, :k], bx, bc,
                                         iou_thresh).any(1)
        kb = _resolve(alive, _suppresses(bx, bc, bx, bc, iou_thresh).triu(1))
        to = torch.where(kb, count + kb.cumsum(1) - 1, m)
        kept_x.scatter_(2, to[:, None].expand(-1, 4, -1), bx)
        kept_cls.scatter_(1, to, bc)
        count += kb.sum(1, keepdim=True)
        keep[:, s:e] = kb
    return torch.zeros_like(valid).scatter_(1, pos, keep)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, N, N] bool -> [B, N, W] int64, W = ceil(N / 64): bit k of word w of row i is
    mask[:, i, 64 w + k] (bit 63 the sign bit). No host sync; the bytes are assembled in a
    little-endian int64 (every CPU and GPU torch runs on)."""
    b, n, _ = mask.shape
    w = -(-n // 64)
    cols = torch.nn.functional.pad(mask, (0, 64 * w - n)).view(b, n, 8 * w, 8).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (cols << shifts).sum(-1, dtype=torch.uint8).reshape(-1, 8).view(torch.int64).view(b, n, w)
