"""The CIAE triplet loss of one image against a set of queries (paper Eq. 1-2, 5-9), with the box
filter of Sec. IV-B.

For every pixel i with target t_i >= 0 (a query index; -1 = ignore) and every query k:

    p_i   = e_i / max(||e_i||, EPS)                         Eq. 1, e_i the pre-normalisation embedding
    s_ik  = p_i . q_k  if pixel i is inside box k, else 0   box filter
    d_ik  = 1 - s_ik                                        Eq. 2 (queries are unit vectors)
    z_ik  = d_it - dn_ik + margin,  dn_ik = d_ik for k != t_i, 0 for k = t_i     Eq. 5-7
          = s_ik + (margin - s_it) for k != t_i,  1 + (margin - s_it) for k = t_i (as computed)
    l_ik  = -log(max(1 - max(z_ik, 0) / (2 + margin), TINY))                      Eq. 8

    loss_sum  = sum_i w_i * (sum of the top_k largest l_ik over k)                Eq. 9, numerator
    num_valid = number of pixels with t_i >= 0                                   Eq. 9, N

The k = t_i term, d_it + margin, is the pull toward the pixel's own query. TINY only acts at the
singularity (an exactly antipodal pair, or rounding past it), where the loss would be infinite:
there l = -log(TINY) ~ 27.6 with zero gradient.

Pixel (y, x) is inside box (x0, y0, x1, y1) iff x0 <= x < x1 and y0 <= y < y1, compared in
float32; stuff and memory queries carry a box covering the image, and a box with x0 >= x1 or
y0 >= y1 contains nothing. The test is separable: per row against y0, y1 and per column against
x0, x1, then one broadcast over the chunk.

The top_k terms are selected on z (l is non-decreasing in z, so the kept values are the same);
tied terms have equal values, so which of them is kept does not change the loss.

Memory: a custom autograd Function that runs over chunks of whole rows (``chunk`` pixels rounded
down to whole rows, at least one). When the image spans several chunks, the forward keeps
nothing but its inputs and the backward recomputes each chunk, so peak memory is a few
[chunk, Q] buffers plus the [D, H, W] gradient itself; when it fits in one chunk, the forward's
buffers (normalised embeddings, box mask, kept terms: one chunk's worth, at most) are held until
the backward instead. The backward applies the hand-written gradient:

    g_ij     = w_i / ((2 + margin) u_ij)  for kept j with z_ij > 0 and u_ij >= TINY, else 0,
               u_ij = 1 - max(z_ij, 0) / (2 + margin)                 (dl/dz)
    dL/ds_ik = g_ik for k != t_i,  dL/ds_it = -sum_j g_ij            (every z_ij holds -s_it)
    G        = dL/ds, zero outside the boxes;  dL/dq = G^T p,  dL/dp = G q
    dL/de_i  = (dp_i - p_i (p_i . dp_i)) / ||e_i||, or dp_i / EPS where ||e_i|| < EPS (F.normalize)

Inputs of any float dtype are computed in float32 (float64 stays float64, for gradcheck), with
the caller's autocast off (``exact``): under bfloat16 autocast ``q @ p.T`` would otherwise run in
bfloat16 in the forward and not in the backward. Gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch

EPS = 1e-12    # floor of ||e|| in the normalisation, as F.normalize
TINY = 1e-12   # floor of the log's argument in Eq. 8


def exact(device: torch.device):
    """A context in which ``device``'s autocast is off, so that the twins compute in the dtypes
    they choose (float32) whatever autocast the caller runs under."""
    return torch.autocast(device.type, enabled=False)


def outside_boxes(boxes: torch.Tensor, row0: int, row1: int, width: int) -> torch.Tensor:
    """boxes [Q, 4] float32 xyxy (exclusive end) -> [(row1 - row0) * width, Q] bool: whether each
    pixel of rows row0..row1-1 (row-major) lies outside each box."""
    y = torch.arange(row0, row1, device=boxes.device, dtype=torch.float32)[:, None]
    x = torch.arange(width, device=boxes.device, dtype=torch.float32)[:, None]
    out_y = (y < boxes[:, 1]) | (y >= boxes[:, 3])                   # [rows, Q]
    out_x = (x < boxes[:, 0]) | (x >= boxes[:, 2])                   # [W, Q]
    return (out_y[:, None] | out_x[None]).reshape(-1, boxes.shape[0])


def row_chunks(height: int, width: int, chunk: int | None):
    """(row0, row1, pixel0, pixel1) of consecutive blocks of whole rows, about ``chunk`` pixels
    each (at least one row; None: the whole map)."""
    rows = max(1, height if chunk is None else chunk // max(width, 1))
    for r in range(0, height, rows):
        r1 = min(r + rows, height)
        yield r, r1, r * width, r1 * width


def _hinge(e: torch.Tensor, q: torch.Tensor, outside: torch.Tensor, t: torch.Tensor, margin: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e [C, D] pre-normalisation, q [Q, D], outside [C, Q], t [C] in [0, Q)
    -> p [C, D] normalised, norm [C, 1], z [C, Q] (the argument of the hinge, Eq. 7)."""
    norm = e.square().sum(1, keepdim=True).sqrt()   # 9x faster than .norm() on this strided view
    p = e / norm.clamp_min(EPS)
    # (q p^T)^T: MKL is up to 10x slower on p q^T with p column-major and few queries
    s = (q @ p.T).T.contiguous().masked_fill_(outside, 0)           # s_ik
    c = margin - s.gather(1, t[:, None])                             # margin - s_it
    return p, norm, s.add_(c).scatter_(1, t[:, None], c + 1)


