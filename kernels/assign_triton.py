"""Box-filtered assignment (``kernels.assign``, the twin) as fused Triton kernels, float32.

``assign``: one program per block of BLOCK pixels of one image: load e [BLOCK, D], normalise,
s = p Q^T on the padded queries, box filter (0 outside), argmax over the real valid queries
(-inf for the others; the lowest index among equal maxima, as ``torch.max``) and the second
best (at least -1); writes only labels int64, best and second float32. A batch is one launch,
the image the grid's second axis.

``assign_upsampled``: the same per block of full-resolution pixels, with the pixel embeddings
interpolated from the stride-4 map [D, h, w] in registers: four taps per pixel, the rows and
columns and weights of the twin's ``_linear_taps`` (PyTorch's bilinear, align_corners=False),
combined as the twin does, (w0x a + w1x b) w0y + (w0x c + w1x d) w1y. Neither the
full-resolution map nor its normalisation exists in memory. A GPU may contract the products
into FMAs, so the interpolated values may differ from the twin's in the last bit.

Cost per image, N = H W output pixels, D dims, Q queries (Q_PAD computed), b_e bytes per emb
element:
  assign            reads N D b_e, writes 16 N bytes (labels, best, second); 2 N D Q_PAD flops + the
                    filter and argmax, ~6 N Q_PAD compares/selects.
  assign_upsampled  reads N D b_e / 16 (the stride-4 map, each tap row cached across its block),
                    writes 16 N; 2 N D Q_PAD + 6 N D (the taps) flops.
COCO (N = 800 x 1216, D = 32, Q = 113 -> 128, fp32): assign moves 140 MB (0.04 ms at 3.35 TB/s),
assign_upsampled 23 MB, both for 8.0 GFLOP of dots and ~0.8 G elementwise operations: assign
near the balance point, assign_upsampled compute-bound. ``ciae.modeling.inference.assemble`` passes every
image's ``max_detections`` instance slots, the empty ones invalid: on COCO Q = 53 + 100 -> 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.assign import _linear_taps, _outputs
from kernels.triton_blocks import (Tile, box_cosine, dot_precision, load_pixels, load_queries_t,
                                   map_strides, pad16, pixel_block, tile_for)

# Autotune tables, (Q_PAD, dtype class of the embedding) -> Tile
# (``triton_blocks.tile_for``): the classes timed on an NVIDIA H200 by the GPU suite's `tiles`
# section (2026-12-04, triton 3.6.0; benchmarks/RESULTS.md) take the fastest tile whose outputs
# agree; the others keep their seed from sm_90 register/spill figures
# (benchmarks/kernels/resources.py).
ASSIGN_TILES = {
    (16, "fp32"): Tile(128, 8), (16, "bf16"): Tile(128, 8),
    (32, "fp32"): Tile(128, 8), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 8), (64, "bf16"): Tile(128, 8),
    (128, "fp32"): Tile(32, 4), (128, "bf16"): Tile(32, 4),
    (256, "fp32"): Tile(32, 8), (256, "bf16"): Tile(32, 8),
    (512, "fp32"): Tile(16, 8), (512, "bf16"): Tile(16, 8),
}
ASSIGN_UPSAMPLED_TILES = {
    (16, "fp32"): Tile(128, 8), (16, "bf16"): Tile(128, 8),
    (32, "fp32"): Tile(128, 8), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 8), (64, "bf16"): Tile(128, 4),
    (128, "fp32"): Tile(32, 4), (128, "bf16"): Tile(32, 4),
    (256, "fp32"): Tile(32, 8), (256, "bf16"): Tile(32, 4),
    (512, "fp32"): Tile(16, 8), (512, "bf16"): Tile(16, 8),
}

@triton.jit
def _argmax_store(s, valid_ptr, pix, n, Q, lab_ptr, best_ptr, second_ptr, Q_PAD: tl.constexpr):
    """s [BLOCK, Q_PAD] filtered similarities, valid [Q] bool -> labels[pix] (first maximum),
    best[pix], second[pix] (the largest of the others, at least -1), over the valid queries."""
    k = tl.arange(0, Q_PAD)[None, :]
    ok = tl.load(valid_ptr + k, mask=k < Q, other=0) != 0
    s = tl.where(ok, s, -float("inf"))
    best = tl.max(s, axis=1)
    label = tl.min(tl.where(s == best[:, None], k, Q_PAD), axis=1)
    second = tl.maximum(tl.max(tl.where(k == label[:, None], -float("inf"), s), axis=1), -1.0)
    in_map = pix < n
    tl.store(lab_ptr + pix, label.to(tl.int64), mask=in_map)
    tl.store(best_ptr + pix, best, mask=in_map)
    tl.store(second_ptr + pix, second, mask=in_map)


@triton.jit
def _assign_kernel(e_ptr, qt_ptr, box_ptr, valid_ptr, lab_ptr, best_ptr, second_ptr, n, width,
                   Q, D, s_d, s_p, D_PAD: tl.constexpr, Q_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   DOT: tl.constexpr):
    """e [B, D, n] (any float dtype; image b at b * D * n, then strides s_d, s_p),
    qt [B, D_PAD, Q_PAD] float32, boxes [B, Q, 4], valid [B, Q] bool -> labels [B, n] int64,
    best [B, n] float32, second [B, n] float32."""
    img = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = load_pixels(e_ptr + img * D * n, pix, n, D, s_d, s_p, D_PAD, tl.float32)
    qt = load_queries_t(qt_ptr + img * D_PAD * Q_PAD, D_PAD, Q_PAD)
    _, _, s, _ = box_cosine(e, qt, box_ptr + img * Q * 4, pix, width, Q, Q_PAD, DOT)
    _argmax_store(s, valid_ptr + img * Q, pix, n, Q, lab_ptr + img * n, best_ptr + img * n,
                  second_ptr + img * n, Q_PAD)


@triton.jit
def _assign_upsampled_kernel(e_ptr, qt_ptr, box_ptr, valid_ptr, lab_ptr, best_ptr, second_ptr,
                             ry0_ptr, ry1_ptr, wy0_ptr, wy1_ptr, rx0_ptr, rx1_ptr, wx0_ptr, wx1_ptr,
                             n, width, lo_n, lo_w, Q, D, s_d, s_p, D_PAD: tl.constexpr,
                             Q_PAD: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
    """e [B, D, lo_h * lo_w] the stride-4 maps (strides as ``_assign_kernel``'s), qt, boxes,
    valid as ``_assign_kernel``; the taps [H] (rows) and [W] (columns): source indices int32
    and weights float32 -> labels [B, n] int64, best [B, n] float32, second [B, n] float32 of
    the n = H * W output pixels."""
    img = tl.program_id(1).to(tl.int64)
    e_ptr += img * D * lo_n
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_map = pix < n
    y = pix // width
    x = pix % width
    ry0 = tl.load(ry0_ptr + y, mask=in_map, other=0)
    ry1 = tl.load(ry1_ptr + y, mask=in_map, other=0)
    rx0 = tl.load(rx0_ptr + x, mask=in_map, other=0)
    rx1 = tl.load(rx1_ptr + x, mask=in_map, other=0)
    wy0 = tl.load(wy0_ptr + y, mask=in_map, other=0)[:, None]
    wy1 = tl.load(wy1_ptr + y, mask=in_map, other=0)[:, None]
    wx0 = tl.load(wx0_ptr + x, mask=in_map, other=0)[:, None]
    wx1 = tl.load(wx1_ptr + x, mask=in_map, other=0)[:, None]
    d = tl.arange(0, D_PAD)
    col = d[None, :] * s_d
    mask = in_map[:, None] & (d < D)[None, :]
    a = tl.load(e_ptr + col + ((ry0 * lo_w + rx0) * s_p)[:, None], mask=mask, other=0).to(tl.float32)
    b = tl.load(e_ptr + col + ((ry0 * lo_w + rx1) * s_p)[:, None], mask=mask, other=0).to(tl.float32)
    c = tl.load(e_ptr + col + ((ry1 * lo_w + rx0) * s_p)[:, None], mask=mask, other=0).to(tl.float32)
    f = tl.load(e_ptr + col + ((ry1 * lo_w + rx1) * s_p)[:, None], mask=mask, other=0).to(tl.float32)
    e = (wx0 * a + wx1 * b) * wy0 + (wx0 * c + wx1 * f) * wy1
    qt = load_queries_t(qt_ptr + img * D_PAD * Q_PAD, D_PAD, Q_PAD)
    _, _, s, _ = box_cosine(e, qt, box_ptr + img * Q * 4, pix, width, Q, Q_PAD, DOT)
    _argmax_store(s, valid_ptr + img * Q, pix, n, Q, lab_ptr + img * n, best_ptr + img * n,
                  second_ptr + img * n, Q_PAD)


def _batch(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's or a batch's inputs -> (emb [B, D, h, w], its strides: ``map_strides``), the
    transposed zero-padded queries [B, D_PAD, Q_PAD] float32, boxes [B, Q, 4] float32 and
    valid [B, Q] bool, contiguous."""
    if emb.dim() == 3:
        emb, queries, boxes = emb[None], queries[None], boxes[None]
        valid = None if valid is None else valid[None]
    b, q, d = queries.shape
    qt = queries.new_zeros(b, pad16(d), pad16(q), dtype=torch.float32)
    qt[:, :d, :q] = queries.detach().transpose(1, 2)
    valid = torch.ones(b, q, dtype=torch.bool, device=emb.device) if valid is None else valid
    return map_strides(emb), qt, boxes.float().contiguous(), valid.contiguous()


@torch.no_grad()
def assign(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           chunk: int | None = 65536, valid: torch.Tensor | None = None, *,
           block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's contract (``kernels.assign.assign``): emb [D, H, W] (normalised or not),
    queries [Q, D] unit norm, boxes [Q, 4] xyxy (exclusive end), valid [Q] bool (None: all)
    -> labels [H, W] int64, best, second [H, W] float32; or a batch of them ([B, D, H, W],
    [B, Q, D], [B, Q, 4], [B, Q] -> [B, H, W] each). ``chunk`` is accepted for the signature
    and unused; ``block`` overrides the pixels per program (a power of two >= 16)."""
    (e, s_d, s_p), qt, bx, ok = _batch(emb, queries, boxes, valid)
    b, d, h, w = e.shape
    q = bx.shape[1]
    labels, best, second = _outputs((b, h, w), e.device)
    tile = tile_for(ASSIGN_TILES, pad16(q), e.dtype)
    bs = pixel_block(h * w, e.device, tile.block, block)
    _assign_kernel[(triton.cdiv(h * w, bs), b)](
        e, qt, bx, ok, labels, best, second, h * w, w, q, d, s_d, s_p,
        D_PAD=pad16(d), Q_PAD=pad16(q), BLOCK=bs, DOT=dot_precision(torch.float32),
        **tile.options())
    return (labels, best, second) if emb.dim() == 4 else (labels[0], best[0], second[0])


@torch.no_grad()
def assign_upsampled(emb_lowres: torch.Tensor, out_size: tuple[int, int], queries: torch.Tensor,
                     boxes: torch.Tensor, chunk: int | None = 65536,
                     valid: torch.Tensor | None = None, *, block: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's contract (``kernels.assign.assign_upsampled``): emb_lowres [D, h, w],
    out_size (H, W), queries [Q, D] unit norm, boxes [Q, 4] in output pixels, valid [Q] bool
    (None: all) -> labels [H, W] int64, best, second [H, W] float32 of the bilinear upsampling
    to (H, W); or a batch of them as ``assign``'s. ``chunk`` is accepted for the signature and
    unused; ``block`` as in ``assign``."""
    (e, s_d, s_p), qt, bx, ok = _batch(emb_lowres, queries, boxes, valid)
    b, d, lo_h, lo_w = e.shape
    hh, ww = out_size
    q = bx.shape[1]
    dev = e.device
    ry0, ry1, wy0, wy1 = _linear_taps(lo_h, hh, dev)
    rx0, rx1, wx0, wx1 = _linear_taps(lo_w, ww, dev)
    labels, best, second = _outputs((b, hh, ww), dev)
    tile = tile_for(ASSIGN_UPSAMPLED_TILES, pad16(q), e.dtype)
    bs = pixel_block(hh * ww, dev, tile.block, block)
    _assign_upsampled_kernel[(triton.cdiv(hh * ww, bs), b)](
        e, qt, bx, ok, labels, best, second,
        ry0.int(), ry1.int(), wy0, wy1, rx0.int(), rx1.int(), wx0, wx1,
        hh * ww, ww, lo_h * lo_w, lo_w, q, d, s_d, s_p,
        D_PAD=pad16(d), Q_PAD=pad16(q), BLOCK=bs, DOT=dot_precision(torch.float32),
        **tile.options())
    return (labels, best, second) if emb_lowres.dim() == 4 else (labels[0], best[0], second[0])
