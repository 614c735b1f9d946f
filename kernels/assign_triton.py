"""Box-filtered assignment (``kernels.assign``, the twin) as fused Triton kernels, float32.

``assign``: one program per block of BLOCK pixels of one image: load e [BLOCK, D], normalise,
then over the queries QUERY_TILE at a time, up to the image's last valid one: s = p Q^T on the
tile, box filter (0 outside), the tile's argmax over its real valid queries (-inf for the
others) and second best, merged into the running ones (an equal maximum keeps the lower index,
as ``torch.max``); writes only labels int64, best and second (at least -1) float32. A batch is
one launch, the image the grid's second axis; each image's loop ends at its own last valid
query (``end``, computed on the device), so the empty instance slots of a batch cost nothing.

``assign_upsampled``: the same per block of full-resolution pixels, with the pixel embeddings
interpolated from the stride-4 map [D, h, w] in registers: four taps per pixel, the rows and
columns and weights of the twin's ``_linear_taps`` (PyTorch's bilinear, align_corners=False),
combined as the twin does, (w0x a + w1x b) w0y + (w0x c + w1x d) w1y. Neither the
full-resolution map nor its normalisation exists in memory. A GPU may contract the products
into FMAs, so the interpolated values may differ from the twin's in the last bit.

Cost per image, N = H W output pixels, D dims, Q' queries up to the last valid one, rounded up
to QUERY_TILE, b_e bytes per emb element:
  assign            reads N D b_e, writes 16 N bytes (labels, best, second); 2 N D Q' flops + the
                    filter and argmax, ~6 N Q' compares/selects.
  assign_upsampled  reads N D b_e / 16 (the stride-4 map, each tap row cached across its block),
                    writes 16 N; 2 N D Q' + 6 N D (the taps) flops.
COCO (N = 800 x 1216, D = 32, Q' = 128, fp32): assign moves 140 MB (0.04 ms at 3.35 TB/s),
assign_upsampled 23 MB, both for 8.0 GFLOP of dots and ~0.8 G elementwise operations: assign
near the balance point, assign_upsampled compute-bound. ``ciae.modeling.inference.assemble``
passes every image's ``max_detections`` instance slots, the empty ones invalid: on COCO
Q = 53 + 100, of which ~30 instances are kept, so Q' = 128 instead of one pass over 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.assign import _linear_taps, _outputs
from kernels.triton_blocks import (Tile, dot_precision, inside_boxes, load_pixels, map_strides,
                                   normalise, pad16, pixel_block, tile_for)

# Queries per tile of the assignment's loop (``query_tile``)
QUERY_TILE = 64

# Autotune tables, (query tile, dtype class of the embedding) -> Tile
# (``triton_blocks.tile_for``), seeded with the single-pass kernel's timings on an NVIDIA H200 at
# Q_PAD = the tile (the GPU suite's `tiles` section, 2026-12-04, triton 3.6.0;
# benchmarks/RESULTS.md) or, untimed, from sm_90 register/spill figures
# (benchmarks/kernels/resources.py); the `tiles` section times the looped kernel anew.
ASSIGN_TILES = {
    (16, "fp32"): Tile(128, 8), (16, "bf16"): Tile(128, 8),
    (32, "fp32"): Tile(128, 8), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 8), (64, "bf16"): Tile(128, 8),
}
ASSIGN_UPSAMPLED_TILES = {
    (16, "fp32"): Tile(128, 8), (16, "bf16"): Tile(128, 8),
    (32, "fp32"): Tile(128, 8), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 8), (64, "bf16"): Tile(128, 4),
}


@triton.jit
def _assign_store(e, qt_ptr, bt_ptr, valid_ptr, end_ptr, pix, n, width, QA, lab_ptr, best_ptr,
                  second_ptr, D_PAD: tl.constexpr, Q_TILE: tl.constexpr, BLOCK: tl.constexpr,
                  DOT: tl.constexpr):
    """e [BLOCK, D_PAD] float32 pre-normalisation embeddings of the pixels ``pix``; the queries
    padded to QA (a multiple of Q_TILE): qt [D_PAD, QA], boxes bt [4, QA] (x0, y0, x1, y1 rows),
    valid [QA] (False past Q), end [] one past the last valid query -> labels[pix] (first
    maximum), best[pix], second[pix] (the largest of the others, at least -1) over the valid
    queries: Q_TILE queries at a time up to ``end``, each tile's maximum merged into the running
    one (an equal maximum keeps the lower index). The padding makes every load whole (no mask),
    so the loads along the queries are vectors."""
    p = normalise(e)[0]
    d = tl.arange(0, D_PAD)
    k = tl.arange(0, Q_TILE)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    second = tl.full([BLOCK], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK], tl.int32)
    for t in range(0, tl.cdiv(tl.load(end_ptr), Q_TILE)):
        kk = t * Q_TILE + k             # (a product of Q_TILE: known aligned, loads stay vectors)
        s = tl.dot(p, tl.load(qt_ptr + d[:, None] * QA + kk[None, :]), input_precision=DOT)
        inside = inside_boxes(pix, width, tl.load(bt_ptr + kk), tl.load(bt_ptr + QA + kk),
                              tl.load(bt_ptr + 2 * QA + kk), tl.load(bt_ptr + 3 * QA + kk))
        s = tl.where(inside, s, 0.0)
        s = tl.where((tl.load(valid_ptr + kk) != 0)[None, :], s, float("-inf"))
        t_best = tl.max(s, axis=1)
        t_label = tl.min(tl.where(s == t_best[:, None], k[None, :], Q_TILE), axis=1)
        t_second = tl.max(tl.where(k[None, :] == t_label[:, None], float("-inf"), s), axis=1)
        better = t_best > best
        second = tl.where(better, tl.maximum(best, t_second), tl.maximum(second, t_best))
        label = tl.where(better, t_label + t * Q_TILE, label)
        best = tl.maximum(best, t_best)
    in_map = pix < n
    tl.store(lab_ptr + pix, label.to(tl.int64), mask=in_map)
    tl.store(best_ptr + pix, best, mask=in_map)
    tl.store(second_ptr + pix, tl.maximum(second, -1.0), mask=in_map)


@triton.jit
def _assign_kernel(e_ptr, qt_ptr, bt_ptr, valid_ptr, end_ptr, lab_ptr, best_ptr, second_ptr, n,
                   width, QA, D, s_d, s_p, D_PAD: tl.constexpr, Q_TILE: tl.constexpr,
                   BLOCK: tl.constexpr, DOT: tl.constexpr):
    """e [B, D, n] (any float dtype; image b at b * D * n, then strides s_d, s_p), the padded
    queries qt [B, D_PAD, QA] float32, boxes bt [B, 4, QA] float32 and valid [B, QA] bool, end
    [B] int32 (one past each image's last valid query) -> labels [B, n] int64, best [B, n]
    float32, second [B, n] float32."""
    img = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = load_pixels(e_ptr + img * D * n, pix, n, D, s_d, s_p, D_PAD, tl.float32)
    _assign_store(e, qt_ptr + img * D_PAD * QA, bt_ptr + img * 4 * QA, valid_ptr + img * QA,
                  end_ptr + img, pix, n, width, QA, lab_ptr + img * n, best_ptr + img * n,
                  second_ptr + img * n, D_PAD, Q_TILE, BLOCK, DOT)


@triton.jit
def _assign_upsampled_kernel(e_ptr, qt_ptr, bt_ptr, valid_ptr, end_ptr, lab_ptr, best_ptr,
                             second_ptr, ry0_ptr, ry1_ptr, wy0_ptr, wy1_ptr, rx0_ptr, rx1_ptr,
                             wx0_ptr, wx1_ptr, n, width, lo_n, lo_w, QA, D, s_d, s_p,
                             D_PAD: tl.constexpr, Q_TILE: tl.constexpr, BLOCK: tl.constexpr,
                             DOT: tl.constexpr):
    """e [B, D, lo_h * lo_w] the stride-4 maps (strides as ``_assign_kernel``'s), qt, bt, valid,
    end as ``_assign_kernel``; the taps [H] (rows) and [W] (columns): source indices int32
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
    _assign_store(e, qt_ptr + img * D_PAD * QA, bt_ptr + img * 4 * QA, valid_ptr + img * QA,
                  end_ptr + img, pix, n, width, QA, lab_ptr + img * n, best_ptr + img * n,
                  second_ptr + img * n, D_PAD, Q_TILE, BLOCK, DOT)


def query_tile(q: int) -> int:
    """Queries per tile of the assignment's loop for Q queries: ``QUERY_TILE``, or Q padded
    (``pad16``) when smaller. Also the class of the launch tables."""
    return min(QUERY_TILE, pad16(q))


def _batch(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           valid: torch.Tensor | None) -> tuple:
    """One image's or a batch's inputs -> (emb [B, D, h, w], its strides: ``map_strides``), and
    the queries padded to QA (Q rounded up to its ``query_tile``), contiguous: transposed
    queries [B, D_PAD, QA] float32 (zeros in the padding), boxes [B, 4, QA] float32 (the x0,
    y0, x1, y1 rows), valid [B, QA] bool (False in the padding); and end [B] int32, one past
    each image's last valid query (on the device: no host sync)."""
    if emb.dim() == 3:
        emb, queries, boxes = emb[None], queries[None], boxes[None]
        valid = None if valid is None else valid[None]
    b, q, d = queries.shape
    dev = emb.device
    qa = triton.cdiv(q, query_tile(q)) * query_tile(q)
    qt = queries.new_zeros(b, pad16(d), qa, dtype=torch.float32)
    qt[:, :d, :q] = queries.detach().transpose(1, 2)
    bt = boxes.new_zeros(b, 4, qa, dtype=torch.float32)
    bt[:, :, :q] = boxes.detach().transpose(1, 2)
    ok = torch.zeros(b, qa, dtype=torch.bool, device=dev)
    if valid is None:
        ok[:, :q] = True
        end = torch.full((b,), q, dtype=torch.int32, device=dev)
    else:
        ok[:, :q] = valid
        end = torch.where(valid, torch.arange(1, q + 1, dtype=torch.int32, device=dev), 0)
        end = end.amax(1) if q else end.new_zeros(b)
    return map_strides(emb), qt, bt, ok, end


@torch.no_grad()
def assign(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           chunk: int | None = 65536, valid: torch.Tensor | None = None, *,
           block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin's contract (``kernels.assign.assign``): emb [D, H, W] (normalised or not),
    queries [Q, D] unit norm, boxes [Q, 4] xyxy (exclusive end), valid [Q] bool (None: all)
    -> labels [H, W] int64, best, second [H, W] float32; or a batch of them ([B, D, H, W],
    [B, Q, D], [B, Q, 4], [B, Q] -> [B, H, W] each). ``chunk`` is accepted for the signature
    and unused; ``block`` overrides the pixels per program (a power of two >= 16)."""
    (e, s_d, s_p), qt, bt, ok, end = _batch(emb, queries, boxes, valid)
    b, d, h, w = e.shape
    q = queries.shape[-2]
    labels, best, second = _outputs((b, h, w), e.device)
    tile = tile_for(ASSIGN_TILES, query_tile(q), e.dtype)
    bs = pixel_block(h * w, e.device, tile.block, block)
    _assign_kernel[(triton.cdiv(h * w, bs), b)](
        e, qt, bt, ok, end, labels, best, second, h * w, w, qt.shape[2], d, s_d, s_p,
        D_PAD=pad16(d), Q_TILE=query_tile(q), BLOCK=bs, DOT=dot_precision(torch.float32),
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
    (e, s_d, s_p), qt, bt, ok, end = _batch(emb_lowres, queries, boxes, valid)
    b, d, lo_h, lo_w = e.shape
    hh, ww = out_size
    q = queries.shape[-2]
    dev = e.device
    ry0, ry1, wy0, wy1 = _linear_taps(lo_h, hh, dev)
    rx0, rx1, wx0, wx1 = _linear_taps(lo_w, ww, dev)
    labels, best, second = _outputs((b, hh, ww), dev)
    tile = tile_for(ASSIGN_UPSAMPLED_TILES, query_tile(q), e.dtype)
    bs = pixel_block(hh * ww, dev, tile.block, block)
    _assign_upsampled_kernel[(triton.cdiv(hh * ww, bs), b)](
        e, qt, bt, ok, end, labels, best, second,
        ry0.int(), ry1.int(), wy0, wy1, rx0.int(), rx1.int(), wx0, wx1,
        hh * ww, ww, lo_h * lo_w, lo_w, qt.shape[2], d, s_d, s_p,
        D_PAD=pad16(d), Q_TILE=query_tile(q), BLOCK=bs, DOT=dot_precision(torch.float32),
        **tile.options())
    return (labels, best, second) if emb_lowres.dim() == 4 else (labels[0], best[0], second[0])
