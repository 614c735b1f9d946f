"""Inputs shared by the kernel tests (the twins' and the Triton kernels')."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_case(seed, d=3, h=5, w=4, q=4, dtype=torch.float64, ignore=0.2):
    """emb [d, h, w], unit queries [q, d], boxes [q, 4] float32 with fractional corners (query 0
    covers the image), target [h, w] with ignored pixels (-1), weight [h, w] in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(d, h, w, generator=g, dtype=torch.float64)
    queries = F.normalize(torch.randn(q, d, generator=g, dtype=torch.float64), dim=1)
    x0 = torch.randint(0, w, (q,), generator=g) - 0.5
    y0 = torch.randint(0, h, (q,), generator=g) + 0.25
    x1 = x0 + torch.randint(1, w + 1, (q,), generator=g)
    y1 = y0 + torch.randint(1, h + 1, (q,), generator=g)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[0] = torch.tensor([0, 0, w, h])
    target = torch.randint(0, q, (h, w), generator=g)
    target[torch.rand(h, w, generator=g) < ignore] = -1
    weight = torch.rand(h, w, generator=g, dtype=torch.float64) + 0.5
    return emb.to(dtype), queries.to(dtype), boxes, target, weight.to(dtype)


def degenerate_case(seed):
    """``make_case`` with two empty boxes (x0 == x1; x0 > x1 and y0 > y1), two all-zero pixels
    and a pixel whose own query's box does not contain it."""
    emb, queries, boxes, target, weight = make_case(seed, q=5)
    boxes[1] = torch.tensor([3.0, 0.0, 3.0, 5.0])
    boxes[2] = torch.tensor([2.0, 4.0, 1.0, 1.0])
    emb[:, 1, 1] = 0
    emb[:, 3, 2] = 0
    target[1, 1], target[3, 2], target[2, 2] = 0, 1, 2
    return emb, queries, boxes, target, weight
