"""A frozen BatchNorm and what follows it in the paper's ResNet-50, on one CUDA GPU: the eager
ops the model ran before (the twin, ``kernels.channel_affine``) against the Triton kernel.

Maps, bfloat16 channels-last as a GPU's training and labeling make them, batch 8 at 800 x 1216:

* norm + ReLU, layer1's 3x3 conv output [8, 64, 200, 304] (``addcmul``, ``relu_``: 8 bytes per
  element; the kernel 4);
* a bottleneck's end with its projection, layer1's first block [8, 256, 200, 304] (``addcmul`` of
  the conv and of the shortcut's conv, ``add_``, ``relu_``: 18 bytes; the kernel 6);
* a bottleneck's end with the identity, layer3 [8, 1024, 50, 76] (14 bytes; the kernel 6).

Per row, forward and forward + backward (dL/dx and dL/dresidual): the median time, the bandwidth
of the bytes the Triton kernels move over that time, the twin's time over this one, and the
largest difference from float64. Prints a markdown table.

    .venv/bin/python benchmarks/kernels/channel_affine.py            # on a CUDA machine
    .venv/bin/python benchmarks/kernels/channel_affine.py --smoke    # tiny maps on CPU (interpreter)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# label: (shape, residual kind)
MAPS = {"norm + ReLU": ((8, 64, 200, 304), "none"), "end, projection": ((8, 256, 200, 304), "affine"),
        "end, identity": ((8, 1024, 50, 76), "plain")}
SMOKE_MAPS = {"norm + ReLU": ((2, 16, 6, 10), "none"), "end, projection": ((2, 32, 6, 10), "affine"),
              "end, identity": ((2, 64, 3, 5), "plain")}
# bytes per element the kernels move: forward, forward + backward
BYTES = {"none": (4, 10), "plain": (6, 14), "affine": (6, 14)}


def rows_for(shape, residual: str, device, warmup: int, repeats: int) -> list[dict]:
    import torch

    from benchmarks.kernels.run import measure
    from kernels.channel_affine import channel_affine as twin
    from kernels.channel_affine_triton import channel_affine as triton_affine

    c = shape[1]
    g = torch.Generator().manual_seed(0)

    def channels_last(t):
        return t.to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last)

    x, r, dy = (channels_last(torch.randn(shape, generator=g)) for _ in range(3))
    scale, shift, r_scale, r_shift = (torch.randn(c, 1, 1, generator=g).to(device, torch.bfloat16) for _ in range(4))
    terms = {"none": (None, None, None), "plain": (r, None, None), "affine": (r, r_scale, r_shift)}[residual]
    exact = twin(x.double(), scale.double(), shift.double(), *(t if t is None else t.double() for t in terms), True)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, base = [], {}
    for impl, fn in (("twin", twin), ("triton", triton_affine)):
        def forward():
            return (fn(x, scale, shift, *terms, True),)

        def backward():
            xs = x.detach().requires_grad_()
            rs = None if terms[0] is None else terms[0].detach().requires_grad_()
            y = fn(xs, scale, shift, rs, *terms[1:], True)
            return (y.detach(), *torch.autograd.grad(y, [t for t in (xs, rs) if t is not None], dy))

        for k, (what, run) in enumerate((("forward", forward), ("forward + backward", backward))):
            seconds, _, out = measure(run, sync, cuda, warmup, repeats)
            base.setdefault(what, seconds)
            rows.append({"impl": impl, "pass": what, "ms": 1e3 * seconds,
                         "gbps": BYTES[residual][k] * x.numel() / seconds / 1e9, "x_base": base[what] / seconds,
                         "max_diff": (out[0].double() - exact).abs().max().item()})
    return rows


def main(argv=None) -> int:
    from benchmarks.kernels.run import maps_main

    return maps_main(argv, __doc__, "Frozen BatchNorm + residual + ReLU, bfloat16 channels-last", "twin",
                     MAPS, SMOKE_MAPS, rows_for)


if __name__ == "__main__":
    raise SystemExit(main())
