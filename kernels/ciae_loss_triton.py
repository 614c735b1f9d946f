"""The CIAE loss of one image (``kernels.ciae_loss``, the twin, has the formulas) as two fused
Triton kernels behind a torch.autograd.Function. No [pixels, Q] matrix ever reaches global memory.

Forward, one program per block of BLOCK pixels: load e [BLOCK, D] (from planes or pixel-major
maps as they are: ``triton_blocks.map_strides``), normalise, s = p Q^T on the
padded queries, box filter, z, the top-K of z by K rounds of row max + mask (the lowest index
among equal values), l of each kept term, times the pixel weight; it writes the block's loss sum
and valid-pixel count, and the launcher sums those [blocks] partials.

Backward, a persistent grid of P programs, each over blocks pid, pid + P, ...: recomputes the
block's forward, builds G = dL/ds [BLOCK, Q_PAD] in registers (the twin's formulas: g at the kept
terms, -sum g at the target, 0 outside the boxes) and writes dL/de [D, BLOCK] (through the
normalisation, EPS as in the twin; in emb's layout) and dL/dw [BLOCK]; dL/dq = G^T p accumulates in a
[Q_PAD, D_PAD] register tile written once per program, and the launcher sums the P partials
(deterministic, no atomics).

Ties: the kept set is chosen on z, lowest query index first, where ``torch.topk`` may keep another
of the tied terms. Tied terms have equal z, so equal l and equal g: the loss, dL/dw and the
target's -sum g do not depend on which is kept. The common tie is between queries whose box does
not contain the pixel (s = 0, so all share z = margin - s_it); their G entries are zeroed by the
box filter whichever is kept, so dL/de and dL/dq are tie-invariant too. Only an exact tie between
two in-box non-target similarities could move a g from one query to the other.

Cost per image, N = H W pixels, D dims, Q queries (Q_PAD computed), K kept, b_e / b_w bytes per
emb / weight element:
  forward   reads N (D b_e + 8 + b_w) bytes (emb, int64 target, weight), writes 8 bytes per block;
            2 N D Q_PAD flops for s, ~3 N D for the norm, ~(4 K + 12) N Q_PAD compares/selects.
  backward  reads the same, writes N D b_e (dL/de) + N b_w (dL/dw) + P Q_PAD D_PAD partials;
            6 N D Q_PAD flops (s again, G Q, G^T p) plus the forward's elementwise work.
COCO (N = 800 x 1216, D = 32, Q = 113 -> 128, fp32): 136 MB read forward (0.04 ms at 3.35 TB/s),
261 MB moved backward; 8.0 + 23.9 GFLOP of dots (tensor cores, tf32x3) and ~4 G elementwise
operations forward on the CUDA cores, which should dominate: expect compute-bound kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ciae_loss import TINY
from kernels.triton_blocks import (EPS_C, Tile, box_cosine, dot_precision, load_pixels,
                                   load_queries_t, map_strides, pad16, padded_queries_t,
                                   persistent_programs, pixel_block, tile_for)

TINY_C = tl.constexpr(TINY)


# Autotune tables, (Q_PAD, dtype class) -> Tile
# (``triton_blocks.tile_for``): the classes timed on an NVIDIA H200 by the GPU suite's `tiles`
# section (2026-12-04, triton 3.6.0; benchmarks/RESULTS.md) take the fastest tile whose outputs
# agree; the others keep their seed from sm_90 register/spill figures
# (benchmarks/kernels/resources.py).
# Backward, which holds more such tiles and both query layouts: 16 pixels per program; larger
# tiles spill hundreds of bytes.
LOSS_FWD_TILES = {
    (16, "fp32"): Tile(128, 8), (16, "bf16"): Tile(128, 8),
    (32, "fp32"): Tile(128, 8), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 8), (64, "bf16"): Tile(128, 4),
    (128, "fp32"): Tile(128, 4), (128, "bf16"): Tile(128, 4),
    (256, "fp32"): Tile(32, 8), (256, "bf16"): Tile(64, 4),
    (512, "fp32"): Tile(16, 8), (512, "bf16"): Tile(16, 8),
}
LOSS_BWD_TILES = {
    (16, "fp32"): Tile(16, 4), (16, "bf16"): Tile(16, 4),
    (32, "fp32"): Tile(16, 4), (32, "bf16"): Tile(16, 4),
    (64, "fp32"): Tile(16, 4), (64, "bf16"): Tile(16, 4, 1),
    (128, "fp32"): Tile(16, 4), (128, "bf16"): Tile(16, 4),
    (256, "fp32"): Tile(16, 8), (256, "bf16"): Tile(16, 8),
    (512, "fp32"): Tile(16, 8), (512, "bf16"): Tile(16, 8),
}

@triton.jit
def _hinge(s, t_ptr, w_ptr, pix, n, Q, margin, Q_PAD: tl.constexpr):
    """s [BLOCK, Q_PAD] filtered similarities of pixels ``pix`` -> valid [BLOCK] (target >= 0),
    w [BLOCK] weight (0 where not valid), is_t [BLOCK, Q_PAD] (k == max(t, 0)),
    z [BLOCK, Q_PAD] (Eq. 7 as the twin computes it; -inf for k >= Q)."""
    in_map = pix < n
    t = tl.load(t_ptr + pix, mask=in_map, other=-1)
    valid = t >= 0
    w = tl.where(valid, tl.load(w_ptr + pix, mask=in_map, other=0).to(s.dtype), 0.0)
    k = tl.arange(0, Q_PAD)[None, :]
    is_t = k == tl.maximum(t, 0)[:, None]
    c = margin - tl.sum(tl.where(is_t, s, 0.0), axis=1)[:, None]      # margin - s_it
    z = tl.where(is_t, c + 1, s + c)
    return valid, w, is_t, tl.where(k < Q, z, -float("inf"))


@triton.jit
def _top_k(z, top_k, two_m, wg, Q_PAD: tl.constexpr, WITH_GRAD: tl.constexpr):
    """z [BLOCK, Q_PAD] -> lsum [BLOCK], the sum of l over the top_k largest z of each row (K
    rounds of max + mask, lowest index among equal values), and if WITH_GRAD, gk [BLOCK, Q_PAD]
    = dl/dz times wg [BLOCK] at the kept terms, 0 elsewhere (the twin's g), else zeros."""
    k = tl.arange(0, Q_PAD)[None, :]
    lsum = tl.zeros_like(wg)
    gk = tl.zeros_like(z)
    for _ in range(top_k):
        m = tl.max(z, axis=1)
        j = tl.min(tl.where(z == m[:, None], k, Q_PAD), axis=1)
        hit = k == j[:, None]
        z = tl.where(hit, -float("inf"), z)
        u = 1 - tl.maximum(m, 0.0) / two_m
        lsum += -tl.log(tl.maximum(u, TINY_C))
        if WITH_GRAD:
            g = tl.where((m > 0) & (u >= TINY_C), wg / (two_m * tl.maximum(u, TINY_C)), 0.0)
            gk = tl.where(hit, g[:, None], gk)
    return lsum, gk


@triton.jit
def _loss_fwd_kernel(e_ptr, qt_ptr, box_ptr, t_ptr, w_ptr, c_ptr, loss_ptr, count_ptr,
                     n, width, Q, D, s_d, s_p, top_k, D_PAD: tl.constexpr, Q_PAD: tl.constexpr,
                     BLOCK: tl.constexpr, DOT: tl.constexpr):
    """e [D, n] at strides (s_d, s_p), qt [D_PAD, Q_PAD], boxes [Q, 4], target [n], weight [n], c = (margin, 2 + margin)
    -> loss [blocks] (sum of w * top-K l), count [blocks] int32 (valid pixels)."""
    ACC: tl.constexpr = qt_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    margin = tl.load(c_ptr)
    two_m = tl.load(c_ptr + 1)
    e = load_pixels(e_ptr, pix, n, D, s_d, s_p, D_PAD, ACC)
    qt = load_queries_t(qt_ptr, D_PAD, Q_PAD)
    _, norm, s, _ = box_cosine(e, qt, box_ptr, pix, width, Q, Q_PAD, DOT)
    valid, w, _, z = _hinge(s, t_ptr, w_ptr, pix, n, Q, margin, Q_PAD)
    lsum, _ = _top_k(z, top_k, two_m, w, Q_PAD, False)
    # a NaN embedding makes the loss NaN, as in the twin (its top-k keeps NaN; max drops it)
    lsum = tl.where(norm != norm, float("nan"), lsum)
    tl.store(loss_ptr + pid, tl.sum(w * lsum, axis=0))
    tl.store(count_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))