def _chunk(e: torch.Tensor, q: torch.Tensor, boxes: torch.Tensor, t: torch.Tensor, r0: int, r1: int,
           width: int, margin: float, k: int) -> tuple[torch.Tensor, ...]:
    """One chunk's forward: e [C, D], t [C] (-1 = ignore) -> p [C, D], norm [C, 1], outside
    [C, Q], t [C] clamped to [0, Q), kept [C, k] top-k of z, idx [C, k] their query indices."""
    outside, t = outside_boxes(boxes, r0, r1, width), t.clamp_min(0)
    p, norm, z = _hinge(e, q, outside, t, margin)
    kept, idx = z.topk(k, dim=1)
    return p, norm, outside, t, kept, idx


class _EmbeddingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, queries, boxes, target, weight, margin, top_k, chunk):
        with exact(emb.device):
            return _EmbeddingLoss._forward(ctx, emb, queries, boxes, target, weight, margin, top_k,
                                           chunk)

    @staticmethod
    def _forward(ctx, emb, queries, boxes, target, weight, margin, top_k, chunk):
        d, h, w = emb.shape
        acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        boxes = boxes.float()
        e_all, q, t_all = emb.reshape(d, h * w), queries.to(acc), target.reshape(-1)
        w_all = torch.where(t_all >= 0, weight.reshape(-1).to(acc), 0)  # 0 on ignored pixels
        k = min(top_k, q.shape[0])
        loss = q.new_zeros(())
        chunks = list(row_chunks(h, w, chunk))
        for r0, r1, a, b in chunks:
            state = _chunk(e_all[:, a:b].T.to(acc), q, boxes, t_all[a:b], r0, r1, w, margin, k)
            kept = state[4].clamp_min(0)                                   # l' of the kept terms
            l_kept = -torch.log((1 - kept / (2 + margin)).clamp_min_(TINY))
            loss += (w_all[a:b] * l_kept.sum(1)).sum()
        ctx.save_for_backward(emb, queries, boxes, target, weight)
        ctx.margin, ctx.k, ctx.chunk = margin, k, chunk
        ctx.state = state if len(chunks) == 1 else None   # one chunk: no recomputation
        num_valid = (t_all >= 0).sum().to(acc)
        ctx.mark_non_differentiable(num_valid)
        return loss, num_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_num_valid):
        with exact(grad_loss.device):
            return _EmbeddingLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        emb, queries, boxes, target, weight = ctx.saved_tensors
        margin, k, chunk, state = ctx.margin, ctx.k, ctx.chunk, ctx.state
        ctx.state = None
        d, h, w = emb.shape
        acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
        e_all, q, t_all = emb.reshape(d, h * w), queries.to(acc), target.reshape(-1)
        w_all = torch.where(t_all >= 0, weight.reshape(-1).to(acc), 0) * grad_loss
        need_emb, need_q, _, _, need_w = ctx.needs_input_grad[:5]
        grad_emb = torch.empty_like(e_all) if need_emb else None
        grad_q = torch.zeros_like(q) if need_q else None
        grad_w = torch.empty_like(w_all) if need_w else None
        for r0, r1, a, b in row_chunks(h, w, chunk):
            if state is None:
                p, norm, outside, t, kept, idx = _chunk(e_all[:, a:b].T.to(acc), q, boxes, t_all[a:b],
                                                        r0, r1, w, margin, k)
            else:
                (p, norm, outside, t, kept, idx), state = state, None
            u = 1 - kept.clamp_min(0) / (2 + margin)
            if need_w:
                grad_w[a:b] = (t_all[a:b] >= 0) * -torch.log(u.clamp_min(TINY)).sum(1) * grad_loss
            if not (need_emb or need_q):
                continue
            g = torch.where((kept > 0) & (u >= TINY),                       # dL/dz_ij, kept j
                            w_all[a:b, None] / ((2 + margin) * u.clamp_min(TINY)), 0)
            grad_s = kept.new_zeros(outside.shape).scatter_(1, idx, g)      # k != t_i
            grad_s.scatter_(1, t[:, None], -g.sum(1, keepdim=True))         # k = t_i
            grad_s.masked_fill_(outside, 0)
            if need_q:
                grad_q += grad_s.T @ p
            if need_emb:
                dp = grad_s @ q
                radial = torch.where(norm >= EPS, p * (p * dp).sum(1, keepdim=True), 0)
                grad_emb[:, a:b] = ((dp - radial) / norm.clamp_min(EPS)).T
        return (grad_emb.view_as(emb) if need_emb else None,
                grad_q.to(queries.dtype) if need_q else None,
                None, None,
                grad_w.view_as(weight).to(weight.dtype) if need_w else None,
                None, None, None)


def embedding_loss(emb: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
                   target: torch.Tensor, weight: torch.Tensor, margin: float, top_k: int,
                   chunk: int | None = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The box-filtered CIAE loss of one image, summed over its pixels.

    emb [D, H, W] pre-normalisation embeddings, queries [Q, D] L2-normalised (Q >= 1),
    boxes [Q, 4] xyxy pixel boxes (exclusive end), target [H, W] int64 query index (-1 = ignore),
    weight [H, W] per-pixel weight, ``margin`` >= 0, ``top_k`` >= 1 (clipped to Q), ``chunk``
    pixels per step, rounded down to whole rows (None: the whole image at once)
    -> loss_sum [] (differentiable w.r.t. emb, queries and weight), num_valid [] (no gradient),
    both float32 (float64 for float64 emb). The loss of Eq. 9 is loss_sum / max(num_valid, 1).
    """
    return _EmbeddingLoss.apply(emb, queries, boxes, target, weight, float(margin), int(top_k),
                                chunk)
