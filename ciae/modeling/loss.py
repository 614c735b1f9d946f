"""The CIAE loss (paper Eq. 3-12) on top of the fused operations in ``kernels``.

Per image, with pre-normalisation embeddings E [D, H, W] at full resolution:

* L_CAE: every pixel with a category (``sem`` != 255) against the category memory M (all CAE
  categories), no box filter.
* L_IAE: every pixel with a segment (``seg`` != -1) against the stuff memory plus the instance
  means m_s (normalised sums of E over each instance, Eq. 4 — they carry gradient back to E),
  instance similarity zeroed outside the instance's ground-truth box expanded ``box_expand``x,
  thing pixels weighted ``thing_weight``x.
* each is the sum of per-pixel top-K triplet losses over the batch's valid pixels, divided by
  their number; L_CIAE = L_CAE + alpha * L_IAE.

``category_sums`` gives the batch's sums and pixel counts of E per CAE category, from which
the model updates the memory (Eq. 13-14, after an all-reduce on many workers) before the loss
takes it as queries, as the paper orders it.
"""

from __future__ import annotations

import torch

from ciae.config import EmbeddingConfig
from ciae.data.panoptic import IGNORE_SEM
from ciae.modeling.box_ops import expand_boxes
from ciae.modeling.embedding import normalize
from kernels import dispatch


def _categories(sem: torch.Tensor) -> torch.Tensor:
    """``sem`` with its ignore value as the kernels' -1."""
    return torch.where(sem == IGNORE_SEM, torch.full_like(sem, -1), sem)


@torch.no_grad()
def category_sums(emb: torch.Tensor, sem: torch.Tensor, num_categories: int, backend: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerators of the category means of Eq. 3 over the batch: emb [B, D, H, W]
    pre-normalisation, sem [B, H, W] -> sums [C, D], pixel counts [C] (float32; no gradient)."""
    sums, counts = dispatch.segment_sums(emb.detach(), _categories(sem), num_categories, backend=backend)
    return sums.sum(0), counts.sum(0)


class _Unbind(torch.autograd.Function):
    """``t.unbind(0)`` whose backward writes the parts' gradients into one tensor laid out as
    ``t`` (autograd's own stacks them into a contiguous one: for a channels-last ``t``, the 4x
    upsampling's backward then takes 5x as long on the CPU). Unlike ``t[i]``, no part's
    gradient is a zero-filled tensor of the whole batch."""

    @staticmethod
    def forward(ctx, t):
        ctx.set_materialize_grads(False)
        ctx.like, ctx.device = torch.empty_like(t, device="meta"), t.device
        return t.unbind(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        like = ctx.like
        out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=ctx.device)
        for part, g in zip(out.unbind(0), grads):
            part.zero_() if g is None else part.copy_(g)
        return out


def ciae_normalisers(sem: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The local normalisers of :func:`ciae_loss`: [2] float32, the pixels of the CAE (with a
    category) and of the IAE (with a segment)."""
    return torch.stack([(sem != IGNORE_SEM).sum(), (seg >= 0).sum()]).float()


def ciae_loss(emb: torch.Tensor, sem: torch.Tensor, seg: torch.Tensor, boxes: list[torch.Tensor],
              memory: torch.Tensor, num_stuff: int, cfg: EmbeddingConfig, backend: str = "auto",
              normalisers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """emb [B, D, H, W] pre-normalisation; sem, seg [B, H, W] int64 (see pipeline.feed.targets);
    boxes: per image [N_b, 4] xyxy ground-truth thing boxes (instance j <-> seg value C_st + j);
    memory [C, D] unit vectors; ``normalisers``: the CAE and IAE pixel counts, their means over
    data-parallel workers, so that averaged gradients equal those of one worker with the whole
    batch (default: this batch's own, :func:`ciae_normalisers`).

    Returns loss_cae, loss_iae, loss_ciae (scalars)."""
    b, _, h, w = emb.shape
    c = memory.shape[0]
    sem_t = _categories(sem)
    # per-segment sums: the instance means of the IAE queries, with gradient
    n_seg = num_stuff + max((len(x) for x in boxes), default=0)
    seg_sums, _ = dispatch.segment_sums(emb, seg, n_seg, backend=backend)

    # the full-image box (pixels: never bf16), filled on the device: no copy from the host
    full = torch.zeros(1, 4, dtype=torch.float32, device=emb.device)
    full[0, 2].fill_(w)
    full[0, 3].fill_(h)
    mem_boxes = full.expand(c, 4)
    stuff_boxes = full.expand(num_stuff, 4)
    cae = emb.new_zeros(())
    iae = emb.new_zeros(())
    n_cae = emb.new_zeros(())
    n_iae = emb.new_zeros(())
    ones = torch.ones((h, w), dtype=emb.dtype, device=emb.device)
    images = _Unbind.apply(emb)
    for i in range(b):
        loss, n = dispatch.embedding_loss(images[i], memory, mem_boxes, sem_t[i], ones,
                                          margin=cfg.margin, top_k=cfg.top_k,
                                          chunk=cfg.pixel_chunk, backend=backend)
        cae, n_cae = cae + loss, n_cae + n

        n_inst = len(boxes[i])
        inst = normalize(seg_sums[i, num_stuff:num_stuff + n_inst], dim=1)
        queries = torch.cat([memory[:num_stuff], inst.to(memory.dtype)], dim=0)
        qboxes = torch.cat([stuff_boxes, expand_boxes(boxes[i].float(), cfg.box_expand)], dim=0)
        weight = torch.where(seg[i] >= num_stuff, cfg.thing_weight, 1.0).to(emb.dtype)
        loss, n = dispatch.embedding_loss(images[i], queries, qboxes, seg[i], weight,
                                          margin=cfg.margin, top_k=cfg.top_k,
                                          chunk=cfg.pixel_chunk, backend=backend)
        iae, n_iae = iae + loss, n_iae + n

    if normalisers is not None:
        n_cae, n_iae = normalisers
    loss_cae = cae / n_cae.clamp_min(1)
    loss_iae = iae / n_iae.clamp_min(1)
    return {"loss_cae": loss_cae, "loss_iae": loss_iae, "loss_ciae": loss_cae + cfg.alpha * loss_iae}
