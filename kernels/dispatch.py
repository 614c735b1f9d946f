"""The entry points the model calls: each fused operation, checked and routed to a backend.

A backend is one entry of ``BACKENDS``: its four functions and ``accepts(tensor)``, whether
"auto" may choose it for inputs like that tensor (device, dtype). ``backend="auto"`` takes the
first entry, in table order, that accepts the operation's main input; the PyTorch twins accept
everything and stay last. Adding a backend is one entry placed before "torch".

"triton" (fused kernels, ``kernels.*_triton``) is listed when triton imports; "auto" gives it
CUDA tensors. Forced with ``backend="triton"``, it also runs CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1 set before triton is first imported), which is how the tests
run it. Without triton the table holds the twins only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import assign as _assign
from kernels import ciae_loss as _ciae_loss
from kernels import segment_sums as _segment_sums


@dataclass(frozen=True)
class Backend:
    """One implementation of every operation, each with its twin's signature (without
    ``backend``), and whether "auto" may route a given main input to it."""

    segment_sums: Callable
    embedding_loss: Callable
    assign: Callable
    assign_upsampled: Callable
    accepts: Callable[[torch.Tensor], bool]


BACKENDS: dict[str, Backend] = {}

try:
    import triton  # noqa: F401  (only whether it imports)
except ImportError:     # no triton: the twins only
    triton = None

if triton is not None:
    from kernels import assign_triton as _assign_triton
    from kernels import ciae_loss_triton as _ciae_loss_triton
    from kernels import segment_sums_triton as _segment_sums_triton

    BACKENDS["triton"] = Backend(segment_sums=_segment_sums_triton.segment_sums,
                                 embedding_loss=_ciae_loss_triton.embedding_loss,
                                 assign=_assign_triton.assign,
                                 assign_upsampled=_assign_triton.assign_upsampled,
                                 accepts=lambda tensor: tensor.is_cuda)

BACKENDS["torch"] = Backend(segment_sums=_segment_sums.segment_sums,
                            embedding_loss=_ciae_loss.embedding_loss,
                            assign=_assign.assign,
                            assign_upsampled=_assign.assign_upsampled,
                            accepts=lambda tensor: True)


def _pick(backend: str, tensor: torch.Tensor) -> Backend:
    if backend == "auto":
        return next(b for b in BACKENDS.values() if b.accepts(tensor))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _check_queries(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor) -> None:
    _check(emb.dim() == 3, f"emb must be [D, H, W], got {tuple(emb.shape)}")
    _check(queries.dim() == 2 and queries.shape[1] == emb.shape[0] and queries.shape[0] >= 1,
           f"queries must be [Q >= 1, D={emb.shape[0]}], got {tuple(queries.shape)}")
    _check(boxes.shape == (queries.shape[0], 4),
           f"boxes must be [Q={queries.shape[0]}, 4], got {tuple(boxes.shape)}")


def segment_sums(emb: torch.Tensor, labels: torch.Tensor, num_segments: int, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """emb [B, D, H, W], labels [B, H, W] int64 in [-1, S) (-1 = ignore), S = num_segments
    -> sums [B, S, D] float32, counts [B, S] float32. See ``kernels.segment_sums``."""
    _check(emb.dim() == 4, f"emb must be [B, D, H, W], got {tuple(emb.shape)}")
    _check(labels.shape == (emb.shape[0], *emb.shape[2:]),
           f"labels must be [B, H, W] = {(emb.shape[0], *emb.shape[2:])}, got {tuple(labels.shape)}")
    return _pick(backend, emb).segment_sums(emb, labels, num_segments)


def embedding_loss(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
                   target: torch.Tensor, weight: torch.Tensor, margin: float, top_k: int,
                   chunk: int | None = 65536, *, backend: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """emb [D, H, W] pre-normalisation, queries [Q, D] unit norm, boxes [Q, 4] xyxy pixel boxes
    (exclusive end), target [H, W] int64 (-1 = ignore), weight [H, W] -> loss_sum [],
    num_valid [] float32. See ``kernels.ciae_loss``."""
    _check_queries(emb, queries, boxes)
    _check(target.shape == emb.shape[1:] and weight.shape == emb.shape[1:],
           f"target and weight must be [H, W] = {tuple(emb.shape[1:])}, "
           f"got {tuple(target.shape)} and {tuple(weight.shape)}")
    _check(top_k >= 1 and margin >= 0, f"need top_k >= 1 and margin >= 0, got {top_k}, {margin}")
    return _pick(backend, emb).embedding_loss(emb, queries, boxes, target, weight, margin, top_k,
                                              chunk)


def assign(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           chunk: int | None = 65536, *, backend: str = "auto"
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb [D, H, W], queries [Q, D] unit norm, boxes [Q, 4] -> labels [H, W] int64,
    best and second-best similarity [H, W] float32. See ``kernels.assign``."""
    _check_queries(emb, queries, boxes)
    return _pick(backend, emb).assign(emb, queries, boxes, chunk)


def assign_upsampled(emb_lowres: torch.Tensor, out_size: tuple[int, int], queries: torch.Tensor,
                     boxes: torch.Tensor, chunk: int | None = 65536, *, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb_lowres [D, h, w], out_size (H, W), queries [Q, D] unit norm, boxes [Q, 4] in output
    pixels -> labels [H, W] int64, best and second-best similarity [H, W] float32. See
    ``kernels.assign``."""
    _check_queries(emb_lowres, queries, boxes)
    return _pick(backend, emb_lowres).assign_upsampled(emb_lowres, tuple(out_size), queries, boxes,
                                                       chunk)
