"""Box-filtered assignment of pixels to queries (paper Eq. 16 with the filter of Sec. IV-B).

S = P V^T, P the L2-normalised pixel embeddings (p = e / max(||e||, EPS)) and V the unit-norm
queries; s_ik = 0 when pixel i lies outside box k (the test of ``ciae_loss.outside_boxes``:
inside iff x0 <= x < x1 and y0 <= y < y1). label_i = argmax_k s_ik, the lowest index on ties;
best_i = s_i,label_i; second_i = max over k != label_i of s_ik, at least -1 (so -1 with one
query): best - second is how clearly the pixel chose its query (the labeling job's confidence). As the paper states the filter, a query scores 0 outside its box, so it
can win a pixel whose in-box similarities are all negative. An invalid query (``valid``: the
padding of a batch's query lists) scores -inf everywhere: never a label nor a second best (with
no valid query at all, label 0, best -inf, second -1). The twin drops the invalid queries before
the products, so that padding changes no bit of the others' similarities.

Both functions take one image or a batch: emb [B, ...] with queries [B, Q, D], boxes [B, Q, 4]
and valid [B, Q]; the twin runs the images one by one.

``assign_upsampled`` is the inference path from the stride-4 map: bilinear upsampling
(F.interpolate, align_corners=False), normalisation, ``assign``; it runs over blocks of output
rows so that the full-resolution map is never held whole. The horizontal pass is F.interpolate
at low resolution ([D, h, W]); the vertical pass is the two-tap lerp per row block, with the
taps computed as PyTorch computes them, so the map matches the full upsampling to the last bit
(PyTorch's summation order of the two taps is not reproduced).

Everything is computed in float32 without autograd, with the caller's autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.ciae_loss import EPS, exact, outside_boxes, row_chunks


def _assign_pixels(e: torch.Tensor, q: torch.Tensor, boxes: torch.Tensor, row0: int, row1: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e [C, D] the pixels of rows row0..row1-1 of a map ``width`` wide, q [Q, D],
    boxes [Q, 4] float32 -> labels [C] int64, best [C] float32, second [C] float32."""
    e = e.float()
    p = e / e.norm(dim=1, keepdim=True).clamp_min(EPS)
    with exact(e.device):
        s = (q @ p.T).T.contiguous().masked_fill_(outside_boxes(boxes, row0, row1, width), 0)
    best, labels = s.max(dim=1)   # first maximum on ties
    second = s.scatter_(1, labels[:, None], float("-inf")).amax(dim=1).clamp_min_(-1)
    return labels, best, second


