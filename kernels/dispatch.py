"""The entry points the model calls: each fused operation, checked and routed to a backend.

A backend is one entry of ``BACKENDS``: its functions (the four fused CIAE operations, the
batched greedy NMS, ``nms`` and ``greedy_keep``, GroupNorm + ReLU, and a frozen BatchNorm's affine
map with its residual and ReLU) and ``accepts(tensor)``, whether
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
from kernels import channel_affine as _channel_affine
from kernels import ciae_loss as _ciae_loss
from kernels import group_norm as _group_norm
from kernels import nms as _nms
from kernels import segment_sums as _segment_sums


@dataclass(frozen=True)
class Backend:
    """One implementation of every operation, each with its twin's signature (without
    ``backend``), and whether "auto" may route a given main input to it."""

    segment_sums: Callable
    embedding_loss: Callable
    assign: Callable
    assign_upsampled: Callable
    nms: Callable
    greedy_keep: Callable
    group_norm: Callable
    channel_affine: Callable
    accepts: Callable[[torch.Tensor], bool]


BACKENDS: dict[str, Backend] = {}

try:
    import triton  # noqa: F401  (only whether it imports)
except ImportError:     # no triton: the twins only
    triton = None

if triton is not None:
    from kernels import assign_triton as _assign_triton
    from kernels import channel_affine_triton as _channel_affine_triton
    from kernels import ciae_loss_triton as _ciae_loss_triton
    from kernels import group_norm_triton as _group_norm_triton
    from kernels import nms_triton as _nms_triton
    from kernels import segment_sums_triton as _segment_sums_triton

    BACKENDS["triton"] = Backend(segment_sums=_segment_sums_triton.segment_sums,
                                 embedding_loss=_ciae_loss_triton.embedding_loss,
                                 assign=_assign_triton.assign,
                                 assign_upsampled=_assign_triton.assign_upsampled,
                                 accepts=lambda tensor: tensor.is_cuda,
                                 nms=_nms_triton.nms, greedy_keep=_nms_triton.greedy_keep,
                                 group_norm=_group_norm_triton.group_norm,
                                 channel_affine=_channel_affine_triton.channel_affine)

BACKENDS["torch"] = Backend(segment_sums=_segment_sums.segment_sums,
                            embedding_loss=_ciae_loss.embedding_loss,
                            assign=_assign.assign,
                            assign_upsampled=_assign.assign_upsampled,
                            accepts=lambda tensor: True,
                            nms=_nms.nms, greedy_keep=_nms.greedy_keep,
                            group_norm=_group_norm.group_norm,
                            channel_affine=_channel_affine.channel_affine)


def _pick(backend: str, tensor: torch.Tensor) -> Backend:
    if backend == "auto":
        return next(b for b in BACKENDS.values() if b.accepts(tensor))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[backend]


def _check(ok: bool, what: str | Callable[[], str]) -> None:
    """ValueError(what) unless ok; ``what`` a function where formatting it costs (the norms' entry
    points run once per layer: their messages are made only on failure)."""
    if not ok:
        raise ValueError(what() if callable(what) else what)


def _check_map(x: torch.Tensor) -> None:
    _check(x.dim() == 4 and x.is_floating_point(),
           lambda: f"x must be [N, C, H, W] float, got {tuple(x.shape)} {x.dtype}")


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


def _check_assignment(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
                      valid: torch.Tensor | None) -> None:
    """One image's queries (``_check_queries``) and valid [Q] bool, or a batch's: emb [B, D, H, W],
    queries [B, Q, D], boxes [B, Q, 4], valid [B, Q]."""
    lead = tuple(emb.shape[:-3])
    _check(emb.dim() in (3, 4) and tuple(queries.shape[:-2]) == lead == tuple(boxes.shape[:-2]),
           f"emb, queries and boxes must be one image's ([D, H, W], [Q, D], [Q, 4]) or a batch's "
           f"([B, D, H, W], [B, Q, D], [B, Q, 4]), got {tuple(emb.shape)}, {tuple(queries.shape)}, "
           f"{tuple(boxes.shape)}")
    if lead and lead[0]:
        _check_queries(emb[0], queries[0], boxes[0])
    elif not lead:
        _check_queries(emb, queries, boxes)
    _check(valid is None or (valid.shape == queries.shape[:-1] and valid.dtype == torch.bool),
           f"valid must be {tuple(queries.shape[:-1])} bool, got "
           f"{None if valid is None else (tuple(valid.shape), valid.dtype)}")


def assign(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           chunk: int | None = 65536, valid: torch.Tensor | None = None, *, backend: str = "auto"
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb [D, H, W], queries [Q, D] unit norm, boxes [Q, 4], valid [Q] bool (None: all; an
    invalid query scores -inf) -> labels [H, W] int64, best and second-best similarity [H, W]
    float32; or a batch of them ([B, D, H, W], [B, Q, D], [B, Q, 4], [B, Q] -> [B, H, W]).
    See ``kernels.assign``."""
    _check_assignment(emb, queries, boxes, valid)
    return _pick(backend, emb).assign(emb, queries, boxes, chunk, valid)


