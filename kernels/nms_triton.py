"""Greedy non-maximum suppression over a padded batch (``kernels.nms``, the twin) as Triton
kernels, with no host sync.

The suppression matrix is held packed, [B, N, W] int64 with W = ceil(N / 64): bit k of word w
of row i says whether box i suppresses box 64 w + k (``kernels.nms.pack_bits``'s layout; bit 63
is the sign bit, so words are only ORed, masked and shifted right arithmetically then masked).

``_mask_kernel``: one program per (ROWS rows, one word, one image): the IoU of the [ROWS, 64]
tile in float64, the twin's formula and operation order, then i < j, same class and
IoU > iou_thresh packed into one word per row. iou_thresh and the float64 ``tiny`` are exact
float64 values (a float kernel argument would be float32), and FMA contraction is disabled
(``enable_fp_fusion=False``) so that every product and sum is rounded as PyTorch rounds it: the
bits equal ``pack_bits(nms_suppression(...))``. Tiles wholly on or below the diagonal are skipped.

``_scan_kernel``: one program per image walks the boxes in order with the "removed" words of
the kept boxes' rows ORed into a [W_PAD] register vector. Per word: the valid flags packed into
one candidates word, the word's removed bits extracted once; per box of the word, box i is kept
iff it is a candidate not removed, and then (only then) row i is loaded and ORed in (into the
word being walked too). The keep flags of a word are stored together.

Cost per image: the mask is N^2 / 2 float64 IoUs (~16 operations each) and writes 8 N W bytes
(25 MB for B = 8, N = 5000); the scan is serial in N (a few integer operations per box, one
dependent row load of 8 W bytes per kept box).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.nms import pack_bits

ROWS = 64                       # rows per mask program
TINY_BITS = tl.constexpr(0x0010000000000000)   # torch.finfo(torch.float64).tiny's int64 bits


@triton.jit
def _mask_kernel(box_ptr, cls_ptr, thr_ptr, mask_ptr, N, W, ROWS: tl.constexpr):
    """boxes [B, N, 4] (any float dtype), classes [B, N] int64, thr [1] float64
    -> mask [B, N, W] int64 (zero-filled by the caller): bit k of word w of row i set iff
    i < j = 64 w + k < N, classes equal and IoU(i, j) > thr."""
    img = tl.program_id(2).to(tl.int64)
    w = tl.program_id(1)
    i0 = tl.program_id(0) * ROWS
    if w * 64 + 63 > i0:                            # some j > i in the tile
        i = i0 + tl.arange(0, ROWS)
        k = tl.arange(0, 64)
        j = w * 64 + k
        in_i = i < N
        in_j = j < N
        bi = box_ptr + (img * N + i) * 4
        bj = box_ptr + (img * N + j) * 4
        ax0 = tl.load(bi + 0, mask=in_i, other=0).to(tl.float64)[:, None]
        ay0 = tl.load(bi + 1, mask=in_i, other=0).to(tl.float64)[:, None]
        ax1 = tl.load(bi + 2, mask=in_i, other=0).to(tl.float64)[:, None]
        ay1 = tl.load(bi + 3, mask=in_i, other=0).to(tl.float64)[:, None]
        bx0 = tl.load(bj + 0, mask=in_j, other=0).to(tl.float64)[None, :]
        by0 = tl.load(bj + 1, mask=in_j, other=0).to(tl.float64)[None, :]
        bx1 = tl.load(bj + 2, mask=in_j, other=0).to(tl.float64)[None, :]
        by1 = tl.load(bj + 3, mask=in_j, other=0).to(tl.float64)[None, :]
        iw = tl.maximum(tl.minimum(ax1, bx1) - tl.maximum(ax0, bx0), 0.0)
        ih = tl.maximum(tl.minimum(ay1, by1) - tl.maximum(ay0, by0), 0.0)
        inter = iw * ih
        area_a = tl.maximum(ax1 - ax0, 0.0) * tl.maximum(ay1 - ay0, 0.0)
        area_b = tl.maximum(bx1 - bx0, 0.0) * tl.maximum(by1 - by0, 0.0)
        union = area_a + area_b - inter
        tiny = tl.full([], TINY_BITS, tl.int64).to(tl.float64, bitcast=True)
        iou = inter / tl.maximum(union, tiny)
        ci = tl.load(cls_ptr + img * N + i, mask=in_i, other=0)
        cj = tl.load(cls_ptr + img * N + j, mask=in_j, other=-1)
        hit = ((iou > tl.load(thr_ptr)) & (ci[:, None] == cj[None, :])
               & (i[:, None] < j[None, :]) & in_j[None, :])
        word = tl.sum(hit.to(tl.int64) << k[None, :].to(tl.int64), axis=1)
        tl.store(mask_ptr + (img * N + i) * W + w, word, mask=in_i)


@triton.jit
def _scan_kernel(mask_ptr, valid_ptr, keep_ptr, N, W, W_PAD: tl.constexpr):
    """mask [B, N, W] int64 packed (bits of columns <= the row ignored), valid [B, N] bool
    -> keep [B, N] bool: the greedy pass of one image per program."""
    img = tl.program_id(0).to(tl.int64)
    words = tl.arange(0, W_PAD)
    bits = tl.arange(0, 64)
    one = tl.full([], 1, tl.int64)
    rows = mask_ptr + img * N * W
    removed = tl.zeros([W_PAD], dtype=tl.int64)
    for w in range(0, W):
        cols = img * N + w * 64 + bits
        in_n = w * 64 + bits < N
        live = tl.load(valid_ptr + cols, mask=in_n, other=0).to(tl.int64)
        todo = tl.sum(live << bits.to(tl.int64))
        cur = tl.sum(tl.where(words == w, removed, 0))
        kept = tl.zeros([], dtype=tl.int64)
        for k in range(0, tl.minimum(N - w * 64, 64)):
            if (((todo & ~cur) >> k) & 1) != 0:
                kept = kept | (one << k)
                row = rows + (w * 64 + k) * W
                removed = removed | tl.load(row + words, mask=words < W, other=0)
                cur = cur | tl.load(row + w)
        tl.store(keep_ptr + cols, ((kept >> bits.to(tl.int64)) & 1) != 0, mask=in_n)


def _scan(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mask [B, N, W] int64 packed, valid [B, N] bool -> keep [B, N] bool."""
    b, n, w = mask.shape
    keep = torch.empty(b, n, dtype=torch.bool, device=valid.device)
    if keep.numel():
        _scan_kernel[(b,)](mask, valid.contiguous(), keep, n, w,
                           W_PAD=triton.next_power_of_2(w), num_warps=1)
    return keep


