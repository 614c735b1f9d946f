"""Pieces shared by the Triton kernels: the per-block cosine similarity with the box filter (device
side) and the padding, launch sizes and autotune-table lookup (host side).

A block is BLOCK consecutive pixels of the row-major [H * W] map; its embeddings are a
[BLOCK, D_PAD] register tile loaded from the map in its own layout (``map_strides``): planes
[D, H * W] (contiguous; coalesced along pixels) or pixel-major [H * W, D] (channels-last, as
channels-last training makes the full-resolution embeddings; coalesced along D), with no copy.
Queries are passed transposed and zero-padded, [D_PAD, Q_PAD] in the accumulation dtype, so that
s = p Q^T is one ``tl.dot`` (see ``dot_precision``).
D_PAD and Q_PAD are powers of two >= 16 (``tl.arange`` and ``tl.dot`` need them); the padded
columns are masked by the callers.

Each launcher reads its GPU launch configuration (``Tile``: pixels per program, warps, pipeline
stages) from an autotune table beside its kernel, keyed by shape class (the padded size that
sets the register tiles) and dtype class (``tile_for``). The tables hold the tiles timed fastest
on an H200 by benchmarks/gpu/suite.py's ``tiles`` section for the classes it measures, and values
chosen from sm_90 register/spill figures (benchmarks/kernels/resources.py) for the others. On
CPU tensors (the interpreter) they do not apply: see ``pixel_block``.

Pixel offsets are int32: a [D, H, W] map (or one image of a batch) must hold fewer than 2**31
elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.ciae_loss import EPS

EPS_C = tl.constexpr(EPS)


@triton.jit
def load_pixels(e_ptr, pix, n, D, s_d, s_p, D_PAD: tl.constexpr, ACC: tl.constexpr):
    """The pixels ``pix`` [BLOCK] of a map of n pixels and D dims whose element (d, i) is at
    d * s_d + i * s_p (``map_strides``) -> [BLOCK, D_PAD] in ACC, 0 past n and D."""
    d = tl.arange(0, D_PAD)
    mask = (pix < n)[:, None] & (d < D)[None, :]
    return tl.load(e_ptr + d[None, :] * s_d + pix[:, None] * s_p, mask=mask, other=0).to(ACC)


@triton.jit
def load_queries_t(qt_ptr, D_PAD: tl.constexpr, Q_PAD: tl.constexpr):
    """The padded transposed queries, [D_PAD, Q_PAD]."""
    d = tl.arange(0, D_PAD)
    k = tl.arange(0, Q_PAD)
    return tl.load(qt_ptr + d[:, None] * Q_PAD + k[None, :])


@triton.jit
def box_cosine(e, qt, box_ptr, pix, width, Q, Q_PAD: tl.constexpr, DOT: tl.constexpr):
    """e [BLOCK, D_PAD] pre-normalisation embeddings of the flat pixels ``pix`` [BLOCK] of a map
    ``width`` wide, qt [D_PAD, Q_PAD] padded transposed queries, boxes [Q, 4] float32 xyxy,
    DOT the dot's input precision -> p [BLOCK, D_PAD] = e / max(||e||, EPS), norm [BLOCK],
    s [BLOCK, Q_PAD] = p . q_k, 0 outside box k and for k >= Q, inside [BLOCK, Q_PAD] bool."""
    p, norm = normalise(e)
    s = tl.dot(p, qt, input_precision=DOT)
    k = tl.arange(0, Q_PAD)
    real = k < Q
    x0 = tl.load(box_ptr + 4 * k + 0, mask=real, other=0)
    y0 = tl.load(box_ptr + 4 * k + 1, mask=real, other=0)
    x1 = tl.load(box_ptr + 4 * k + 2, mask=real, other=0)
    y1 = tl.load(box_ptr + 4 * k + 3, mask=real, other=0)
    inside = inside_boxes(pix, width, x0, y0, x1, y1) & real[None, :]
    return p, norm, tl.where(inside, s, 0.0), inside


@triton.jit
def normalise(e):
    """e [BLOCK, D_PAD] -> p = e / max(||e||, EPS) by rows, norm [BLOCK]."""
    norm = tl.sqrt(tl.sum(e * e, axis=1))
    return e / tl.maximum(norm, EPS_C)[:, None], norm


@triton.jit
def inside_boxes(pix, width, x0, y0, x1, y1):
    """The flat pixels ``pix`` [BLOCK] of a map ``width`` wide, boxes' corners [K] each ->
    [BLOCK, K] bool: pixel inside box (x0 <= x < x1 and y0 <= y < y1)."""
    y = (pix // width).to(tl.float32)[:, None]
    x = (pix % width).to(tl.float32)[:, None]
    # the twin's test, written as "outside" so that NaN boxes behave the same
    return ~((y < y0[None, :]) | (y >= y1[None, :]) | (x < x0[None, :]) | (x >= x1[None, :]))


@triton.jit
def channel_tile(p, limit, c, cm, n, sN, sC, sP):
    """Pixels p [BLOCK_P] (those below ``limit``) and channels c [C_PAD] (``cm``: those below C)
    of image n of a [N, C, H, W] map with image, channel and pixel strides (sN, sC, sP) ->
    offsets and mask [BLOCK_P, C_PAD]."""
    return n * sN + p[:, None] * sP + c[None, :] * sC, (p < limit)[:, None] & cm[None, :]


# ---- host side ---------------------------------------------------------------------------------

def pad16(n: int) -> int:
    """The tile size for n columns: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def map_strides(emb: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """emb [..., D, H, W] -> (the map, the stride of D, the stride of a pixel), for kernels that
    address element (d, i) of a map of N = H W pixels at d * s_d + i * s_p, and image b of a
    batch at b * D * N: planes (contiguous) as they are, (N, 1); pixel-major (channels-last)
    as they are, (1, D); any other layout copied to planes. A stride of 1 compiles as a
    constant (Triton specialises integer arguments equal to 1), so each layout gets its own
    kernel, coalesced along its contiguous axis."""
    d, h, w = emb.shape[-3:]
    if emb.is_contiguous():
        return emb, h * w, 1
    step = 1                          # pixel-major: D innermost, then W, H and the batch dims
    for dim in (-3, -1, -2, *range(emb.dim() - 4, -1, -1)):
        if emb.shape[dim] != 1 and emb.stride(dim) != step:
            return emb.contiguous(), h * w, 1
        step *= emb.shape[dim]
    return emb, 1, d


def padded_queries_t(queries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """queries [Q, D] -> [pad16(D), pad16(Q)] contiguous, transposed, zero-padded, in ``dtype``."""
    q, d = queries.shape
    qt = queries.new_zeros(pad16(d), pad16(q), dtype=dtype)
    qt[:d, :q] = queries.detach().T
    return qt


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype`` (float32 or float64): "tf32x3" for
    float32 on NVIDIA (three TF32 tensor-core products, about float32 accuracy; the FMA path,
    "ieee", holds whole operand rows per thread and spills registers at these tile sizes),
    "ieee" for float64 and on ROCm, which has no tf32x3. The interpreter ignores it."""
    return "ieee" if dtype == torch.float64 or torch.version.hip is not None else "tf32x3"


@dataclass(frozen=True)
class Tile:
    """A GPU launch configuration: pixels per program (``BLOCK``), warps per program and
    software-pipelining depth (None: Triton's default, 3 on NVIDIA)."""

    block: int
    num_warps: int
    num_stages: int | None = None

    def options(self) -> dict:
        """The launch keywords: num_warps, and num_stages unless it is Triton's default."""
        if self.num_stages is None:
            return {"num_warps": self.num_warps}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def dtype_class(dtype: torch.dtype) -> str:
    """The tile tables' class of an embedding dtype: "bf16" for 2-byte floats (bfloat16,
    float16), "fp32" for float32 and float64."""
    return "bf16" if dtype.itemsize == 2 else "fp32"


def tile_for(table: dict, size: int, dtype: torch.dtype) -> Tile:
    """The entry of an autotune table {(size class, dtype class): Tile} for a padded size (a power
    of two >= 16: Q_PAD, S_BLOCK or D_PAD): its own class, the largest class past the table."""
    classes = sorted({c for c, _ in table})
    return table[next((c for c in classes if c >= size), classes[-1]), dtype_class(dtype)]


def pixel_block(n: int, device: torch.device, gpu_block: int, block: int | None) -> int:
    """Pixels per program: ``block`` if given, else ``gpu_block`` on a GPU; under the interpreter
    (CPU tensors) the whole map up to 1024 pixels, since there each program costs about the same
    whatever its size."""
    if block is not None:
        return block
    return gpu_block if device.type == "cuda" else min(1024, pad16(n))


def channel_launch(x: torch.Tensor, elements: int, block: int | None) -> tuple[int, int, int, int]:
    """x [N, C, H, W], contiguous or channels-last -> (C_PAD, BLOCK_P, sC, sP) of kernels that
    tile it [BLOCK_P pixels, C_PAD channels] (``channel_tile``): sC, sP = (1, C) channels-last,
    (H W, 1) contiguous; BLOCK_P = ``block`` if given, else ``elements`` // C_PAD on a GPU and
    under the interpreter the whole map up to 1024 pixels."""
    c, h, w = x.shape[1:]
    c_pad = triton.next_power_of_2(c)
    if block is None:
        block = max(1, elements // c_pad) if x.is_cuda else min(triton.next_power_of_2(max(h * w, 1)), 1024)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return c_pad, block, 1, c
    return c_pad, block, h * w, 1


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(num_blocks: int, device: torch.device) -> int:
    """Programs of a persistent grid (each loops over blocks pid, pid + P, ...): 2 per SM on a GPU
    (as many as fit at ~255 registers x 128 threads), at most 4 under the interpreter (enough to
    exercise the loop)."""
    if device.type == "cuda":
        return max(1, min(num_blocks, 2 * _multiprocessors(device.index or 0)))
    return max(1, min(num_blocks, 4))
