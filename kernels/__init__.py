"""Fused operations of the CIAE method, each a PyTorch twin (the exact reference) and, where triton
imports, a Triton kernel (``*_triton``), behind a dispatcher. Import the entry points from here;
``kernels.dispatch.BACKENDS`` lists the backends."""

from kernels.dispatch import (BACKENDS, assign, assign_upsampled, channel_affine, embedding_loss, group_norm,
                              segment_sums)

__all__ = ["BACKENDS", "assign", "assign_upsampled", "channel_affine", "embedding_loss", "group_norm",
           "segment_sums"]