@torch.no_grad()
def greedy_keep(suppress: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The twin's contract (``kernels.nms.greedy_keep``): suppress [B, N, N] bool (entries
    i >= j ignored), valid [B, N] bool -> keep [B, N] bool. Packs in torch, then scans."""
    return _scan(pack_bits(suppress), valid)


def nms_suppression_bits(boxes: torch.Tensor, classes: torch.Tensor, iou_thresh: float
                         ) -> torch.Tensor:
    """boxes [B, N, 4] float xyxy, classes [B, N] int64 -> [B, N, W] int64:
    ``pack_bits(kernels.nms.nms_suppression(boxes, classes, iou_thresh))``."""
    b, n = classes.shape
    w = triton.cdiv(n, 64)
    mask = torch.zeros(b, n, w, dtype=torch.int64, device=boxes.device)
    if mask.numel():
        thr = torch.full((1,), iou_thresh, dtype=torch.float64, device=boxes.device)
        _mask_kernel[(triton.cdiv(n, ROWS), w, b)](
            boxes.contiguous(), classes.contiguous(), thr, mask, n, w, ROWS=ROWS,
            enable_fp_fusion=False)
    return mask


@torch.no_grad()
def nms(boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, iou_thresh: float
        ) -> torch.Tensor:
    """The twin's contract (``kernels.nms.nms``): boxes [B, N, 4] float xyxy, classes [B, N]
    int64, valid [B, N] bool, each image sorted by decreasing score -> keep [B, N] bool."""
    return _scan(nms_suppression_bits(boxes, classes, iou_thresh), valid)
