"""Per-image sums and pixel counts of embeddings per segment label (the numerators of Eq. 3-4).

The PyTorch twin reads the map in its own layout, without a copy: for [B, D, H, W] planes
(contiguous), one ``scatter_add`` along the pixel axis of [B, D, N]; for channels-last maps
(pixel-major, as channels-last training makes them), one ``index_add_`` of [B * N, D] pixel rows
(2x faster there than the scatter on strided planes). Differentiable w.r.t. ``emb`` (the
gradient of a pixel is its segment's row). Ignored pixels (label < 0) land in an extra bucket
``S`` that is dropped, so no boolean indexing and no host synchronisation. Labels must lie in [-1, S): a label equal to ``S`` would
fall into the dropped bucket, larger ones are an indexing error.

Callers build means from these: segment means per image (Eq. 4) as ``sums[b] / counts[b]`` and
category means over the batch (Eq. 3) as ``sums.sum(0)``, then a safe L2 normalisation (the
mean's scale does not matter once normalised, so ``F.normalize(sums, dim=-1)`` is the same
direction).
"""

from __future__ import annotations

import torch


def segment_sums(emb: torch.Tensor, labels: torch.Tensor, num_segments: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the embeddings and count the pixels of each label, per image.

    emb [B, D, H, W] float (any float dtype; accumulated in float32, or float64 for float64),
    labels [B, H, W] int64 in [-1, S) with -1 = ignore, S = ``num_segments``
    -> sums [B, S, D], counts [B, S] (0 for an empty segment), both float32 (float64 for
    float64 input).
    """
    b, d = emb.shape[:2]
    s = num_segments + 1                                                     # + the ignore bucket
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    idx = labels.reshape(b, -1)
    idx = torch.where(idx < 0, num_segments, idx)                            # [B, N]
    counts = torch.zeros(b, s, dtype=acc, device=emb.device).scatter_add_(
        1, idx, torch.ones((), dtype=acc, device=emb.device).expand(idx.shape))
    if emb.dim() == 4 and emb.is_contiguous(memory_format=torch.channels_last) and \
            not emb.is_contiguous():
        rows = emb.permute(0, 2, 3, 1).reshape(-1, d).to(acc)                # [B * N, D], a view
        flat = (idx + torch.arange(b, device=idx.device)[:, None] * s).reshape(-1)
        sums = rows.new_zeros(b * s, d).index_add_(0, flat, rows).view(b, s, d)
        return sums[:, :num_segments], counts[:, :num_segments]
    x = emb.reshape(b, d, -1).to(acc)                                        # [B, D, N]
    sums = x.new_zeros(b, d, s).scatter_add(2, idx[:, None].expand(-1, d, -1), x)
    return sums[:, :, :num_segments].transpose(1, 2).contiguous(), counts[:, :num_segments]
