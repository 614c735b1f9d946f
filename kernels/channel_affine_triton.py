"""relu(x * scale + shift + residual) (``kernels.channel_affine``, the twin) in one pass over the
map, in its own dtype and layout.

A map x [N, C, H, W] is read as rows of pixels (``triton_blocks.channel_tile``), element
(n, c, p) at ``n C HW + c sC + p sP``: (sC, sP) = (1, C) channels-last, (HW, 1) contiguous. Each
program takes a [BLOCK_P pixels, BLOCK_C channels] tile of one image: every channel of a
channels-last map (whole pixel rows), a run of pixels of a few channels of a contiguous one, so
that either reads contiguous memory. It loads its channels' scale and shift once and computes in
float32 (float64 for float64 x), rounding once into x's dtype.

Forward, one kernel: y = relu(x * scale + shift + r) with r the residual as it is (RES = 1) or
    residual * residual_scale + residual_shift (RES = 2), or none (RES = 0).
Backward, one kernel: dz = dy where y > 0 (with the ReLU; dy without), dx = dz * scale and, with
    a residual, dr = dz (* residual_scale).

The ReLU keeps NaN, as PyTorch's does. Cost per element of a bfloat16 map: 4 bytes forward
(6 with a residual, projected or not), 6 bytes backward (8 with a residual).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.group_norm import layout
from kernels.triton_blocks import channel_launch, channel_tile

ELEMENTS = 4096          # elements of a [BLOCK_P, BLOCK_C] tile on a GPU


@triton.jit
def _tile(HW, C, C_BLOCKS, sN, sC, sP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's tile: channels c [BLOCK_C], their mask, offsets and mask [BLOCK_P, BLOCK_C]."""
    n = (tl.program_id(1) // C_BLOCKS).to(tl.int64)
    c = (tl.program_id(1) % C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    offs, m = channel_tile(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), HW, c, cm, n, sN, sC, sP)
    return c, cm, offs, m


@triton.jit
def _forward_kernel(x_ptr, s_ptr, b_ptr, r_ptr, rs_ptr, rb_ptr, y_ptr, HW, C, C_BLOCKS, sN, sC, sP,
                    RES: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                    ACC: tl.constexpr):
    """x, r [N, C, HW] (the same strides), scale, shift [C] (contiguous) -> y [N, C, HW]."""
    c, cm, offs, m = _tile(HW, C, C_BLOCKS, sN, sC, sP, BLOCK_C, BLOCK_P)
    scale = tl.load(s_ptr + c, mask=cm, other=0).to(ACC)
    shift = tl.load(b_ptr + c, mask=cm, other=0).to(ACC)
    z = tl.load(x_ptr + offs, mask=m, other=0).to(ACC) * scale[None, :] + shift[None, :]
    if RES > 0:
        r = tl.load(r_ptr + offs, mask=m, other=0).to(ACC)
        if RES == 2:
            r = (r * tl.load(rs_ptr + c, mask=cm, other=0).to(ACC)[None, :]
                 + tl.load(rb_ptr + c, mask=cm, other=0).to(ACC)[None, :])
        z += r
    if RELU:
        z = tl.maximum(z, 0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward_kernel(dy_ptr, y_ptr, s_ptr, rs_ptr, dx_ptr, dr_ptr, HW, C, C_BLOCKS, sN, sC, sP,
                     RES: tl.constexpr, RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     ACC: tl.constexpr):
    """dy, y [N, C, HW] -> dx and, with a residual, dr [N, C, HW] (the same strides)."""
    c, cm, offs, m = _tile(HW, C, C_BLOCKS, sN, sC, sP, BLOCK_C, BLOCK_P)
    dz = tl.load(dy_ptr + offs, mask=m, other=0).to(ACC)
    if RELU:
        dz = tl.where(tl.load(y_ptr + offs, mask=m, other=0) <= 0, 0, dz)
    dx = dz * tl.load(s_ptr + c, mask=cm, other=0).to(ACC)[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if RES > 0:
        if RES == 2:
            dz = dz * tl.load(rs_ptr + c, mask=cm, other=0).to(ACC)[None, :]
        tl.store(dr_ptr + offs, dz.to(dr_ptr.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, block: int | None) -> tuple[tuple, tuple, dict]:
    """x [N, C, H, W] -> (grid, the kernels' sizes and strides, constexprs and options). A
    contiguous map's tile takes as many channels as fit beside its run of pixels."""
    n, c, h, w = x.shape
    c_pad, block_p, s_c, s_p = channel_launch(x, ELEMENTS, block)
    block_c = c_pad
    if s_p == 1:
        elements = ELEMENTS if x.is_cuda else 1024
        block_p = block or min(elements, triton.next_power_of_2(max(h * w, 1)))
        block_c = min(c_pad, max(1, elements // block_p))
    c_blocks = triton.cdiv(c, block_c)
    options = {"BLOCK_C": block_c, "BLOCK_P": block_p,
               "ACC": tl.float64 if x.dtype == torch.float64 else tl.float32}
    if x.is_cuda:
        options["num_warps"] = 8
    return (triton.cdiv(h * w, block_p), n * c_blocks), (h * w, c, c_blocks, c * h * w, s_c, s_p), options


class _ChannelAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, r, r_scale, r_shift, relu, block):
        fmt = layout(x)
        x = x.contiguous(memory_format=fmt)
        res = 0 if r is None else 1 if r_scale is None else 2
        if r is not None:
            r = r.contiguous(memory_format=fmt)
        y = torch.empty_like(x)
        grid, dims, options = _launch(x, block)
        if x.numel():
            _forward_kernel[grid](x, scale, shift, x if r is None else r, scale if r_scale is None else r_scale,
                                  shift if r_shift is None else r_shift, y, *dims, RES=res, RELU=relu, **options)
        ctx.save_for_backward(y if relu else None, scale, r_scale)
        ctx.res, ctx.relu, ctx.block, ctx.fmt = res, relu, block, fmt
        ctx.dtypes = x.dtype, None if r is None else r.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        y, scale, r_scale = ctx.saved_tensors
        dy = dy.contiguous(memory_format=ctx.fmt)
        x_dtype, r_dtype = ctx.dtypes
        dx = torch.empty_like(dy, dtype=x_dtype)
        dr = None if r_dtype is None else torch.empty_like(dy, dtype=r_dtype)
        grid, dims, options = _launch(dy, ctx.block)
        if dy.numel():
            _backward_kernel[grid](dy, dy if y is None else y, scale, scale if r_scale is None else r_scale, dx,
                                   dx if dr is None else dr, *dims, RES=ctx.res, RELU=ctx.relu, **options)
        return dx, None, None, dr, None, None, None, None


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None,
                   residual_shift: torch.Tensor | None = None, relu: bool = False, *,
                   block: int | None = None) -> torch.Tensor:
    """The twin's contract (``kernels.channel_affine.channel_affine``): x [N, C, H, W]
    (contiguous or channels-last, else copied to contiguous; a residual copied to x's layout
    where it differs), scale and shift [C, 1, 1] in x's dtype -> y in x's dtype and layout,
    differentiable w.r.t. x and the residual. ``block`` overrides the pixels per tile (a power
    of two)."""
    return _ChannelAffine.apply(x, scale.contiguous(), shift.contiguous(), residual,
                                None if residual_scale is None else residual_scale.contiguous(),
                                None if residual_shift is None else residual_shift.contiguous(), bool(relu), block)
