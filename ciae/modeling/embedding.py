"""The embedding branch (paper Sec. IV-A, Fig. 3).

P2-P5 go through Panoptic-FPN's semantic-branch aggregation: per level, 3x3 conv + GroupNorm +
ReLU + 2x bilinear upsampling, repeated until 1/4 scale (P2: one conv, no upsampling; P5: three,
with CoordConv), summed, and a 1x1 conv gives P' [B, D, H/4, W/4]. The proposal head's box
embeddings of every level are upsampled to 1/4, summed and convolved into P''. The pixel
embedding is P = L2norm(up4(P' + P'')); the branch returns the stride-4 map P' + P'' and
``full_resolution`` / ``normalize`` make the rest, so inference can fuse them into assignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciae.modeling.backbone import GroupNorm2d


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """CoordConv input: [B, C, H, W] -> [B, C + 2, H, W] with x and y in [-1, 1], in x's layout
    (a channels-last x gives a channels-last map, which the next convolution takes as it is)."""
    b, _, h, w = x.shape
    ys = _coords(h, x).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = _coords(w, x).view(1, 1, 1, w).expand(b, 1, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # joined along C of [B, C, H, W] the result would be NCHW (the coordinates are
        # expanded, not channels-last): join the NHWC views along their last dim instead
        return torch.cat([t.permute(0, 2, 3, 1) for t in (x, xs, ys)], dim=3).permute(0, 3, 1, 2)
    return torch.cat([x, xs, ys], dim=1)


def _coords(n: int, like: torch.Tensor) -> torch.Tensor:
    """``linspace(-1, 1, n)`` in ``like``'s dtype, within 2e-7 of float32 ``linspace``, in three
    ops from ``arange``: its size stays symbolic under ``torch.compile(dynamic=True)``, where
    ``linspace`` would specialise the graph to each input size."""
    step = 2 / torch.sym_max(n - 1, 1)
    return (torch.arange(n, device=like.device, dtype=torch.float32) * step - 1).to(like.dtype)


class _Stage(nn.Module):
    """3x3 conv + GN + ReLU, then 2x bilinear upsampling unless it is the last of P2's path."""

    def __init__(self, cin: int, cout: int, upsample: bool, coord: bool):
        super().__init__()
        self.coord, self.upsample = coord, upsample
        self.conv = nn.Conv2d(cin + 2 * coord, cout, 3, padding=1, bias=False)
        self.norm = GroupNorm2d(cout, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(add_coords(x) if self.coord else x))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) if self.upsample else x


class EmbeddingBranch(nn.Module):
    """P2-P5 (+ box embeddings of P3-P7) -> the stride-4 pre-normalisation embedding map."""

    def __init__(self, in_channels: int, channels: int, dim: int, coordconv: bool = True,
                 box_embedding: bool = True):
        super().__init__()
        self.paths = nn.ModuleList()
        for level in range(4):  # P2, P3, P4, P5: 1, 1, 2, 3 stages
            n = max(1, level)
            coord = coordconv and level == 3
            stages = [_Stage(in_channels if i == 0 else channels, channels, upsample=level > 0, coord=coord)
                      for i in range(n)]
            self.paths.append(nn.Sequential(*stages))
        self.predict = nn.Conv2d(channels, dim, 1)
        self.box_fuse = nn.Conv2d(dim, dim, 3, padding=1) if box_embedding else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor], box_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """feats: P2..P5 [B, C, H/s, W/s]; box_embeds: per level [B, D, H_l, W_l] (P3..P7).

        Returns P' + P'' [B, D, H/4, W/4]."""
        size = feats[0].shape[-2:]
        total = None
        for path, f in zip(self.paths, feats):
            y = path(f)
            if y.shape[-2:] != size:  # inputs not a multiple of 32
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            total = y if total is None else total + y
        out = self.predict(total)
        if self.box_fuse is not None:
            if box_embeds is None:
                raise ValueError("this branch fuses box embeddings: pass the proposal head's box_embed maps")
            fused = sum(F.interpolate(e, size=size, mode="bilinear", align_corners=False) for e in box_embeds)
            out = out + self.box_fuse(fused)
        return out


def full_resolution(emb4: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] stride-4 map -> [B, D, 4h, 4w] (bilinear, as P = L2norm(up4(P' + P'')))."""
    return F.interpolate(emb4, scale_factor=4, mode="bilinear", align_corners=False)


def normalize(emb: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    return emb / emb.norm(dim=dim, keepdim=True).clamp_min(eps)


def sample_at(emb4: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Values of ``full_resolution(emb4)`` at full-resolution pixels, without building it.

    emb4 [B, D, h, w]; xy [B, K, 2] integer pixel (x, y) -> [B, K, D] (pre-normalisation),
    float32 (float64 for float64 maps): coordinates in bfloat16 would be 8 px apart beyond 1024."""
    b, d, h, w = emb4.shape
    acc = torch.float64 if emb4.dtype == torch.float64 else torch.float32
    size = torch.where(torch.arange(2, device=xy.device) == 0, 4 * w, 4 * h)     # (W, H)
    grid = (xy.to(acc) + 0.5) / size * 2 - 1
    out = F.grid_sample(emb4.to(acc), grid.view(b, 1, -1, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)
