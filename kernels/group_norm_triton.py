"""GroupNorm + ReLU (``kernels.group_norm``, the twin) in the map's own dtype and layout.

A map x [N, C, H, W] is read as rows of pixels, element (n, c, p) at ``n C HW + c sC + p sP``:
(sC, sP) = (1, C) for channels-last maps, (HW, 1) for contiguous ones. Every program loads
[BLOCK_P pixels, C_PAD channels] tiles of one image, so channels-last rows are read whole.

Forward, two kernels:
  statistics, one program per (pixel chunk, image): sums of x - k and (x - k)^2 per channel over
      its chunk in float32 (float64 for float64 x), added atomically into [N, 2, G] per group.
      k is the group's first channel at pixel 0, a shift that keeps the variance
      E[(x-k)^2] - E[x-k]^2 from cancelling when the mean is large against the spread;
  apply, one program per (pixel block, image): mean and 1/std of each channel's group from those
      sums, y = relu((x - mean) / std * weight + bias), stored in y's dtype.
Backward, two kernels of the same shapes (dz = dy where y > 0 with the ReLU, x^ the normalised x):
  sums: per channel sum(dz) and sum(dz x^) (atomically into [2, C]: the bias and weight
      gradients) and per group sum(weight dz) and sum(weight dz x^) (into [N, 2, G]);
  dx = (weight dz - mean_g(weight dz) - x^ mean_g(weight dz x^)) / std.
Atomics make the summation order, hence the last bits, vary from run to run. A NaN stays NaN
through the ReLU and passes its gradient (PyTorch's rules), so a diverging map reaches the loss.

Cost per element of a bfloat16 map: forward reads it twice and writes it once (6 bytes);
backward reads x, y and dy twice and writes dx (14 bytes). C <= 1024.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.group_norm import layout
from kernels.triton_blocks import channel_launch, channel_tile, persistent_programs

ELEMENTS = 4096          # elements of a [BLOCK_P, C_PAD] tile on a GPU
MAX_CHANNELS = 1024


@triton.jit
def _channels(x_ptr, st_ptr, w_ptr, b_ptr, n, C, G, CG, sN, sC, count, eps, C_PAD: tl.constexpr,
              ACC: tl.constexpr):
    """Per channel of image n -> (c, in range, group, shift k, mean, 1/std, weight, bias)."""
    c = tl.arange(0, C_PAD)
    cm = c < C
    grp = c // CG
    k = tl.load(x_ptr + n * sN + grp * CG * sC, mask=cm, other=0).to(ACC)
    s1 = tl.load(st_ptr + n * 2 * G + grp, mask=cm, other=0)
    s2 = tl.load(st_ptr + (n * 2 + 1) * G + grp, mask=cm, other=0)
    d = s1 / count
    var = tl.maximum(s2 / count - d * d, 0)
    rstd = 1 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c, mask=cm, other=0).to(ACC)
    b = tl.load(b_ptr + c, mask=cm, other=0).to(ACC)
    return c, cm, grp, k, k + d, rstd, w, b


@triton.jit
def _dz_xhat(x_ptr, y_ptr, dy_ptr, offs, m, mean, rstd, RELU: tl.constexpr, ACC: tl.constexpr):
    """The gradient at the norm's output (dy, 0 where the ReLU cut) and the normalised x."""
    dz = tl.load(dy_ptr + offs, mask=m, other=0).to(ACC)
    if RELU:
        dz = tl.where(tl.load(y_ptr + offs, mask=m, other=0) <= 0, 0, dz)     # threshold_backward's rule
    xhat = (tl.load(x_ptr + offs, mask=m, other=0).to(ACC) - mean[None, :]) * rstd[None, :]
    return dz, xhat


