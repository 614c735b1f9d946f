"""A per-channel affine map with an optional residual and ReLU, in one operation: a frozen
BatchNorm and what follows it in a ResNet, relu(x * scale + shift [+ residual]).

ResNet's frozen BatchNorms (the paper's backbone: ImageNet weights, ``frozen_bn``) follow every
convolution: after the first two of a bottleneck comes a ReLU, after the third the shortcut (the
block's input, or its projection, a 1x1 conv and another frozen BatchNorm) and a ReLU. In eager
PyTorch each of these is a pass over the map: a bottleneck's end (``addcmul``, the shortcut's
``addcmul``, ``add_``, ``relu_``) moves 18 bytes per element of a bfloat16 map, where one kernel
that reads x and the shortcut and writes the result moves 6; a norm + ReLU moves 8, one kernel 4.
The Triton kernels (``kernels.channel_affine_triton``) are that one kernel, forward and backward.

This module is their twin, the operations the model ran before, in the same order and dtype:
``addcmul(shift, x, scale)``, the residual (``addcmul`` of its own scale and shift when given)
added in place, then the ReLU in place. Differentiable w.r.t. ``x`` and ``residual``; ``scale``
and ``shift`` are constants (a frozen BatchNorm's buffers).
"""

from __future__ import annotations

import torch


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None,
                   residual_shift: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """x [N, C, H, W], scale and shift [C, 1, 1] in x's dtype; residual [N, C, H, W] or None, with
    residual_scale and residual_shift [C, 1, 1] in its dtype, or both None -> [N, C, H, W] in x's dtype
    and layout: relu(x * scale + shift + residual * residual_scale + residual_shift), the
    residual's terms as given, the ReLU with ``relu``."""
    y = torch.addcmul(shift, x, scale)
    if residual is not None:
        if residual_scale is not None:
            residual = torch.addcmul(residual_shift, residual, residual_scale)
        y += residual
    return y.relu_() if relu else y
