"""Per-image segment sums and pixel counts (``kernels.segment_sums``, the twin) in one Triton pass.

Forward, one program per (block of BLOCK pixels, image): load the block's labels and its
[BLOCK, D_PAD] embeddings once (planes or pixel-major maps as they are:
``triton_blocks.map_strides``), then for each tile of S_BLOCK segment ids reduce the block with a
one-hot matmul, onehot^T e -> [S_BLOCK, D_PAD] (``tl.dot``, float32 accumulation; with tf32x3 on
NVIDIA each embedding enters with ~22 significant bits), and ``atomic_add`` only the rows of
segments present in the block into sums [B, S, D] and counts [B, S]. Labels are spatially
coherent, so a block touches a few segments and the atomics are ~D per segment per block instead
of D per pixel. Atomics make the summation order, hence the last bits, vary from run to run.

Backward, one program per (block, image): each pixel gathers the gradient row of its segment,
dL/de[b, :, i] = dL/dsums[b, label_i, :] (0 for label -1), written in emb's dtype and layout.

Cost, B images of N pixels, D dims, S segments, b_e bytes per emb element:
  forward   reads B N (D b_e + 8) bytes (emb, int64 labels), atomics on B S (D + 1) values per
            block that holds them; 2 B N D S_PAD flops of one-hot matmul (S_PAD = S rounded up
            to the tile; the tiles loop when S > 128).
  backward  reads B N 8 + the [B, S, D] gradient (cached), writes B N D b_e.
COCO (B = 2, N = 800 x 1216, D = 32, fp32): 265 MB read forward, 265 MB moved backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_blocks import (Tile, dot_precision, load_pixels, map_strides, pad16, pixel_block,
                                   tile_for)

# Autotune tables, forward (S_BLOCK, dtype class), backward (D_PAD, dtype class) -> Tile
# (``triton_blocks.tile_for``): the classes timed on an NVIDIA H200 by the GPU suite's `tiles`
# section (2026-12-04, triton 3.6.0; benchmarks/RESULTS.md) take the fastest tile whose outputs
# agree; the others keep their seed from sm_90 register/spill figures
# (benchmarks/kernels/resources.py).
SEGMENT_SUMS_TILES = {
    (16, "fp32"): Tile(64, 8), (16, "bf16"): Tile(64, 8),
    (32, "fp32"): Tile(64, 8), (32, "bf16"): Tile(64, 8),
    (64, "fp32"): Tile(32, 4), (64, "bf16"): Tile(32, 4),
}
SEGMENT_SUMS_BWD_TILES = {
    (16, "fp32"): Tile(128, 4), (16, "bf16"): Tile(128, 4),
    (32, "fp32"): Tile(64, 4), (32, "bf16"): Tile(128, 8),
    (64, "fp32"): Tile(128, 4), (64, "bf16"): Tile(128, 4),
}


@triton.jit
def _segment_sums_kernel(e_ptr, lab_ptr, sums_ptr, counts_ptr, n, S, D, s_d, s_p,
                         D_PAD: tl.constexpr, S_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                         DOT: tl.constexpr):
    """e [B, D, n] (image b at b * D * n, then strides s_d, s_p), labels [B, n] int64
    -> sums [B, S, D] and counts [B, S] (zero-initialised, added to atomically)."""
    ACC: tl.constexpr = sums_ptr.dtype.element_ty
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D_PAD)
    in_map = pix < n
    lab = tl.load(lab_ptr + b * n + pix, mask=in_map, other=-1)
    e = load_pixels(e_ptr + b * D * n, pix, n, D, s_d, s_p, D_PAD, ACC)
    for s0 in range(0, S, S_BLOCK):
        seg = s0 + tl.arange(0, S_BLOCK)
        onehot = (lab[:, None] == seg[None, :]).to(ACC)                     # [BLOCK, S_BLOCK]
        counts = tl.sum(onehot, axis=0)
        sums = tl.dot(tl.trans(onehot), e, input_precision=DOT)         # [S_BLOCK, D_PAD]
        present = counts > 0                                                # implies seg < S
        tl.atomic_add(sums_ptr + (b * S + seg[:, None]) * D + d[None, :], sums,
                      mask=present[:, None] & (d < D)[None, :], sem="relaxed")
        tl.atomic_add(counts_ptr + b * S + seg, counts, mask=present, sem="relaxed")


@triton.jit
def _segment_sums_bwd_kernel(gs_ptr, lab_ptr, ge_ptr, n, S, D, s_d, s_p,
                             D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """gs [B, S, D] dL/dsums, labels [B, n] -> ge [B, D, n] dL/de in ge's dtype, laid out as
    the forward's e."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D_PAD)
    in_map = pix < n
    lab = tl.load(lab_ptr + b * n + pix, mask=in_map, other=-1)
    keep = (lab >= 0) & (lab < S)
    cols = (d < D)[None, :]
    g = tl.load(gs_ptr + (b * S + lab[:, None]) * D + d[None, :], mask=keep[:, None] & cols,
                other=0)
    tl.store(ge_ptr + b * D * n + d[None, :] * s_d + pix[:, None] * s_p,
             g.to(ge_ptr.dtype.element_ty), mask=in_map[:, None] & cols)


class _SegmentSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, labels, num_segments, block):
        b, d = emb.shape[:2]
        n = emb[0, 0].numel()
        acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        lab = labels.reshape(b, n).contiguous()
        sums = torch.zeros(b, num_segments, d, dtype=acc, device=emb.device)
        counts = torch.zeros(b, num_segments, dtype=acc, device=emb.device)
        s_block = min(64, pad16(num_segments))
        tile = tile_for(SEGMENT_SUMS_TILES, s_block, emb.dtype)
        bs = pixel_block(n, emb.device, tile.block, block)
        e, s_d, s_p = map_strides(emb)
        _segment_sums_kernel[(triton.cdiv(n, bs), b)](
            e, lab, sums, counts, n, num_segments, d, s_d, s_p, D_PAD=pad16(d), S_BLOCK=s_block,
            BLOCK=bs, DOT=dot_precision(acc), **tile.options())
        ctx.save_for_backward(lab)
        ctx.like, ctx.strides, ctx.block = torch.empty_like(e, device="meta"), (s_d, s_p), block
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums, _grad_counts):
        (lab,) = ctx.saved_tensors
        like = ctx.like
        b, d = like.shape[:2]
        n, s = lab.shape[1], grad_sums.shape[1]
        grad = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=lab.device)
        tile = tile_for(SEGMENT_SUMS_BWD_TILES, pad16(d), like.dtype)
        bs = pixel_block(n, lab.device, tile.block, ctx.block)
        _segment_sums_bwd_kernel[(triton.cdiv(n, bs), b)](
            grad_sums.contiguous(), lab, grad, n, s, d, *ctx.strides, D_PAD=pad16(d), BLOCK=bs,
            **tile.options())
        return grad, None, None, None


def segment_sums(emb: torch.Tensor, labels: torch.Tensor, num_segments: int, *,
                 block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin's contract (``kernels.segment_sums.segment_sums``): emb [B, D, H, W] (float16,
    bfloat16, float32 or float64), labels [B, H, W] int64 in [-1, S) (-1 = ignore)
    -> sums [B, S, D] (differentiable w.r.t. emb), counts [B, S], both float32 (float64 for
    float64 emb). ``block`` overrides the pixels per program (a power of two >= 16)."""
    return _SegmentSums.apply(emb, labels, int(num_segments), block)