@triton.jit
def _stats_kernel(x_ptr, st_ptr, HW, C, G, CG, sN, sC, sP, chunk, C_PAD: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """x [N, C, HW] -> st [N, 2, G] (zeroed) += per group sum(x - k), sum((x - k)^2)."""
    ACC: tl.constexpr = st_ptr.dtype.element_ty
    n = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_PAD)
    cm = c < C
    grp = c // CG
    k = tl.load(x_ptr + n * sN + grp * CG * sC, mask=cm, other=0).to(ACC)
    acc1 = tl.zeros([BLOCK_P, C_PAD], ACC)
    acc2 = tl.zeros([BLOCK_P, C_PAD], ACC)
    p0 = tl.program_id(0) * chunk
    p_end = tl.minimum(p0 + chunk, HW)
    for start in range(p0, p_end, BLOCK_P):
        offs, m = channel_tile(start + tl.arange(0, BLOCK_P), p_end, c, cm, n, sN, sC, sP)
        v = tl.load(x_ptr + offs, mask=m, other=0).to(ACC)
        v = tl.where(m, v - k[None, :], 0)
        acc1 += v
        acc2 += v * v
    tl.atomic_add(st_ptr + n * 2 * G + grp, tl.sum(acc1, axis=0), mask=cm, sem="relaxed")
    tl.atomic_add(st_ptr + (n * 2 + 1) * G + grp, tl.sum(acc2, axis=0), mask=cm, sem="relaxed")


