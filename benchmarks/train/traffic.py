"""What a training step asks of a GPU's memory and of its tensor cores, counted on the CPU.

A GPU step's time is, roughly, its convolutions' and matmuls' FLOPs at the tensor cores' rate
plus the bytes every other op reads and writes at the memory's rate (elementwise ops, norms,
reductions, copies: each one a pass over its tensors), plus a launch per op where the kernels are
too short to hide it. None of these is visible as time on a CPU, but all of them can be counted
there, exactly, by running the real step under a ``TorchDispatchMode``:

* ``flops``: ``torch.utils.flop_counter`` (convolutions and matmuls, forward and backward);
* ``bytes``: the inputs and outputs of every other ATen op (views and allocations excluded: they
  move nothing), by op and by the line of ours that issued it (the backward's ops by the op;
  the optimiser step's under ``ciae/engine/train.py``);
* ``ops``: how many ATen ops were dispatched, and Triton kernels launched.

The bytes are the unfused eager traffic (what each op would move if it were its own kernel) at
the dtypes of the run (float32 here; bf16 autocast on a GPU halves most activations). With
``--backend torch`` (the default) the fused operations run as their PyTorch twins, as on a CPU;
with ``--backend triton`` as the Triton kernels a GPU runs (interpreted here: slower), each
launch counted as ``triton:<kernel>`` with the bytes of its tensor arguments, each read or
written once (exact for the elementwise kernels; the loss and GroupNorm kernels read some of
theirs twice), and the interpreter's own ATen ops not counted. Before-and-after counts of a
change to the network show what it saves a GPU.

Usage: ``python benchmarks/train/traffic.py [--config paper] [--size 400 608] [--batch 2] [--top 15]
[--backend torch|triton]``; prints JSON (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported: CPU tensors run

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ciae.utils.opcount import TritonLaunches  # noqa: E402

MOVES_NOTHING = {"view", "_unsafe_view", "_reshape_alias", "unsqueeze", "squeeze", "detach", "alias", "select",
         "slice", "transpose", "t", "permute", "expand", "as_strided", "split", "split_with_sizes",
         "unbind", "chunk", "narrow", "diagonal", "unfold", "lift_fresh",
         "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}   # views and allocations
_OURS = tuple(os.path.join(ROOT, p) + os.sep for p in ("ciae", "kernels"))
_COUNTER = os.path.join(ROOT, "ciae", "utils", "opcount.py")     # the launch wrapper's frame


def _bytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(y) for y in x)
    return 0


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name.startswith(_OURS) and name != _COUNTER:
            return f"{os.path.relpath(name, ROOT)}:{f.f_lineno}"
        f = f.f_back
    return "backward"


class Traffic(TorchDispatchMode):
    """Bytes in and out of every non-view op and Triton launch, by op name and by our line that
    issued it (``with Traffic(): ...``)."""

    def __init__(self):
        super().__init__()
        self.by_op, self.by_site, self.ops = collections.Counter(), collections.Counter(), 0
        self.launches = TritonLaunches(lambda name, args: self._count(f"triton:{name}", _bytes(args)))

    def _count(self, name: str, moved: int) -> None:
        self.ops += 1
        self.by_op[name] += moved
        self.by_site[_site()] += moved

    def __enter__(self):
        super().__enter__()
        self.launches.__enter__()
        return self

    def __exit__(self, *exc):
        self.launches.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.launches.depth:             # the Triton interpreter's own work
            return out
        name = func._schema.name.split("::")[-1]
        if name in MOVES_NOTHING:
            self.ops += 1
        else:
            self._count(name, _bytes(args) + _bytes(list((kwargs or {}).values())) + _bytes(out))
        return out


def measure(config: str, h: int, w: int, b: int, top: int, backend: str = "torch") -> dict:
    from benchmarks.syncs.run import batch_of  # the op counter's batch: two stuff classes, two instances
    from ciae.config import PRESETS
    from ciae.engine.train import Trainer
    from ciae.modeling.model import CIAEModel

    torch.manual_seed(0)
    model = CIAEModel(PRESETS[config](), stuff_ids=[184, 187], thing_ids=[1, 3])
    model.kernel_backend = backend
    trainer = Trainer(model)
    batch = batch_of(b, h, w)
    trainer.train_step(batch)               # warm-up: the optimiser's state, first-call paths
    traffic, flops = Traffic(), FlopCounterMode(display=False)
    with flops, traffic:
        trainer.train_step(batch)
    gb = lambda n: round(n / 1e9, 3)        # noqa: E731
    return {"config": config, "size": [h, w], "batch": b, "backend": backend, "ops": traffic.ops,
            "conv_matmul_gflop": round(flops.get_total_flops() / 1e9, 1),
            "gbytes": gb(sum(traffic.by_op.values())),
            "by_op": {k: gb(v) for k, v in traffic.by_op.most_common(top)},
            "by_site": {k: gb(v) for k, v in traffic.by_site.most_common(top)}}


def main(argv=None) -> int:
    from ciae.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="paper", choices=sorted(PRESETS))
    p.add_argument("--size", type=int, nargs=2, default=(400, 608), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="ops and lines listed")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"],
                   help="the fused operations as PyTorch twins (the CPU's path) or Triton kernels (a GPU's)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = measure(args.config, *args.size, args.batch, args.top, args.backend)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