@torch.no_grad()
def assign(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
           chunk: int | None = 65536, valid: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb [D, H, W] (normalised or not), queries [Q, D] unit norm, boxes [Q, 4] xyxy (exclusive
    end), ``chunk`` pixels per step, rounded down to whole rows (None: all at once), valid [Q]
    bool (None: all) -> labels [H, W] int64, best [H, W] float32, second [H, W] float32; or a
    batch of them ([B, D, H, W], [B, Q, D], [B, Q, 4], [B, Q] -> [B, H, W] each)."""
    if emb.dim() == 4:
        return _per_image(lambda e, q, b, v: assign(e, q, b, chunk, v), emb, queries, boxes, valid)
    if valid is not None:
        return _valid_only(lambda q, b: assign(emb, q, b, chunk), emb.shape[1:], queries, boxes, valid)
    d, h, w = emb.shape
    e_all, q, boxes = emb.reshape(d, h * w), queries.float(), boxes.float()
    labels, best, second = _outputs((h, w), emb.device)
    for r0, r1, a, b in row_chunks(h, w, chunk):
        labels.view(-1)[a:b], best.view(-1)[a:b], second.view(-1)[a:b] = _assign_pixels(
            e_all[:, a:b].T, q, boxes, r0, r1, w)
    return labels, best, second


def _per_image(fn, emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
               valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(emb, queries, boxes, valid)`` of one image on each image of a batch -> its
    outputs stacked."""
    outs = [fn(emb[i], queries[i], boxes[i], None if valid is None else valid[i])
            for i in range(len(emb))]
    return tuple(torch.stack(x) for x in zip(*outs))


def _valid_only(fn, shape: tuple[int, int], queries: torch.Tensor, boxes: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(queries, boxes)`` of one image, [H, W] = ``shape``, on its valid queries alone, the
    labels mapped back to all of them (reads the valid indices on the host: the CPU path)."""
    idx = valid.nonzero()[:, 0]
    if len(idx) == 0:
        labels, best, second = _outputs(tuple(shape), queries.device)
        return labels.zero_(), best.fill_(float("-inf")), second.fill_(-1)
    labels, best, second = fn(queries[idx], boxes[idx])
    return idx[labels], best, second


def _outputs(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty labels int64, best and second float32 of ``shape`` ([H, W] or [B, H, W])."""
    return (torch.empty(shape, dtype=torch.int64, device=device),
            torch.empty(shape, dtype=torch.float32, device=device),
            torch.empty(shape, dtype=torch.float32, device=device))


def _linear_taps(size_in: int, size_out: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The source indices i0, i1 [size_out] and weights w0, w1 [size_out] of 1-D linear
    interpolation with align_corners=False, as PyTorch's upsampling computes them: the source
    coordinate max(scale * (y + 0.5) - 0.5, 0), scale = float32(size_in / size_out), rounded
    once to float32 (PyTorch's kernels evaluate it as one fused multiply-add)."""
    scale = torch.full((), size_in, dtype=torch.float32, device=device) / size_out
    y = torch.arange(size_out, dtype=torch.float64, device=device) + 0.5
    src = (scale.double() * y - 0.5).float().clamp_min(0)
    i0 = src.floor().long().clamp_max(size_in - 1)
    w1 = (src - i0).clamp(0, 1)
    return i0, (i0 + 1).clamp_max(size_in - 1), 1 - w1, w1


@torch.no_grad()
def assign_upsampled(emb_lowres: torch.Tensor, out_size: tuple[int, int], queries: torch.Tensor,
                     boxes: torch.Tensor, chunk: int | None = 65536,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """emb_lowres [D, h, w] (the stride-4 map), out_size (H, W), queries [Q, D] unit norm,
    boxes [Q, 4] in output pixels, ``chunk`` output pixels per step (whole rows, at least one;
    None: all at once), valid [Q] bool (None: all) -> labels [H, W] int64, best [H, W] float32,
    second [H, W] float32: ``assign`` of the bilinear upsampling of emb_lowres to (H, W); or a
    batch of them as ``assign``'s."""
    if emb_lowres.dim() == 4:
        return _per_image(lambda e, q, b, v: assign_upsampled(e, out_size, q, b, chunk, v),
                          emb_lowres, queries, boxes, valid)
    if valid is not None:
        return _valid_only(lambda q, b: assign_upsampled(emb_lowres, out_size, q, b, chunk),
                           out_size, queries, boxes, valid)
    d, h, _ = emb_lowres.shape
    hh, ww = out_size
    q, boxes = queries.float(), boxes.float()
    rows = F.interpolate(emb_lowres[None].float(), size=(h, ww), mode="bilinear",
                         align_corners=False)[0]                            # [D, h, W]
    i0, i1, w0, w1 = _linear_taps(h, hh, emb_lowres.device)
    labels, best, second = _outputs((hh, ww), emb_lowres.device)
    for r0, r1, _, _ in row_chunks(hh, ww, chunk):
        top, bottom = rows[:, i0[r0:r1]], rows[:, i1[r0:r1]]            # [D, rows, W]
        block = top * w0[r0:r1, None] + bottom * w1[r0:r1, None]
        out = _assign_pixels(block.reshape(d, -1).T, q, boxes, r0, r1, ww)
        labels[r0:r1], best[r0:r1], second[r0:r1] = (x.view(-1, ww) for x in out)
    return labels, best, second