@triton.jit
def _apply_kernel(x_ptr, y_ptr, st_ptr, w_ptr, b_ptr, HW, C, G, CG, sN, sC, sP, count, eps,
                  RELU: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """x [N, C, HW], st [N, 2, G] -> y [N, C, HW] (x's strides) = relu(normalised x * w + b)."""
    ACC: tl.constexpr = st_ptr.dtype.element_ty
    n = tl.program_id(1).to(tl.int64)
    c, cm, grp, k, mean, rstd, w, b = _channels(x_ptr, st_ptr, w_ptr, b_ptr, n, C, G, CG, sN,
                                                sC, count, eps, C_PAD, ACC)
    scale = rstd * w
    shift = b - mean * scale
    offs, m = channel_tile(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), HW, c, cm, n, sN, sC, sP)
    y = tl.load(x_ptr + offs, mask=m, other=0).to(ACC) * scale[None, :] + shift[None, :]
    if RELU:
        y = tl.maximum(y, 0, propagate_nan=tl.PropagateNan.ALL)       # NaN stays NaN, as PyTorch's ReLU
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_sums_kernel(x_ptr, y_ptr, dy_ptr, st_ptr, w_ptr, b_ptr, gs_ptr, cs_ptr, HW, C, G, CG,
                     sN, sC, sP, count, eps, chunk, RELU: tl.constexpr, C_PAD: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """-> cs [2, C] += sum(dz), sum(dz x^) per channel; gs [N, 2, G] += sum(w dz), sum(w dz x^)
    per group (both zeroed)."""
    ACC: tl.constexpr = st_ptr.dtype.element_ty
    n = tl.program_id(1).to(tl.int64)
    c, cm, grp, k, mean, rstd, w, b = _channels(x_ptr, st_ptr, w_ptr, b_ptr, n, C, G, CG, sN,
                                                sC, count, eps, C_PAD, ACC)
    acc1 = tl.zeros([BLOCK_P, C_PAD], ACC)
    acc2 = tl.zeros([BLOCK_P, C_PAD], ACC)
    p0 = tl.program_id(0) * chunk
    p_end = tl.minimum(p0 + chunk, HW)
    for start in range(p0, p_end, BLOCK_P):
        offs, m = channel_tile(start + tl.arange(0, BLOCK_P), p_end, c, cm, n, sN, sC, sP)
        dz, xhat = _dz_xhat(x_ptr, y_ptr, dy_ptr, offs, m, mean, rstd, RELU, ACC)
        acc1 += dz
        acc2 += dz * xhat
    a = tl.sum(acc1, axis=0)
    bb = tl.sum(acc2, axis=0)
    tl.atomic_add(cs_ptr + c, a, mask=cm, sem="relaxed")
    tl.atomic_add(cs_ptr + C + c, bb, mask=cm, sem="relaxed")
    tl.atomic_add(gs_ptr + n * 2 * G + grp, w * a, mask=cm, sem="relaxed")
    tl.atomic_add(gs_ptr + (n * 2 + 1) * G + grp, w * bb, mask=cm, sem="relaxed")


@triton.jit
def _bwd_dx_kernel(x_ptr, y_ptr, dy_ptr, dx_ptr, st_ptr, w_ptr, b_ptr, gs_ptr, HW, C, G, CG,
                   sN, sC, sP, count, eps, RELU: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """-> dx [N, C, HW] (x's strides) = (w dz - mean_g(w dz) - x^ mean_g(w dz x^)) / std."""
    ACC: tl.constexpr = st_ptr.dtype.element_ty
    n = tl.program_id(1).to(tl.int64)
    c, cm, grp, k, mean, rstd, w, b = _channels(x_ptr, st_ptr, w_ptr, b_ptr, n, C, G, CG, sN,
                                                sC, count, eps, C_PAD, ACC)
    ga = tl.load(gs_ptr + n * 2 * G + grp, mask=cm, other=0) / count
    gb = tl.load(gs_ptr + (n * 2 + 1) * G + grp, mask=cm, other=0) / count
    offs, m = channel_tile(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), HW, c, cm, n, sN, sC, sP)
    dz, xhat = _dz_xhat(x_ptr, y_ptr, dy_ptr, offs, m, mean, rstd, RELU, ACC)
    dx = (w[None, :] * dz - ga[None, :] - xhat * gb[None, :]) * rstd[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


class _Launch:
    """The grid of one map: strides, tile and chunking (see the module docstring)."""

    def __init__(self, x: torch.Tensor, num_groups: int, block: int | None):
        n, c, h, w = x.shape
        self.hw = h * w
        self.c_pad, self.block, self.s_c, self.s_p = channel_launch(x, ELEMENTS, block)
        blocks = triton.cdiv(self.hw, self.block)
        split = triton.cdiv(persistent_programs(blocks * n, x.device), max(n, 1))   # programs per image
        self.chunk = max(1, triton.cdiv(blocks, split)) * self.block
        self.reduce_grid = (triton.cdiv(self.hw, self.chunk), n)
        self.apply_grid = (blocks, n)
        self.dims = (self.hw, c, num_groups, c // num_groups, c * self.hw, self.s_c, self.s_p)
        self.count = float(c // num_groups * self.hw)      # elements per group
        self.options = {"num_warps": 8} if x.is_cuda else {}


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, relu, block):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.contiguous(memory_format=layout(x))
        launch = _Launch(x, num_groups, block)
        stats = torch.zeros(x.shape[0], 2, num_groups, dtype=acc, device=x.device)
        y = torch.empty_like(x)
        if x.numel():
            _stats_kernel[launch.reduce_grid](x, stats, *launch.dims, launch.chunk, C_PAD=launch.c_pad,
                                              BLOCK_P=launch.block, **launch.options)
            _apply_kernel[launch.apply_grid](x, y, stats, weight, bias, *launch.dims, launch.count, eps, RELU=relu,
                                             C_PAD=launch.c_pad, BLOCK_P=launch.block, **launch.options)
        ctx.save_for_backward(x, y if relu else None, stats, weight, bias)
        ctx.launch, ctx.eps, ctx.relu = launch, eps, relu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, y, stats, weight, bias = ctx.saved_tensors
        launch = ctx.launch
        dy = dy.contiguous(memory_format=layout(x))
        n, c = x.shape[:2]
        g = stats.shape[2]
        sums = torch.zeros(2 * c + n * 2 * g, dtype=stats.dtype, device=x.device)
        channel_sums, group_sums = sums[:2 * c], sums[2 * c:]
        dx = torch.empty_like(x)
        y = x if y is None else y
        if x.numel():
            _bwd_sums_kernel[launch.reduce_grid](
                x, y, dy, stats, weight, bias, group_sums, channel_sums, *launch.dims, launch.count, ctx.eps,
                launch.chunk, RELU=ctx.relu, C_PAD=launch.c_pad, BLOCK_P=launch.block, **launch.options)
            _bwd_dx_kernel[launch.apply_grid](
                x, y, dy, dx, stats, weight, bias, group_sums, *launch.dims, launch.count, ctx.eps, RELU=ctx.relu,
                C_PAD=launch.c_pad, BLOCK_P=launch.block, **launch.options)
        d_bias, d_weight = channel_sums.view(2, c)
        return dx, None, d_weight.to(weight.dtype), d_bias.to(bias.dtype), None, None, None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5, relu: bool = True, *, block: int | None = None) -> torch.Tensor:
    """The twin's contract (``kernels.group_norm.group_norm``): x [N, C, H, W] (float16,
    bfloat16, float32 or float64; contiguous or channels-last, else copied to contiguous),
    C <= 1024, weight and bias [C] -> relu(group_norm(x)) in x's dtype and layout,
    differentiable w.r.t. x, weight and bias. ``block`` overrides the pixels per tile (a power
    of two)."""
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"the Triton GroupNorm takes at most {MAX_CHANNELS} channels, got {x.shape[1]}")
    return _GroupNorm.apply(x, int(num_groups), weight.contiguous(), bias.contiguous(), float(eps),
                            bool(relu), block)
