"""GroupNorm followed by an optional ReLU, in the activation's own dtype and memory layout.

The proposal head's towers and the embedding branch apply GroupNorm + ReLU after each 3x3 conv
(40 times per forward of the paper's head on P3-P7, 7 in the branch). On CUDA, PyTorch's
``group_norm`` runs NCHW only and autocast runs it in float32, so under bfloat16 autocast with
channels-last activations each call costs a float32 copy, a transposing copy to NCHW, the norm
(three kernels), a float32 ReLU and, at the next conv, a cast back and a copy back to NHWC:
eight kernels and about 44 bytes moved per element. The Triton kernels
(``kernels.group_norm_triton``) read the bfloat16 NHWC map twice and write it once: three
kernels with the zeroed statistics, 6 bytes per element.

This module is their twin: the statistics and the affine map in float32 (float64 for float64
input), then the ReLU, returned in the input's dtype and layout. Differentiable w.r.t. ``x``,
``weight`` and ``bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5, relu: bool = True) -> torch.Tensor:
    """x [N, C, H, W] (any float dtype, contiguous or channels-last), ``num_groups`` dividing C,
    weight and bias [C] -> [N, C, H, W] in x's dtype and memory format:
    ``relu(group_norm(x, num_groups, weight, bias, eps))`` computed in float32 (float64 for
    float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.group_norm(x.to(acc), num_groups, weight.to(acc), bias.to(acc), eps)
    if relu:
        y = y.relu_()
    return y.to(x.dtype).contiguous(memory_format=layout(x))


def layout(x: torch.Tensor) -> torch.memory_format:
    """channels-last for a channels-last [N, C, H, W] map that is not also contiguous, else
    contiguous (CUDA's ``group_norm`` returns contiguous maps whatever its input)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