def assign_upsampled(emb_lowres: torch.Tensor, out_size: tuple[int, int], queries: torch.Tensor,
                     boxes: torch.Tensor, chunk: int | None = 65536,
                     valid: torch.Tensor | None = None, *, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb_lowres [D, h, w], out_size (H, W), queries [Q, D] unit norm, boxes [Q, 4] in output
    pixels, valid [Q] bool (None: all) -> labels [H, W] int64, best and second-best similarity
    [H, W] float32; or a batch of them as ``assign``'s. See ``kernels.assign``."""
    _check_assignment(emb_lowres, queries, boxes, valid)
    return _pick(backend, emb_lowres).assign_upsampled(emb_lowres, tuple(out_size), queries, boxes,
                                                       chunk, valid)


def nms(boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, iou_thresh: float, *,
        backend: str = "auto") -> torch.Tensor:
    """boxes [B, N, 4] float xyxy, classes [B, N] int64, valid [B, N] bool, each image sorted by
    decreasing score (ties in input order), iou_thresh >= 0 -> keep [B, N] bool: class-wise
    greedy NMS of each image's valid boxes (float64 IoU > iou_thresh suppresses), the boxes
    ``ciae.modeling.box_ops.batched_nms`` keeps. No host sync on the Triton path. See ``kernels.nms``."""
    _check(boxes.dim() == 3 and boxes.shape[2] == 4 and boxes.is_floating_point(),
           f"boxes must be [B, N, 4] float, got {tuple(boxes.shape)} {boxes.dtype}")
    _check(classes.shape == boxes.shape[:2] and classes.dtype == torch.int64,
           f"classes must be [B, N] = {tuple(boxes.shape[:2])} int64, "
           f"got {tuple(classes.shape)} {classes.dtype}")
    _check(valid.shape == boxes.shape[:2] and valid.dtype == torch.bool,
           f"valid must be [B, N] = {tuple(boxes.shape[:2])} bool, "
           f"got {tuple(valid.shape)} {valid.dtype}")
    _check(iou_thresh >= 0, f"iou_thresh must be >= 0, got {iou_thresh}")
    return _pick(backend, boxes).nms(boxes, classes, valid, iou_thresh)


def greedy_keep(suppress: torch.Tensor, valid: torch.Tensor, *, backend: str = "auto"
                ) -> torch.Tensor:
    """suppress [B, N, N] bool (i suppresses j; entries i >= j ignored), valid [B, N] bool
    -> keep [B, N] bool: keep[j] = valid[j] and no kept i < j suppresses j. No host sync on the
    Triton path. See ``kernels.nms``."""
    _check(suppress.dim() == 3 and suppress.shape[1] == suppress.shape[2]
           and suppress.dtype == torch.bool,
           f"suppress must be [B, N, N] bool, got {tuple(suppress.shape)} {suppress.dtype}")
    _check(valid.shape == suppress.shape[:2] and valid.dtype == torch.bool,
           f"valid must be [B, N] = {tuple(suppress.shape[:2])} bool, "
           f"got {tuple(valid.shape)} {valid.dtype}")
    return _pick(backend, suppress).greedy_keep(suppress, valid)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5, relu: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """x [N, C, H, W] float, num_groups dividing C, weight and bias [C] -> relu(group_norm(x)),
    or without the ReLU, in x's dtype and memory layout (statistics in float32).
    See ``kernels.group_norm``."""
    _check_map(x)
    _check(num_groups >= 1 and x.shape[1] % num_groups == 0,
           lambda: f"num_groups must divide the {x.shape[1]} channels, got {num_groups}")
    _check(weight.shape == bias.shape == (x.shape[1],),
           lambda: f"weight and bias must be [C={x.shape[1]}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    return _pick(backend, x).group_norm(x, num_groups, weight, bias, eps, relu)


def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                   residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None,
                   residual_shift: torch.Tensor | None = None, relu: bool = False, *,
                   backend: str = "auto") -> torch.Tensor:
    """x [N, C, H, W] float, scale and shift [C, 1, 1] in x's dtype, residual [N, C, H, W] or None
    (residual_scale and residual_shift [C, 1, 1] in its dtype, or None) -> relu(x * scale + shift +
    residual * residual_scale + residual_shift) in x's dtype and layout, each term and the ReLU
    where given. Differentiable w.r.t. x and residual. See ``kernels.channel_affine``."""
    _check_map(x)
    c = x.shape[1]
    _check(scale.shape == shift.shape == (c, 1, 1) and scale.dtype == shift.dtype == x.dtype,
           lambda: f"scale and shift must be [C={c}, 1, 1] {x.dtype}, got {tuple(scale.shape)} {scale.dtype} "
                   f"and {tuple(shift.shape)} {shift.dtype}")
    _check(not (scale.requires_grad or shift.requires_grad),
           "scale and shift are constants: they must not require grad")
    _check((residual_scale is None) == (residual_shift is None) and (residual is not None or residual_scale is None),
           "residual_scale and residual_shift come together, and only with a residual")
    if residual is not None:
        _check(residual.shape == x.shape and residual.is_floating_point(),
               lambda: f"residual must be {tuple(x.shape)} float, got {tuple(residual.shape)} {residual.dtype}")
    if residual_scale is not None:
        _check(residual_scale.shape == residual_shift.shape == (c, 1, 1)
               and residual_scale.dtype == residual_shift.dtype == residual.dtype
               and not (residual_scale.requires_grad or residual_shift.requires_grad),
               lambda: f"residual_scale and residual_shift must be constant [C={c}, 1, 1] {residual.dtype}")
    return _pick(backend, x).channel_affine(x, scale, shift, residual, residual_scale, residual_shift, relu)
