"""Benchmark the fused CIAE operations: Triton kernels vs the eager PyTorch twins vs
torch.compile of the twins, on COCO-sized inputs, on one CUDA GPU.

Inputs (seeded): 2 images of 800 x 1216, D = 32, 53 stuff queries (boxes covering the image)
+ 60 instance queries (random boxes), unit queries; block-coherent segment labels (32 x 32 px
cells, 5% ignored), thing pixels weighted 5x. Operations, summed over the 2 images as the model
calls them:

* segment_sums      [2, 32, 800, 1216] -> [2, 113, 32], forward + backward (gather);
* loss fwd          ``embedding_loss`` at full resolution, forward only;
* loss fwd+bwd      the same with dL/demb and dL/dqueries;
* assign            full-resolution map -> labels, best and second-best similarity;
* assign_upsampled  stride-4 map [32, 200, 304] -> the same at full resolution.

Per implementation: median wall time of ``--repeats`` runs after ``--warmup`` (torch.cuda
.synchronize around each), the peak of torch.cuda.max_memory_allocated above what was allocated
before the call (reset_peak_memory_stats first), and the agreement with the eager twin. The
bandwidth floor is the bytes the operation must move (read its inputs once, write its outputs
once; counted in ``floor_bytes``) over the HBM bandwidth, detected from the device name
(H100 SXM 3.35 TB/s, H200 4.8 TB/s, ...) or given with ``--hbm-tbps``; "% floor" is
floor / measured time; "x eager" is the eager twin's time over this one and "peak / grad" the
peak over the bytes of the [B, D, H, W] embedding gradient. ``--compile-budget`` bounds the
``torch.compile`` column (compilation included); an operation past it is reported as skipped.
The result is a markdown table on stdout. ``run_table`` and ``markdown`` are what
benchmarks/gpu/suite.py imports.

    .venv/bin/python benchmarks/kernels/run.py                # on a CUDA machine
    .venv/bin/python benchmarks/kernels/run.py --smoke        # tiny inputs on CPU (interpreter)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MARGIN, TOP_K = 0.15, 5
# HBM bandwidth in TB/s by device-name fragment, most specific first
HBM_TBPS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("GH200", 4.0),
            ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
            ("L40S", 0.864), ("A10G", 0.6), ("L4", 0.3)]


@dataclass
class Shape:
    images: int
    height: int
    width: int
    dim: int
    stuff: int
    instances: int

    @property
    def queries(self) -> int:
        return self.stuff + self.instances


COCO = Shape(2, 800, 1216, 32, 53, 60)
SMOKE = Shape(2, 24, 40, 8, 5, 4)


def make_inputs(shape: Shape, dtype, device, seed: int = 0, layout: str = "planes"):
    """emb [B, D, H, W], the stride-4 map [B, D, H/4, W/4], queries [B, Q, D], boxes [B, Q, 4],
    target [B, H, W] int64, weight [B, H, W]; random, drawn from ``seed``. ``layout``: the two
    maps as planes (contiguous) or "pixels" (channels-last, as the jobs make them)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    b, h, w, d, q = shape.images, shape.height, shape.width, shape.dim, shape.queries
    emb = torch.randn(b, d, h, w, generator=g).to(device, dtype)
    lowres = torch.randn(b, d, h // 4, w // 4, generator=g).to(device, dtype)
    queries = F.normalize(torch.randn(b, q, d, generator=g), dim=-1).to(device, dtype)
    xy = torch.rand(b, shape.instances, 2, generator=g) * torch.tensor([w, h])
    wh = (torch.rand(b, shape.instances, 2, generator=g) * 0.4 + 0.05) * torch.tensor([w, h])
    inst = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], -1)
    full = torch.tensor([0.0, 0.0, w, h]).expand(b, shape.stuff, 4)
    boxes = torch.cat([full, inst], 1).to(device)
    cells = torch.randint(0, q, (b, 1, -(-h // 32), -(-w // 32)), generator=g).float()
    target = F.interpolate(cells, scale_factor=32, mode="nearest")[:, 0, :h, :w].long()
    target[torch.rand(b, h, w, generator=g) < 0.05] = -1
    weight = torch.where(target >= shape.stuff, 5.0, 1.0).to(dtype)
    if layout == "pixels":
        emb, lowres = (x.contiguous(memory_format=torch.channels_last) for x in (emb, lowres))
    return emb, lowres, queries, boxes, target.to(device), weight.to(device)


def floor_bytes(shape: Shape, elem: int) -> dict[str, int]:
    """Bytes each operation must move at least: inputs read once, outputs written once
    (elem = bytes per embedding element; weight as emb; int64 labels; float32 best)."""
    b, n, d = shape.images, shape.height * shape.width, shape.dim
    loss_read = b * n * (d * elem + 8 + elem)
    return {"segment_sums": b * n * (d * elem + 8) + b * n * (8 + d * elem),
            "loss fwd": loss_read,
            "loss fwd+bwd": 2 * loss_read + b * n * d * elem,
            "assign": b * n * (d * elem + 16),
            "assign_upsampled": b * (n // 16 * d * elem + n * 16)}


def operations(impl: dict, inputs):
    """name -> run(), which returns the outputs, for one implementation (impl: its four
    functions). The loss and segment sums take gradients, so their inputs require them."""
    import torch

    emb, lowres, queries, boxes, target, weight = inputs
    b, _, h, w = emb.shape
    n_seg = queries.shape[1]

    def segment_sums():
        e = emb.detach().requires_grad_()
        sums, _ = impl["segment_sums"](e, target, n_seg)
        (grad,) = torch.autograd.grad(sums, e, torch.ones_like(sums))
        return sums.detach(), grad

    def loss(backward: bool):
        def run():
            e = emb.detach().requires_grad_(backward)
            q = queries.detach().requires_grad_(backward)
            total = 0
            for i in range(b):
                total = total + impl["embedding_loss"](e[i], q[i], boxes[i], target[i], weight[i],
                                                       MARGIN, TOP_K)[0]
            if not backward:
                return (total.detach(),)
            return (total.detach(), *torch.autograd.grad(total, (e, q)))
        return run

    def assign():     # labels of each image, then best, then second best
        out = [impl["assign"](emb[i], queries[i], boxes[i]) for i in range(b)]
        return tuple(x for outputs in zip(*out) for x in outputs)

    def assign_upsampled():
        out = [impl["assign_upsampled"](lowres[i], (h, w), queries[i], boxes[i]) for i in range(b)]
        return tuple(x for outputs in zip(*out) for x in outputs)

    return {"segment_sums": segment_sums, "loss fwd": loss(False), "loss fwd+bwd": loss(True),
            "assign": assign, "assign_upsampled": assign_upsampled}


def agreement(name: str, out, ref) -> tuple[str, float]:
    """How far an implementation's outputs are from the eager twin's: (text, value), the value
    the share of equal labels (assignment) or the largest relative error (the rest)."""
    if name.startswith("assign"):
        labels = range(len(out) // 3)
        equal = sum((out[i] == ref[i]).sum().item() for i in labels)
        share = equal / sum(ref[i].numel() for i in labels)
        return f"labels {100 * share:.4f}% equal", share
    rel = max(((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
              for a, r in zip(out, ref))
    return f"rel. err {rel:.1e}", rel


def measure(run, sync, cuda: bool, warmup: int, repeats: int):
    """Median seconds, peak bytes above the starting allocation (None off CUDA), last outputs."""
    import torch

    for _ in range(warmup):
        run()
    sync()
    times = []
    peak = None
    for _ in range(repeats):
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t)
        if cuda:
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
        del out
    out = run()                 # for the comparison with the eager twin
    sync()
    return statistics.median(times), peak, out


def maps_main(argv, doc: str, title: str, baseline: str, maps: dict, smoke_maps: dict, rows_for) -> int:
    """The command of a benchmark over a few maps (``group_norm.py``, ``channel_affine.py``): on
    one CUDA GPU ``maps``, with ``--smoke`` ``smoke_maps`` on the CPU (Triton interpreted);
    {label: arguments} and ``rows_for(*arguments, device, warmup, repeats)`` -> rows {impl, pass,
    ms, gbps, x_base (``baseline``'s time over this one), max_diff}, printed as a markdown table."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny maps on CPU, Triton under its interpreter")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20, smoke 1)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("No CUDA device: this benchmark times GPU kernels; --smoke checks it on CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (20 if cuda else 1)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter), smoke: times mean nothing"
    print(f"# {title}, {name}\n")
    print(f"| map | implementation | pass | median ms | GB/s of the kernels' bytes | x {baseline} | "
          f"max diff vs float64 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, arguments in (maps if cuda else smoke_maps).items():
        for r in rows_for(*arguments, device, 3 if cuda else 0, repeats):
            print(f"| {label} {list(arguments[0])} | {r['impl']} | {r['pass']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                  f"{r['x_base']:.2f} | {r['max_diff']:.3g} |")
    return 0


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise TimeoutError in the block after ``seconds`` (None: no limit). SIGALRM: the main
    thread of a Unix process only, elsewhere no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_):
        raise TimeoutError(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def hbm_tbps(device_name: str) -> float | None:
    """The HBM bandwidth in TB/s of a device, from its name; None when unknown."""
    return next((v for k, v in HBM_TBPS if k in device_name), None)


def run_table(shape: Shape, dtype, device, tbps: float, warmup: int, repeats: int,
              compile_twins: bool = True, compile_budget_s: float | None = None,
              compile_backend: str = "inductor", ops: Sequence[str] | None = None,
              layout: str = "planes") -> list[dict]:
    """Time every operation (or those named in ``ops``, keys of ``operations``) with each
    implementation: the Triton kernels, the eager twins and,
    with ``compile_twins``, ``torch.compile(backend=compile_backend)`` of the twins, whose
    compilation and timing together get ``compile_budget_s`` seconds (None: no limit; an
    operation past it, or after it, is recorded as skipped); ``layout`` as ``make_inputs``.

    Returns one row per (operation, implementation): op, impl, ms (median), peak_mib (None off
    CUDA), floor_ms (bytes moved at ``tbps`` TB/s), pct_floor, agreement (text, vs the eager
    twin) and agreement_value, x_eager (eager time / this time), peak_vs_grad (peak over the
    bytes of the [B, D, H, W] embedding gradient); or op, impl, error (one line)."""
    import torch

    import kernels
    from kernels.assign import assign, assign_upsampled
    from kernels.ciae_loss import embedding_loss
    from kernels.segment_sums import segment_sums

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    twins = {"segment_sums": segment_sums, "embedding_loss": embedding_loss, "assign": assign,
             "assign_upsampled": assign_upsampled}
    triton_backend = kernels.BACKENDS["triton"]
    impls = {"triton": {k: getattr(triton_backend, k) for k in twins}, "eager twin": twins}
    if compile_twins:
        impls["compiled twin"] = {k: torch.compile(f, backend=compile_backend)
                                  for k, f in twins.items()}
    inputs = make_inputs(shape, dtype, device, layout=layout)
    elem = torch.tensor([], dtype=dtype).element_size()
    floors = {op: n for op, n in floor_bytes(shape, elem).items() if ops is None or op in ops}
    grad_bytes = shape.images * shape.dim * shape.height * shape.width * elem
    results = {}
    compile_end = None if compile_budget_s is None else time.perf_counter() + compile_budget_s
    for impl_name, impl in impls.items():
        for op, run in operations(impl, inputs).items():
            if op not in floors:
                continue
            limit = None
            if impl_name == "compiled twin" and compile_end is not None:
                limit = compile_end - time.perf_counter()
                if limit <= 0:
                    results[op, impl_name] = TimeoutError("skipped: compile budget spent")
                    continue
            try:
                with time_limit(limit):
                    results[op, impl_name] = measure(run, sync, cuda, warmup, repeats)
            except Exception as exc:    # e.g. torch.compile failing on the chunked twin
                results[op, impl_name] = exc
                if impl_name == "compiled twin":
                    torch._dynamo.reset()
    rows = []
    for op in floors:
        floor_s = floors[op] / (tbps * 1e12)
        ref = results[op, "eager twin"]
        for impl_name in impls:
            res = results[op, impl_name]
            if isinstance(res, Exception):
                rows.append({"op": op, "impl": impl_name, "error": one_line(res)})
                continue
            t, peak, out = res
            row = {"op": op, "impl": impl_name, "ms": 1e3 * t,
                   "peak_mib": None if peak is None else peak / 2**20,
                   "floor_ms": 1e3 * floor_s, "pct_floor": 100 * floor_s / t,
                   "agreement": "-", "agreement_value": None, "x_eager": None,
                   "peak_vs_grad": None if peak is None else peak / grad_bytes}
            if impl_name != "eager twin" and not isinstance(ref, Exception):
                row["agreement"], row["agreement_value"] = agreement(op, out, ref[2])
                row["x_eager"] = ref[0] / t
            rows.append(row)
    return rows


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 160 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def markdown(rows: list[dict]) -> list[str]:
    """The rows of ``run_table`` as a markdown table."""
    out = ["| operation | implementation | median ms | peak MiB | floor ms | % floor | x eager "
           "| peak / grad | vs eager |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        if "error" in r:
            out.append(f"| {r['op']} | {r['impl']} | failed: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['op']} | {r['impl']} | {r['ms']:.3f} | {num(r['peak_mib'], '.1f')} | "
                   f"{r['floor_ms']:.3g} | {r['pct_floor']:.3g} | {num(r['x_eager'], '.3g')} | "
                   f"{num(r['peak_vs_grad'], '.2f')} | {r['agreement']} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny inputs on CPU, Triton under its interpreter: checks the script runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="embedding dtype (default float32)")
    p.add_argument("--layout", default="planes", choices=["planes", "pixels"],
                   help="the embedding maps' layout: planes (contiguous; default) or pixels "
                        "(channels-last, as training and labeling make them)")
    p.add_argument("--hbm-tbps", type=float, default=None,
                   help="HBM bandwidth in TB/s (default: from the device name)")
    p.add_argument("--warmup", type=int, default=None,
                   help="runs before timing (default 3, smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20, smoke 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds for the torch.compile column, compilation included (default: "
                        "no limit)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("No CUDA device: this benchmark times GPU kernels. Run it on a CUDA machine, or "
              "pass --smoke to check the script on tiny CPU inputs (Triton interpreter).",
              file=sys.stderr)
        return 2
    import kernels

    if "triton" not in kernels.BACKENDS:
        print("triton does not import here: nothing to benchmark.", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else COCO
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 20)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter), smoke test"
    tbps = args.hbm_tbps or hbm_tbps(name)
    if tbps is None:
        tbps = 3.35
        if cuda:
            print(f"HBM bandwidth of {name!r} unknown: assuming 3.35 TB/s (set --hbm-tbps)",
                  file=sys.stderr)
    rows = run_table(shape, getattr(torch, args.dtype), device, tbps, warmup, repeats,
                     compile_twins=not args.no_compile, compile_budget_s=args.compile_budget,
                     layout=args.layout)
    print(f"# Fused CIAE operations, {name}, {args.dtype}, {args.layout}\n")
    print(f"{shape.images} images {shape.height}x{shape.width}, D = {shape.dim}, "
          f"Q = {shape.stuff} stuff + {shape.instances} instances; HBM {tbps} TB/s; median of "
          f"{repeats} after {warmup} warm-up; peak = max allocated above the inputs; x eager = "
          f"the eager twin's time over this one; peak / grad = peak over the bytes of the "
          f"embedding gradient.\n")
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