@triton.jit
def _loss_bwd_kernel(e_ptr, qt_ptr, box_ptr, t_ptr, w_ptr, c_ptr, gl_ptr, ge_ptr, gw_ptr, gq_ptr,
                     n, width, Q, D, s_d, s_p, top_k, num_blocks,
                     NEED_E: tl.constexpr, NEED_Q: tl.constexpr, NEED_W: tl.constexpr,
                     D_PAD: tl.constexpr, Q_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     DOT: tl.constexpr):
    """The forward's inputs and gl [] = dL/dloss -> ge [D, n] dL/de (emb's dtype and strides),
    gw [n] dL/dw, gq [programs, Q_PAD, D_PAD] per-program partials of dL/dq; each if NEED_*."""
    ACC: tl.constexpr = qt_ptr.dtype.element_ty
    margin = tl.load(c_ptr)
    two_m = tl.load(c_ptr + 1)
    gl = tl.load(gl_ptr).to(ACC)
    d = tl.arange(0, D_PAD)
    k = tl.arange(0, Q_PAD)
    qt = load_queries_t(qt_ptr, D_PAD, Q_PAD)
    gq = tl.zeros([Q_PAD, D_PAD], ACC)
    for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
        pix = blk * BLOCK + tl.arange(0, BLOCK)
        in_map = pix < n
        e = load_pixels(e_ptr, pix, n, D, s_d, s_p, D_PAD, ACC)
        p, norm, s, inside = box_cosine(e, qt, box_ptr, pix, width, Q, Q_PAD, DOT)
        valid, w, is_t, z = _hinge(s, t_ptr, w_ptr, pix, n, Q, margin, Q_PAD)
        lsum, gk = _top_k(z, top_k, two_m, w * gl, Q_PAD, NEED_E or NEED_Q)
        if NEED_W:
            tl.store(gw_ptr + pix, tl.where(valid, lsum, 0.0) * gl, mask=in_map)
        if NEED_E or NEED_Q:
            grad_s = tl.where(is_t, -tl.sum(gk, axis=1)[:, None], gk)   # every z_ij holds -s_it
            grad_s = tl.where(inside, grad_s, 0.0)
            if NEED_Q:
                gq = tl.dot(tl.trans(grad_s), p, gq, input_precision=DOT)
            if NEED_E:
                dp = tl.dot(grad_s, tl.trans(qt), input_precision=DOT)
                radial = tl.where(norm >= EPS_C, tl.sum(p * dp, axis=1), 0.0)
                ge = (dp - p * radial[:, None]) / tl.maximum(norm, EPS_C)[:, None]
                tl.store(ge_ptr + d[None, :] * s_d + pix[:, None] * s_p, ge.to(ge_ptr.dtype.element_ty),
                         mask=in_map[:, None] & (d < D)[None, :])
    if NEED_Q:
        tl.store(gq_ptr + tl.program_id(0) * Q_PAD * D_PAD + k[:, None] * D_PAD + d[None, :], gq)


