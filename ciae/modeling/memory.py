"""The category-aware memory embeddings (paper Sec. III-C, Eq. 13-14).

One unit vector per category of the CAE (stuff classes, then the merged thing class or each thing
class). Randomly initialised, updated without gradient from the batch's category means:

    lambda_t = 1 - momentum * (1 - t / T) ** 3
    M_t = L2norm(lambda_t * M_{t-1} + (1 - lambda_t) * m_c)   for the categories present.

The model applies the update in each training step before the CIAE loss, which then takes M_t
as its queries (the paper's order). Updates take category *sums* and pixel counts, so a
distributed job can all-reduce them first and every worker applies the same update: the memory
stays identical across workers.

The paper's Table V quotes the momentum as lambda at t = 0: ``momentum`` here is 1 - that value
(0.9999 -> 1e-4, the default; the table's 0 -> 1.0, the memory replaced by each batch's means
at the start of training).
"""

from __future__ import annotations

import torch
from torch import nn


class CategoryMemory(nn.Module):
    def __init__(self, num_categories: int, dim: int, momentum: float = 1e-4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(num_categories, dim, generator=g)
        self.register_buffer("memory", m / m.norm(dim=1, keepdim=True))
        self.momentum = momentum

    @property
    def num_categories(self) -> int:
        return self.memory.shape[0]

    def forward(self) -> torch.Tensor:
        """[C, D] unit vectors (a detached view: the loss never moves the memory by gradient)."""
        return self.memory.detach()

    def momentum_at(self, step: int, total_steps: int) -> float:
        """lambda_t of Eq. 13 (t clamped to [0, T])."""
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return 1.0 - self.momentum * (1.0 - frac) ** 3

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor, step: int, total_steps: int) -> None:
        """sums [C, D] of pre-normalisation embeddings per category, counts [C] pixels per category
        (or both scaled by one factor, such as their means over workers: only the directions of
        the sums count). Categories without pixels keep their entry; no host synchronisation."""
        means = sums.float()
        means = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        lam = self.momentum_at(step, total_steps)
        new = lam * self.memory + (1.0 - lam) * means.to(self.memory.dtype)
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.memory.copy_(torch.where((counts > 0)[:, None], new, self.memory))
