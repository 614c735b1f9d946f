"""Feature Pyramid Network (Lin et al., 2017): C2-C5 -> P2-P7, as FCOS builds it.

P5..P2: a 1x1 lateral conv on each C level, summed top-down with the coarser level upsampled
(nearest) to the lateral's exact size, then a 3x3 output conv. P6 is a 3x3 stride-2 conv on P5
and P7 a 3x3 stride-2 conv on ReLU(P6) (FCOS's top block on P5 rather than C5). A level of
stride s is ceil(H / s) x ceil(W / s) for an H x W image, whatever H and W are.

Every conv is initialised as in RetinaNet / detectron2: kaiming-uniform with a = 1, bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUTS = ("c2", "c3", "c4", "c5")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


class FPN(nn.Module):
    """C2-C5 (``in_channels`` maps "c2".."c5" to channels) -> P2-P7 of ``out_channels`` each.

    ``out_channels`` maps "p2".."p7" to that channel count, ``strides`` to 4..128.
    """

    def __init__(self, in_channels: dict[str, int], out_channels: int):
        super().__init__()
        if set(in_channels) != set(INPUTS):
            raise ValueError(f"FPN needs in_channels for {INPUTS}, got {sorted(in_channels)}")
        self.lateral = nn.ModuleDict({f"p{c[1]}": nn.Conv2d(in_channels[c], out_channels, 1)
                                      for c in INPUTS})
        self.output = nn.ModuleDict({f"p{c[1]}": nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                     for c in INPUTS})
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.out_channels = {level: out_channels for level in STRIDES}
        self.strides = dict(STRIDES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"c2": [B, Cin2, H/4, W/4], ..., "c5": [B, Cin5, H/32, W/32]}
        -> {"p2": [B, C, H/4, W/4], ..., "p7": [B, C, H/128, W/128]} (sizes rounded up)."""
        out = {}
        top = None
        for c in reversed(INPUTS):
            level = f"p{c[1]}"
            lateral = self.lateral[level](features[c])
            top = lateral if top is None else lateral + F.interpolate(top, size=lateral.shape[-2:],
                                                                      mode="nearest")
            out[level] = self.output[level](top)
        out["p6"] = self.p6(out["p5"])
        out["p7"] = self.p7(F.relu(out["p6"]))
        return {level: out[level] for level in STRIDES}