def _prepare(emb, queries, boxes, target, weight, margin):
    """The kernel inputs (the map in its own layout, with its strides) and the accumulation
    dtype."""
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    consts = torch.full((2,), 2 + margin, dtype=acc, device=emb.device)
    consts[0].fill_(margin)   # a fill kernel: ``consts[0] = margin`` copies a host scalar (a sync)
    return (acc, map_strides(emb), padded_queries_t(queries, acc),
            boxes.detach().float().contiguous(), target.reshape(-1).contiguous(),
            weight.detach().reshape(-1).contiguous(), consts)


class _EmbeddingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, queries, boxes, target, weight, margin, top_k, block):
        d, h, w = emb.shape
        n, q = h * w, queries.shape[0]
        acc, (e, s_d, s_p), qt, bx, t, wt, consts = _prepare(emb, queries, boxes, target, weight,
                                                             margin)
        tile = tile_for(LOSS_FWD_TILES, pad16(q), emb.dtype)
        bs = pixel_block(n, emb.device, tile.block, block)
        blocks = triton.cdiv(n, bs)
        loss = torch.empty(blocks, dtype=acc, device=emb.device)
        count = torch.empty(blocks, dtype=torch.int32, device=emb.device)
        k = min(top_k, q)
        _loss_fwd_kernel[(blocks,)](e, qt, bx, t, wt, consts, loss, count, n, w, q, d, s_d, s_p, k,
                                    D_PAD=pad16(d), Q_PAD=pad16(q), BLOCK=bs,
                                    DOT=dot_precision(acc), **tile.options())
        ctx.save_for_backward(emb, queries, boxes, target, weight)
        ctx.margin, ctx.k, ctx.block = margin, k, block
        num_valid = count.sum().to(acc)
        ctx.mark_non_differentiable(num_valid)
        return loss.sum(), num_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_num_valid):
        emb, queries, boxes, target, weight = ctx.saved_tensors
        need_e, need_q, _, _, need_w = ctx.needs_input_grad[:5]
        d, h, w = emb.shape
        n, q = h * w, queries.shape[0]
        acc, (e, s_d, s_p), qt, bx, t, wt, consts = _prepare(emb, queries, boxes, target, weight,
                                                             ctx.margin)
        tile = tile_for(LOSS_BWD_TILES, pad16(q), emb.dtype)
        bs = pixel_block(n, emb.device, tile.block, ctx.block)
        blocks = triton.cdiv(n, bs)
        programs = persistent_programs(blocks, emb.device)
        ge = torch.empty_like(e) if need_e else e
        gw = torch.empty(n, dtype=acc, device=emb.device) if need_w else consts
        gq = torch.empty(programs, pad16(q), pad16(d), dtype=acc, device=emb.device) if need_q \
            else consts
        _loss_bwd_kernel[(programs,)](e, qt, bx, t, wt, consts, grad_loss.to(acc).contiguous(),
                                      ge, gw, gq, n, w, q, d, s_d, s_p, ctx.k, blocks,
                                      NEED_E=need_e, NEED_Q=need_q, NEED_W=need_w,
                                      D_PAD=pad16(d), Q_PAD=pad16(q), BLOCK=bs,
                                      DOT=dot_precision(acc), **tile.options())
        return (ge if need_e else None,
                gq.sum(0)[:q, :d].to(queries.dtype) if need_q else None,
                None, None,
                gw.view_as(weight).to(weight.dtype) if need_w else None,
                None, None, None)


def embedding_loss(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
                   target: torch.Tensor, weight: torch.Tensor, margin: float, top_k: int,
                   chunk: int | None = 65536, *, block: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin's contract (``kernels.ciae_loss.embedding_loss``): emb [D, H, W] (float16,
    bfloat16, float32 or float64; computed in float32, float64 for float64), queries [Q, D] unit
    norm, boxes [Q, 4] xyxy (exclusive end), target [H, W] int64 (-1 = ignore), weight [H, W]
    -> loss_sum [] (differentiable w.r.t. emb, queries and weight), num_valid [] (no gradient).

    ``chunk`` is accepted for the signature and unused: no [pixels, Q] buffer exists to bound.
    ``block`` overrides the pixels per program (a power of two >= 16; tests use it)."""
    return _EmbeddingLoss.apply(emb, queries, boxes, target, weight, float(margin), int(top_k),
                                block)
