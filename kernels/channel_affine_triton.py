"""relu(x * scale + shift + residual) (``kernels.channel_affine``, the twin) in one pass over the
map, in its own dtype and layout.

A map x [N, C, H, W] is read as rows of pixels (``triton_blocks.channel_tile``), element
(n, c, p) at ``n C HW + c sC + p sP``: (sC, sP) = (1, C) channels-last, (HW, 1) contiguous. Each
program takes a [BLOCK_P pixels, C_PAD channels] tile of one image, loads the channels' scale and
shift once, and computes in float32 (float64 for float64 x), rounding once into x's dtype.

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

ELEMENTS = 4096          # elements of a [BLOCK_P, C_PAD] tile on a GPU


@triton.jit
def _forward_kernel(x_ptr, s_ptr, b_ptr, r_ptr, rs_ptr, rb_ptr, y_ptr, HW, C, sN, sC, sP,
                    RES: tl.constexpr, RELU: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                    ACC: tl.constexpr):
    """x, r [N, C, HW] (the same strides), scale, shift [C] (contiguous) -> y [N, C, HW]."""
    n = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_PAD)
    cm = c < C
    offs, m = channel_tile(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), HW, c, cm, n, sN, sC, sP)
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
        z = tl.where(z < 0, 0, z)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward_kernel(dy_ptr, y_ptr, s_ptr, rs_ptr, dx_ptr, dr_ptr, HW, C, sN, sC, sP,
                     RES: tl.constexpr, RELU: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                     ACC: tl.constexpr):
    """dy, y [N, C, HW] -> dx and, with a residual, dr [N, C, HW] (the same strides)."""
    n = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_PAD)
    cm = c < C
    offs, m = channel_tile(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), HW, c, cm, n, sN, sC, sP)
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
    """x [N, C, H, W] -> (grid, the kernels' sizes and strides, constexprs and options)."""
    n, c, h, w = x.shape
    c_pad, block, s_c, s_p = channel_launch(x, ELEMENTS, block)
    options = {"C_PAD": c_pad, "BLOCK_P": block, "ACC": tl.float64 if x.dtype == torch.float64 else tl.float32}
    if x.is_cuda:
        options["num_warps"] = 8
    return (triton.cdiv(h * w, block), n), (h * w, c, c * h * w, s_c, s_p), options


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
