"""GroupNorm + ReLU on the paper's maps: the path the model took before (PyTorch under bfloat16
autocast) against the twin and the Triton kernels (``kernels.group_norm``), on one CUDA GPU.

Maps, bfloat16 channels-last as a GPU's training and labeling make them, batch 8 at 800 x 1216:
the head's P3 [8, 256, 100, 152] (32 groups; 40 such calls per forward over P3-P7) and the
embedding branch's P2 [8, 128, 200, 304]. Implementations:

* autocast: ``relu(nn.GroupNorm(x))`` under bfloat16 autocast, then the cast to bfloat16
  channels-last that the next conv makes of its float32 NCHW output;
* twin: ``kernels.group_norm.group_norm`` (float32 inside, back to the map's dtype and layout);
* triton: ``kernels.group_norm_triton.group_norm``.

Per row, forward and forward + backward (dL/dx, dL/dweight, dL/dbias): the median time, the
bandwidth of the bytes the Triton kernels move (6 per element forward, 14 forward + backward)
over that time, the autocast row's time over this one, and the largest difference from a
float64 GroupNorm of the same input. Prints a markdown table.

    .venv/bin/python benchmarks/kernels/group_norm.py            # on a CUDA machine
    .venv/bin/python benchmarks/kernels/group_norm.py --smoke    # tiny maps on CPU (interpreter)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MAPS = {"head P3": (8, 256, 100, 152), "branch P2": (8, 128, 200, 304)}
SMOKE_MAPS = {"head P3": (2, 32, 6, 10), "branch P2": (2, 16, 12, 20)}
BYTES_PER_ELEMENT = {"forward": 6, "forward + backward": 14}


def implementations(device):
    import torch
    import torch.nn.functional as F

    from kernels.group_norm import group_norm as twin
    from kernels.group_norm_triton import group_norm as triton_gn

    def autocast(x, groups, weight, bias):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = F.relu(F.group_norm(x, groups, weight, bias), inplace=True)
        return y.to(x.dtype).contiguous(memory_format=torch.channels_last)

    return {"autocast": autocast, "twin": twin, "triton": triton_gn}


def rows_for(shape, device, warmup: int, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from benchmarks.kernels.run import measure

    n, c, h, w = shape
    groups = 32 if c % 32 == 0 else c
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight, bias = (torch.randn(c, generator=g).to(device) for _ in range(2))
    dy = torch.randn(shape, generator=g).to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), groups, weight.double(), bias.double()).relu()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, base = [], {}
    for impl, fn in implementations(device).items():
        def forward():
            return (fn(x, groups, weight, bias),)

        def backward():
            xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))
            y = fn(xs, groups, ws, bs)
            return (y.detach(), *torch.autograd.grad(y, (xs, ws, bs), dy))

        for what, run in (("forward", forward), ("forward + backward", backward)):
            seconds, peak, out = measure(run, sync, cuda, warmup, repeats)
            base.setdefault(what, seconds)
            moved = BYTES_PER_ELEMENT[what] * x.numel()
            rows.append({"impl": impl, "pass": what, "ms": 1e3 * seconds, "gbps": moved / seconds / 1e9,
                         "x_base": base[what] / seconds,
                         "max_diff": (out[0].double() - exact).abs().max().item()})
    return rows


def main(argv=None) -> int:
    from benchmarks.kernels.run import maps_main

    return maps_main(argv, __doc__, "GroupNorm + ReLU, bfloat16 channels-last", "autocast",
                     {k: (v,) for k, v in MAPS.items()}, {k: (v,) for k, v in SMOKE_MAPS.items()}, rows_for)


if __name__ == "__main__":
    raise SystemExit(main())
