"""The measurements of benchmarks/gpu/suite.py, one function per section (``section_NAME(ctx,
sec)``); ``sec`` is the suite's ``Section`` record, ``ctx`` the ``Context`` of this run (GPU, or
``smoke``: CPU, tiny sizes, Triton under its interpreter). benchmarks/gpu/README.md says what
each figure is.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}   # relative error vs float64 (METHOD.md)
NEAR_TIE = 1e-5        # a label may differ where the two best similarities are this close
PQ_BAND = 0.62         # CPU training reaches 0.69-0.75 (benchmarks/RESULTS.md)
EAGER_MULTIPLE = 4     # an error within this multiple of the eager twin's own error passes
KERNEL_OPS = {"segment_sums": ["segment_sums"], "loss": ["loss fwd", "loss fwd+bwd"],
              "assign": ["assign"], "assign_upsampled": ["assign_upsampled"]}   # run_table's


def kernel_bench():
    """benchmarks/kernels/run.py as a module."""
    from importlib.util import module_from_spec, spec_from_file_location

    name = "ciae_kernels_bench"
    if name not in sys.modules:
        spec = spec_from_file_location(name, ROOT / "benchmarks" / "kernels" / "run.py")
        sys.modules[name] = module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


class Context:
    """The device, the timer and the synthetic data of one section's process."""

    def __init__(self, smoke: bool, out: Path, work: Path):
        if not smoke and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device here: run the suite with --smoke on a CPU")
        self.smoke, self.out, self.work = smoke, out, work
        self.cuda = not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, warmup: int, repeats: int) -> float:
        """Median seconds of ``fn()`` over ``repeats`` synchronised runs after ``warmup``."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, section: str) -> dict:
        """What an earlier section of this run recorded ({} if nothing)."""
        path = self.work / f"{section}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def dataset(self, name: str, n: int, seed: int, height: int, width: int,
                coco: bool = False, things: tuple[int, int] = (2, 6)) -> Path:
        """A synthetic COCO panoptic dataset (``pipeline.data.synth``; the 133 COCO categories if
        ``coco``, else the default 8) -> its folder (images/, panoptic/, panoptic.json)."""
        from pipeline.data.synth import SynthSpec, coco_categories, write_dataset

        root = self.folder(name)
        write_dataset(str(root), n, seed=seed, categories=coco_categories() if coco else None,
                      spec=SynthSpec(height=height, width=width, min_things=things[0],
                                     max_things=things[1]))
        return root

    def shards(self, name: str, n: int, seed: int, height: int, width: int, **kw) -> str:
        """The shards of ``dataset(...)``, prepared in this process (no Ray)."""
        from pipeline.data.prepare import prepare
        from pipeline.data.shards import Source

        src = self.dataset(name, n, seed, height, width, **kw)
        out = str(self.folder(f"{name}_shards"))
        prepare(Source(str(src / "images"), str(src / "panoptic.json"), str(src / "panoptic")),
                out, progress=False, in_process=True)
        return out

    def paper_config(self):
        """Config() (ResNet-50-FPN, shorter side 800); smoke: Config.small() at 64 px."""
        from ciae.config import Config

        return self.small_config() if self.smoke else Config()

    def small_config(self):
        """Config.small(); smoke: at 64 px (shorter sides 64, longer side at most 96)."""
        from ciae.config import Config

        cfg = Config.small()
        if self.smoke:
            cfg.input = dataclasses.replace(cfg.input, shorter_sides=(64,), max_size=96,
                                            test_shorter_side=64)
        return cfg


def fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out - ref|| when ref is 0); NaN if out is not
    finite."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.nan
    diff, norm = (out - ref).norm().item(), ref.norm().item()
    return diff / norm if norm > 0 else diff


# ---- env ------------------------------------------------------------------------------------

def nvidia_smi() -> tuple[str, str] | None:
    """(GPU name, driver version) from nvidia-smi, None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    r = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30, check=False)
    first = r.stdout.strip().splitlines()[:1]
    if r.returncode != 0 or not first or "," not in first[0]:
        return None
    name, driver = (x.strip() for x in first[0].split(",", 1))
    return name, driver


def section_env(ctx: Context, sec) -> None:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        smi = nvidia_smi()
        info.update(device=smi[0] if smi else props.name,
                    driver=smi[1] if smi else "unknown (no nvidia-smi)",
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    else:
        info.update(device=f"CPU {platform.machine()}, {os.cpu_count()} cores (Triton interpreter)",
                    driver="-")
    sec.set(**info)

    # ceilings (METHOD.md): a large device-to-device copy (bytes read + written), a bf16 matmul
    n_bytes = 2**31 if ctx.cuda else 2**25
    src = torch.rand(n_bytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    t = ctx.timed(lambda: dst.copy_(src), 3, 10 if ctx.cuda else 3)
    copy_tbps = 2 * n_bytes / t / 1e12
    n = 8192 if ctx.cuda else 256
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    t_mm = ctx.timed(lambda: a @ b, 3, 10 if ctx.cuda else 3)
    tflops = 2 * n**3 / t_mm / 1e12
    sec.set(copy_tbps=copy_tbps, copy_gib=n_bytes / 2**30, matmul_bf16_tflops=tflops,
            matmul_n=n, summary=f"copy {copy_tbps:.3g} TB/s, bf16 matmul {tflops:.3g} TFLOP/s")
    rows = [[k, fmt(v, ".4g") if isinstance(v, float) else v] for k, v in info.items()]
    rows += [["device-to-device copy", f"{copy_tbps:.3f} TB/s ({n_bytes / 2**30:g} GiB buffer, "
                                       f"bytes read + written, median of 10)"],
             ["bf16 matmul, random data", f"{tflops:.1f} TFLOP/s ({n}^3, median of 10)"]]
    sec.table("Device and ceilings", ["what", "value"], rows)


# ---- correctness ------------------------------------------------------------------------------

def correctness_cases(smoke: bool) -> list[tuple]:
    """(case, operation, dtype, Shape, edits) in order of importance: COCO-sized inputs first,
    then edge cases on small maps."""
    kb = kernel_bench()
    coco = kb.Shape(2, 32, 48, 32, 5, 8) if smoke else kb.COCO
    h, w = (24, 40) if smoke else (96, 160)

    def edge(d, stuff, instances, b=1):
        return kb.Shape(b, h, w, d, stuff, instances)

    f32, bf16 = torch.float32, torch.bfloat16
    ops = ("segment_sums", "loss", "assign", "assign_upsampled")
    cases = [("COCO", op, dt, coco, {}) for dt in (f32, bf16) for op in ops]
    cases += [("empty segment, all-ignore image", "segment_sums", f32, edge(32, 5, 8, 2),
               {"empty": 2, "ignore_image": 1}),
              ("all-ignore image", "loss", f32, edge(32, 5, 8), {"ignore_all": True}),
              *(("one query", op, f32, edge(32, 1, 0), {}) for op in ops[1:]),
              *(("Q = 150", op, f32, edge(32, 53, 97, 2 if op == "segment_sums" else 1), {})
                for op in ops),
              ("Q = 150", "loss", bf16, edge(32, 53, 97), {}),
              *(("D = 48", op, f32, edge(48, 5, 8, 2 if op == "segment_sums" else 1), {})
                for op in ops),
              *(("channels-last", op, dt, edge(32, 5, 8, 2), {"layout": "pixels"})
                for dt in (bf16, f32) for op in ops)]
    # the network's norms on channels-last maps of the paper's model at batch 8, 800 x 1216: the
    # head's P3 (GroupNorm + ReLU), layer1's end with its projection (frozen BatchNorm)
    maps = ({"group_norm": (2, 32, 6, 10), "channel_affine": (2, 32, 6, 10)} if smoke else
            {"group_norm": (8, 256, 100, 152), "channel_affine": (8, 256, 200, 304)})
    cases += [("COCO map", op, dt, maps[op], {}) for dt in (f32, bf16) for op in MAP_CHECKS]
    return cases


def case_inputs(ctx: Context, shape, dtype, edits: dict, seed: int):
    kb = kernel_bench()
    emb, lowres, queries, boxes, target, weight = kb.make_inputs(shape, dtype, ctx.device, seed,
                                                                 edits.get("layout", "planes"))
    if "empty" in edits:
        target[target == edits["empty"]] = edits["empty"] - 1
    if "ignore_image" in edits:
        target[edits["ignore_image"]] = -1
    if edits.get("ignore_all"):
        target[:] = -1
    return emb, lowres, queries, boxes, target, weight


def check_segment_sums(ctx, inputs, seed):
    from kernels import segment_sums_triton
    from kernels.segment_sums import segment_sums as twin

    emb, _, queries, _, labels, _ = inputs
    b, d = emb.shape[:2]
    s = queries.shape[1]
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(b, s, d, generator=g).to(ctx.device)

    def run(fn, e, pr):
        e = e.detach().clone().requires_grad_()
        sums, counts = fn(e, labels, s)
        (grad,) = torch.autograd.grad((sums * pr).sum(), e)
        return {"sums": sums.detach(), "d_emb": grad}, counts

    out, counts = run(segment_sums_triton.segment_sums, emb, probe)
    ref, ref_counts = run(twin, emb.double(), probe.double())
    eager, _ = run(twin, emb, probe)
    extra = {"counts_exact": bool(torch.equal(counts.double(), ref_counts))}
    return out, ref, eager, extra


def check_loss(ctx, inputs, seed):
    from kernels import ciae_loss_triton
    from kernels.ciae_loss import embedding_loss as twin

    kb = kernel_bench()
    emb, _, queries, boxes, target, weight = inputs

    def run(fn, up):
        cast = (lambda x: x.double()) if up else (lambda x: x)
        total, grads, count = 0, {"d_emb": [], "d_queries": [], "d_weight": []}, 0
        for i in range(emb.shape[0]):
            e, q, w = (cast(x[i]).detach().clone().requires_grad_() for x in (emb, queries, weight))
            loss, n = fn(e, q, boxes[i], target[i], w, kb.MARGIN, kb.TOP_K)
            for key, gr in zip(grads, torch.autograd.grad(loss, (e, q, w))):
                grads[key].append(gr)
            total, count = total + loss.detach(), count + n.item()
        return {"loss": total, **{k: torch.stack(v) for k, v in grads.items()}}, count

    out, n = run(ciae_loss_triton.embedding_loss, False)
    ref, ref_n = run(twin, True)
    eager, _ = run(twin, False)
    return out, ref, eager, {"num_valid_exact": n == ref_n}


def _channels_last_map(shape, dtype, g, device, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=g) * scale + offset).to(device, dtype).contiguous(
        memory_format=torch.channels_last)


def _map_check(run, inputs):
    """``run(fn, *inputs)`` -> {output and gradients} for the Triton kernel, the twin on float64
    copies and the twin in the inputs' dtype: ``check_case``'s (out, ref, eager, extra)."""
    up = [t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    return run("triton", *inputs), run("twin", *up), run("twin", *inputs), {}


def check_group_norm(ctx, shape, dtype, seed):
    from kernels.group_norm import group_norm as twin
    from kernels.group_norm_triton import group_norm as triton_gn

    g = torch.Generator().manual_seed(seed)
    x = _channels_last_map(shape, dtype, g, ctx.device, 2.0, 0.5)
    weight, bias = (torch.randn(shape[1], generator=g).to(ctx.device) for _ in range(2))
    probe = _channels_last_map(shape, torch.float32, g, ctx.device)

    def run(impl, x, weight, bias):
        x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        y = (triton_gn if impl == "triton" else twin)(x, 32, weight, bias, relu=True)
        grads = torch.autograd.grad((y.float() * probe.to(y.dtype)).sum(), (x, weight, bias))
        return dict(zip(("y", "d_x", "d_weight", "d_bias"), (y.detach(), *grads)))

    return _map_check(run, (x, weight, bias))


def check_channel_affine(ctx, shape, dtype, seed):
    from kernels.channel_affine import channel_affine as twin
    from kernels.channel_affine_triton import channel_affine as triton_affine

    g = torch.Generator().manual_seed(seed)
    x, r, probe = (_channels_last_map(shape, dtype, g, ctx.device) for _ in range(3))
    constants = [torch.randn(shape[1], 1, 1, generator=g).to(ctx.device, dtype) for _ in range(4)]

    def run(impl, x, r, *constants):
        x, r = (t.detach().clone().requires_grad_() for t in (x, r))
        s, b, rs, rb = constants
        y = (triton_affine if impl == "triton" else twin)(x, s, b, r, rs, rb, True)
        grads = torch.autograd.grad((y.float() * probe.to(y.dtype)).sum(), (x, r))
        return dict(zip(("y", "d_x", "d_residual"), (y.detach(), *grads)))

    return _map_check(run, (x, r, *constants))


MAP_CHECKS = {"group_norm": check_group_norm, "channel_affine": check_channel_affine}


def reference_assign(full: torch.Tensor, queries: torch.Tensor, boxes: torch.Tensor,
                     labels: torch.Tensor):
    """full [D, H, W] float64, queries [Q, D], boxes [Q, 4], labels [H, W] (to check) ->
    (ref_labels [H*W], ref_best [H*W], ref_second [H*W], gap [H*W]: ref_best - the similarity
    of ``labels``), the twins' formulas in float64, by blocks of rows."""
    from kernels.ciae_loss import EPS

    d, h, w = full.shape
    q64, b32 = queries.double(), boxes.float()
    rows = max(1, 131072 // w)
    out = []
    for r0 in range(0, h, rows):
        e = full[:, r0:r0 + rows].reshape(d, -1)
        p = e / e.norm(dim=0, keepdim=True).clamp_min(EPS)
        s = (q64 @ p).T                                                      # [pixels, Q]
        y = torch.arange(r0, min(r0 + rows, h), device=full.device, dtype=torch.float32)
        x = torch.arange(w, device=full.device, dtype=torch.float32)
        out_y = (y[:, None] < b32[:, 1]) | (y[:, None] >= b32[:, 3])
        out_x = (x[:, None] < b32[:, 0]) | (x[:, None] >= b32[:, 2])
        s = s.masked_fill((out_y[:, None] | out_x[None]).reshape(-1, len(b32)), 0)
        best, lab = s.max(dim=1)
        second = s.scatter(1, lab[:, None], float("-inf")).amax(dim=1).clamp_min(-1)
        mine = labels[r0:r0 + rows].reshape(-1, 1)
        out.append((lab, best, second, best - s.gather(1, mine)[:, 0]))
    return (torch.cat(x) for x in zip(*out))


def upsample64(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[D, h, w] -> [D, H, W] float64: the bilinear taps of ``kernels.assign`` (PyTorch's,
    align_corners=False), combined in float64, columns first as the kernel does."""
    from kernels.assign import _linear_taps

    h, w = lowres.shape[1:]
    y0, y1, wy0, wy1 = _linear_taps(h, size[0], lowres.device)
    x0, x1, wx0, wx1 = _linear_taps(w, size[1], lowres.device)
    lo = lowres.double()
    cols = lo[:, :, x0] * wx0.double() + lo[:, :, x1] * wx1.double()          # [D, h, W]
    return cols[:, y0] * wy0.double()[:, None] + cols[:, y1] * wy1.double()[:, None]


def check_assign(ctx, inputs, upsampled: bool):
    from kernels import assign_triton
    from kernels.assign import assign as twin_assign
    from kernels.assign import assign_upsampled as twin_upsampled

    emb, lowres, queries, boxes, _, _ = inputs
    hh, ww = emb.shape[2:]
    equal = differ = far = 0
    gap_max, err2, ref2, err2_second, ref2_second, eager_equal = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    finite = True
    for i in range(emb.shape[0]):
        if upsampled:
            labels, best, second = assign_triton.assign_upsampled(lowres[i], (hh, ww), queries[i], boxes[i])
            eager = twin_upsampled(lowres[i], (hh, ww), queries[i], boxes[i])[0]
            full = upsample64(lowres[i], (hh, ww))
        else:
            labels, best, second = assign_triton.assign(emb[i], queries[i], boxes[i])
            eager = twin_assign(emb[i], queries[i], boxes[i])[0]
            full = emb[i].double()
        ref_labels, ref_best, ref_second, gap = reference_assign(full, queries[i], boxes[i], labels)
        same = labels.reshape(-1) == ref_labels
        equal += int(same.sum())
        differ += int((~same).sum())
        far += int(((~same) & (gap >= NEAR_TIE)).sum())
        gap_max = max(gap_max, float(gap.max()))
        finite &= bool(torch.isfinite(best).all() and torch.isfinite(second).all())
        err2 += float(((best.reshape(-1).double() - ref_best) ** 2).sum())
        ref2 += float((ref_best ** 2).sum())
        err2_second += float(((second.reshape(-1).double() - ref_second) ** 2).sum())
        ref2_second += float((ref_second ** 2).sum())
        eager_equal += int((eager.reshape(-1) == ref_labels).sum())
    total = equal + differ
    return {"labels_equal": equal / total, "labels_differ": differ, "not_near_tie": far,
            "max_gap": gap_max, "best_rel_err": math.sqrt(err2 / ref2) if finite else math.nan,
            "second_rel_err": math.sqrt(err2_second / ref2_second) if finite else math.nan,
            "eager_labels_equal": eager_equal / total}


def check_case(ctx: Context, shape, dtype, edits: dict, seed: int, rec: dict) -> dict:
    """Run one case on fresh inputs -> ``rec`` with its figures, ``passed`` and ``cells`` (the
    Triton figure and the eager twin's, as table cells)."""
    tol, op = rec["tol"], rec["op"]
    if op in MAP_CHECKS:
        return compare(rec, *MAP_CHECKS[op](ctx, shape, dtype, seed + 1000))
    inputs = case_inputs(ctx, shape, dtype, edits, seed)
    if op.startswith("assign"):
        res = check_assign(ctx, inputs, op == "assign_upsampled")
        rec.update(res, passed=(res["not_near_tie"] == 0 and res["best_rel_err"] < tol
                                and res["second_rel_err"] < tol))
        rec["cells"] = [f"labels {100 * res['labels_equal']:.4f}% equal ({res['labels_differ']} "
                        f"differ, {res['not_near_tie']} not near-ties); best / second rel. err "
                        f"{fmt(res['best_rel_err'], '.1e')} / {fmt(res['second_rel_err'], '.1e')}",
                        f"labels {100 * res['eager_labels_equal']:.4f}% equal"]
        return rec
    check = check_segment_sums if op == "segment_sums" else check_loss
    return compare(rec, *check(ctx, inputs, seed + 1000))


def compare(rec: dict, out: dict, ref: dict, twin_out: dict, extra: dict) -> dict:
    """``rec`` with the Triton outputs' relative errors against float64 and the eager twin's,
    ``passed`` and ``cells``."""
    tol = rec["tol"]
    errors = {key: rel(out[key], ref[key]) for key in ref}
    eager_errors = {key: rel(twin_out[key], ref[key]) for key in ref}
    worst = max(errors, key=lambda key: errors[key] if math.isfinite(errors[key]) else math.inf)
    # top-K near-ties: where the k-th and (k+1)-th terms of a pixel are within float32 noise,
    # any correct float32 kernel may keep either; the eager twin's own error shows how much
    ok = all(math.isfinite(v) and (v < tol or v <= EAGER_MULTIPLE * eager_errors[key])
             for key, v in errors.items()) and all(extra.values())
    rec.update(errors=errors, eager_errors=eager_errors, **extra, passed=ok)
    rec["cells"] = [f"{worst} {fmt(errors[worst], '.1e')}"
                    + "".join(f"; {key} {v}" for key, v in extra.items() if not v),
                    fmt(max(eager_errors.values()), ".1e")]
    return rec


def section_correctness(ctx: Context, sec) -> None:
    for k, (case, op, dtype, shape, edits) in enumerate(correctness_cases(ctx.smoke)):
        dname = "fp32" if dtype == torch.float32 else "bf16"
        what = f"{case} {op} {dname}"
        if not sec.affords(2 if ctx.smoke else 6, what):
            continue
        desc = (f"map {list(shape)}, channels-last" if isinstance(shape, tuple) else
                f"{shape.images} x {shape.height}x{shape.width}, D {shape.dim}, Q {shape.queries}")
        rec = {"case": case, "op": op, "dtype": dname, "inputs": desc, "tol": TOL[dtype],
               "passed": False, "cells": ["error (see errors)", "-"]}
        result, _ = sec.unit(op, what, functools.partial(check_case, ctx, shape, dtype, edits,
                                                         1000 + k, dict(rec)))
        if result is None and sec.faulted(op):
            rec["cells"] = ["not run: a CUDA fault earlier in this kernel", "-"]
        done = sec.entry.setdefault("cases", [])
        if not any(r["case"] == case and r["op"] == op and r["dtype"] == dname for r in done):
            done.append(result or rec)
        rows = [[r["case"], r["op"], r["dtype"], r["inputs"], *r["cells"], f"{r['tol']:g}",
                 "pass" if r["passed"] else "**FAIL**"] for r in done]
        sec.set(cases=done, n_cases=len(done), n_failed=sum(not r["passed"] for r in done),
                passed_all=all(r["passed"] for r in done),
                summary=f"{sum(r['passed'] for r in done)}/{len(done)} cases passed")
        sec.table("Triton kernels vs a float64 reference (the twins' formulas on upcast inputs)",
                  ["case", "op", "emb", "inputs", "Triton: worst rel. err",
                   "eager twin (same dtype)", "tol", "result"], rows)
    sec.note("Relative error ||out - ref|| / ||ref|| over every output (loss sum and dL/demb, "
             "dL/dqueries, dL/dweight; segment sums and dL/demb), reference in float64 on the "
             "same (upcast) inputs; a case passes under the tolerance, or within "
             f"{EAGER_MULTIPLE:g}x the eager twin's own error at the same dtype (top-K "
             "near-ties: either term is right within float32 noise); assignment: labels equal "
             "to the float64 argmax, differing labels allowed only where the two best "
             f"similarities are within {NEAR_TIE:g}. NaN never passes.")


# ---- kernels ----------------------------------------------------------------------------------

def section_kernels(ctx: Context, sec) -> None:
    kb = kernel_bench()
    env = ctx.record("env")
    if env.get("copy_tbps"):
        tbps, source = env["copy_tbps"], "measured device-to-device copy (env)"
    elif ctx.cuda:
        name = torch.cuda.get_device_name()
        tbps, source = kb.hbm_tbps(name) or 3.35, "datasheet, by device name"
    else:
        tbps, source = 3.35, "H100 datasheet (smoke: times mean nothing)"
    shape = kb.SMOKE if ctx.smoke else kb.COCO
    warmup, repeats = (0, 1) if ctx.smoke else (3, 10)     # smoke: one timed run; times mean nothing
    sec.entry.setdefault("tables_by_dtype", {})
    sec.entry.setdefault("goals", {})
    sec.set(tbps=tbps, tbps_source=source, shape=dataclasses.asdict(shape))
    summary = []
    for k, dtype in enumerate((torch.float32, torch.bfloat16)):
        dname = str(dtype).removeprefix("torch.")
        if not sec.affords(5 if ctx.smoke else 25, f"{dname} table"):
            continue
        dtype_end = time.time() + (min(30.0, (sec.left() - 15) / (2 - k)) if ctx.cuda else 60.0)
        rows = []
        for kernel, ops in KERNEL_OPS.items():     # one unit each: a CUDA fault ends its kernel
            budget = max(dtype_end - time.time(), 1.0)
            part, _ = sec.unit(kernel, f"{dname} {kernel}", functools.partial(
                kb.run_table, shape, dtype, ctx.device, tbps, warmup, repeats, compile_twins=True,
                compile_budget_s=budget, compile_backend="eager" if ctx.smoke else "inductor",
                ops=ops))
            for r in part or []:    # the compiled twin may fail or run out of time: a figure
                if "error" in r and r["impl"] != "compiled twin":
                    sec.error(f"{dname} {r['op']} {r['impl']}: {r['error']}")
            rows += part or []
            sec.entry["tables_by_dtype"][dname] = rows
            sec.lines(f"{dname} embeddings", kb.markdown(rows))
        find = {(r["op"], r["impl"]): r for r in rows}
        loss = find.get(("loss fwd+bwd", "triton"), {})
        goals = {"loss_x_eager": loss.get("x_eager"), "loss_x_eager_goal": 10,
                 "loss_peak_vs_grad": loss.get("peak_vs_grad"), "loss_peak_vs_grad_goal": 1.2,
                 "assign_pct_floor": find.get(("assign", "triton"), {}).get("pct_floor"),
                 "assign_upsampled_pct_floor":
                     find.get(("assign_upsampled", "triton"), {}).get("pct_floor"),
                 "assign_pct_floor_goal": 100 / 3}
        sec.entry["goals"][dname] = goals
        summary.append(f"{dname}: loss fwd+bwd {fmt(goals['loss_x_eager'], '.3g')}x eager")
        sec.set(summary="; ".join(summary))
    sec.note(f"Floor: the bytes each operation must move at {tbps:.3g} TB/s ({source}); "
             "goals (issue 12): loss fwd+bwd >= 10x eager with peak <= 1.2x the embedding "
             "gradient, assignment within 3x of its floor (>= 33% of floor)."
             + (" Smoke: torch.compile with the eager backend (tracing only)." if ctx.smoke
                else " torch.compile (inductor) of the twins, compilation inside its budget."))


# ---- training step ----------------------------------------------------------------------------

def section_train_step(ctx: Context, sec) -> None:
    from ciae.engine.train import to_device
    from pipeline.data.shards import read_manifest
    from pipeline.feed.stream import batch_stream

    cfg = ctx.paper_config()
    bs = 2 if ctx.smoke else 8             # the batch per worker benchmarks/gpu/jobs.py trains with
    cfg.solver = dataclasses.replace(cfg.solver, batch_size=bs)
    h, w = (64, 96) if ctx.smoke else (800, 1216)
    shards = ctx.shards("train_step", bs, 0, h, w, coco=True, things=(6, 10))
    batch = to_device(next(batch_stream(shards, cfg)), ctx.device)
    c_st = len(read_manifest(shards)["stuff_index"])
    per_image = [{"instances": len(bx), "stuff_classes": int(torch.unique(sem[sem < c_st]).numel())}
                 for bx, sem in zip(batch["boxes"], batch["sem"])]
    warmup, steps = (1, 1) if ctx.smoke else (3, 8)        # the warm-up step records the loss's shape
    amp = ctx.cuda and cfg.solver.amp
    config = f"{cfg.backbone.name} FPN, input {tuple(batch['images'].shape[2:])}, batch {bs}"
    sec.entry.setdefault("backends", {})
    sec.set(config=config, bf16_autocast=amp, images=per_image)
    sec.note("Targets: synthetic COCO-category images (pipeline.data.synth: 1-3 stuff bands, 6-10 "
             "things) through the training data path; per image: "
             + ", ".join(f"{im['stuff_classes']} stuff classes, {im['instances']} instances"
                         for im in per_image) + ".")
    sec.note("CIAE loss ms: ciae.modeling.loss.ciae_loss forward + backward measured on its own, on "
             "a random embedding of the step's shape and dtype with the step's targets and "
             "memory; loss share = that time over the whole step's (which includes it).")
    sec.note("triton+compile: the network compiled for training (CIAEModel.compile_features, "
             "dynamic shapes, inductor; on the CPU, the smoke, the eager backend); its first step, "
             "which compiles, is `first step s`; after the timed steps, one step of the other "
             "orientation (`other orientation s`, when a second compile fits the budget); `graphs` "
             "counts the graphs compiled (1: one for both orientations and no recompile).")
    rows, b = [], sec.entry["backends"]
    # (row, kernels, compiled, seconds it needs); the compiled row comes last: its first step compiles
    # forward and backward, for as long as it takes, and past the budget only that row is lost
    for row, backend, compiled, need in (("triton", "triton", False, 15), ("torch", "torch", False, 15),
                                         ("triton+compile", "triton", True, 60)):
        if not sec.affords(5 if ctx.smoke else need, f"{row} step"):
            continue
        fig, _ = sec.unit(row, f"{row} step", functools.partial(
            step_figures, ctx, sec, cfg, shards, batch, backend, warmup, steps, amp, compiled))
        if ctx.cuda:
            torch.cuda.empty_cache()
        if fig is None:
            continue
        b[row] = fig
        rows.append([row, f"{fig['images_per_s']:.2f}", f"{fig['step_ms']:.1f}", f"{fig['first_step_s']:.1f}",
                     fmt(fig["other_orientation_step_s"], ".1f"), fmt(fig["compiled_graphs"]),
                     fmt(fig["peak_gib"], ".2f"), f"{fig['loss_ms']:.1f}", f"{100 * fig['loss_share']:.1f}%"])
        sec.table(f"Training step: {config}, {'bf16 autocast' if amp else 'no autocast (CPU)'}, "
                  f"median of {steps} steps after {warmup}",
                  ["kernels", "images/s", "step ms", "first step s", "other orientation s", "graphs",
                   "peak GiB", "CIAE loss ms", "loss share"], rows)
        sec.set(summary=", ".join(f"{k} {v['images_per_s']:.2f} img/s" for k, v in b.items()))
    if {"triton", "torch"} <= set(b):
        sec.set(triton_speedup=b["triton"]["images_per_s"] / b["torch"]["images_per_s"])
    if {"triton", "triton+compile"} <= set(b):
        sec.set(compile_speedup=b["triton+compile"]["images_per_s"] / b["triton"]["images_per_s"])


def step_figures(ctx: Context, sec, cfg, shards: str, batch: dict, backend: str, warmup: int,
                 steps: int, amp: bool, compiled: bool) -> dict:
    """Images/s, step ms, first step s and peak GiB of ``Trainer.train_step`` with ``backend``
    kernels (the network compiled if ``compiled``), and the time of the CIAE loss alone (forward
    + backward) on an embedding like the step's."""
    from ciae.engine.train import Trainer
    from ciae.modeling.embedding import full_resolution
    from ciae.modeling.loss import ciae_loss
    from pipeline.feed.stream import model_for_shards

    torch.manual_seed(0)
    model = model_for_shards(cfg, shards).to(ctx.device)
    model.kernel_backend = backend
    trainer = Trainer(model)
    seen = {}

    def keep_shape(_module, _inputs, emb4):     # the full-resolution embedding the loss sees
        emb = full_resolution(emb4.detach())
        seen.update(shape=tuple(emb.shape), dtype=emb.dtype)

    # found by an eager forward before any compile: a hook added or removed later recompiles
    hook = model.embedding.register_forward_hook(keep_shape)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
        model._forward_features(batch["images"])
    hook.remove()
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_features(**({} if ctx.cuda else {"backend": "eager"}))
    ctx.sync()
    t = time.perf_counter()
    trainer.train_step(batch)
    ctx.sync()
    first_s = time.perf_counter() - t
    for _ in range(warmup - 1):
        trainer.train_step(batch)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = ctx.timed(lambda: trainer.train_step(batch), 0, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else None

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(seen["shape"], generator=g).to(ctx.device, seen["dtype"]).requires_grad_()
    memory = model.memory().detach()

    def loss_step():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            out = ciae_loss(emb, batch["sem"].long(), batch["seg"].long(), batch["boxes"], memory,
                            model.num_stuff, cfg.embedding, backend=backend)
        out["loss_ciae"].backward()
        emb.grad = None

    loss_s = ctx.timed(loss_step, 1, steps)
    other_s = None
    # last, when a second compile as long as the first still fits: does another input size compile again?
    if compiled and sec.affords(first_s + 10, "compiled step of the other orientation"):
        t = time.perf_counter()
        trainer.train_step(transposed(batch))
        ctx.sync()
        other_s = time.perf_counter() - t
    b = batch["images"].shape[0]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else None
    return {"images_per_s": b / step_s, "step_ms": 1e3 * step_s, "first_step_s": first_s, "peak_gib": peak,
            "compiled_graphs": graphs, "other_orientation_step_s": other_s,
            "loss_ms": 1e3 * loss_s, "loss_share": loss_s / step_s,
            "embedding": f"{list(seen['shape'])} {str(seen['dtype']).removeprefix('torch.')}"}


def transposed(batch: dict) -> dict:
    """A collate batch turned a quarter (H and W swapped): the same images in the other orientation."""
    turn = {k: batch[k].transpose(-2, -1).contiguous() for k in ("images", "sem", "seg")}
    return {**batch, **turn, "boxes": [bx[:, [1, 0, 3, 2]] for bx in batch["boxes"]],
            "image_sizes": [(w, h) for h, w in batch["image_sizes"]]}


# ---- inference --------------------------------------------------------------------------------

class JpegImages:
    """A map-style dataset: JPEG path -> [3, h, w] uint8 RGB at the test size, through
    ``ciae.data.transform`` (``Transform.decode_for_test``) as the labeling job's CPU tasks
    preprocess; ``Transform.batch`` collates them."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with open(self.paths[i], "rb") as f:
            return self.transform.decode_for_test(f.read())[0]


def plant_detections(model, images, sizes, wanted: tuple[int, int]) -> dict:
    """Make the untrained model's instance path run: box regression bias 4 (every box 8 strides
    wide), then one offset added to every class bias, found by bisection, so that the mean
    number of instance segments that ``predict`` outputs for ``images`` lies in ``wanted``."""
    head = model.head
    thing_ids = set(model.thing_ids)
    with torch.no_grad():
        head.box_reg.bias.fill_(4.0)
        base = head.cls_logits.bias.detach().clone()

    def instances(offset: float) -> float:
        with torch.no_grad():
            head.cls_logits.bias.copy_(base + offset)
        preds = model.predict(images, sizes)
        return float(np.mean([sum(s["category_id"] in thing_ids for s in p["segments_info"])
                              for p in preds]))

    lo, hi = 0.0, 12.0
    tried = {}
    for _ in range(10):
        mid = (lo + hi) / 2
        tried[mid] = n = instances(mid)
        if wanted[0] <= n <= wanted[1]:
            break
        lo, hi = (mid, hi) if n < wanted[0] else (lo, mid)
    offset = min(tried, key=lambda o: abs(tried[o] - sum(wanted) / 2))
    n = instances(offset)
    return {"cls_bias_offset": offset, "box_reg_bias": 4.0, "instances_per_image": n,
            "wanted": list(wanted), "in_range": wanted[0] <= n <= wanted[1]}


def section_inference(ctx: Context, sec) -> None:
    from ciae.data.transform import Transform
    from ciae.engine.predictor import Predictor
    from ciae.modeling.model import CIAEModel
    from pipeline.data.synth import coco_categories

    cfg = ctx.paper_config()
    # untrained embeddings are alike everywhere: no detection would survive the duplicate test
    cfg.inference = dataclasses.replace(cfg.inference, duplicate_similarity=1.01)
    cats = coco_categories()
    torch.manual_seed(0)
    model = CIAEModel(cfg, cats.stuff_ids, cats.thing_ids).to(ctx.device).eval()
    n_files, repeat = (8, 2) if ctx.smoke else (64, 4)
    h, w = (48, 64) if ctx.smoke else (480, 640)
    src = ctx.dataset("inference", n_files, 5, h, w, coco=True)
    paths = sorted(str(p) for p in (src / "images").glob("*.jpg"))
    transform = Transform(cfg.input)
    data = JpegImages(paths, transform)
    images, sizes = transform.batch([data[i] for i in range(8)])
    images = images.to(ctx.device)
    # ciae.engine.predictor.Predictor as the labeling job makes it (channels-last), without and
    # with bf16 autocast; and at batch 8 in bf16 a copy of the model left NCHW (the layout this
    # section measured until 2026-12-08), and cuDNN's autotuner on (torch.backends.cudnn.benchmark)
    predictors = {amp: Predictor(model, amp=amp) for amp in (False, True)}
    config = (f"{cfg.backbone.name} FPN, {n_files} synthetic {w}x{h} JPEGs at test size "
              f"{tuple(images.shape[2:])} (padded)")
    sec.set(config=config)

    planted = sec.attempt("planting detections", functools.partial(
        plant_detections, model, images, sizes, (2, 8) if ctx.smoke else (30, 60)))
    if planted:
        sec.set(planted=planted)
        sec.note(f"Untrained weights detect nothing, so detections were planted: box-regression "
                 f"bias 4 (boxes 8 strides wide) and class biases + "
                 f"{planted['cls_bias_offset']:.2f}, found by bisection so that predict outputs "
                 f"{planted['wanted'][0]}-{planted['wanted'][1]} instance segments per image: "
                 f"{planted['instances_per_image']:.1f}; the duplicate-query test is off "
                 f"(untrained embeddings are alike everywhere).")
    predictors["nchw"] = Predictor(copy.deepcopy(model).to(memory_format=torch.contiguous_format),
                                   amp=True, channels_last=False)       # after the planting: the same weights
    sec.note("predict = forward + detection + query selection + assign_upsampled + COCO panoptic "
             "assembly (ciae/modeling/inference.py), the id maps on the host. Steady = after the first "
             "batch (worker start-up excluded). Resident rows: the labeling job's Predictor "
             "(channels-last); NCHW: a copy of the model left in NCHW (this section's layout "
             "before 2026-12-08); cudnn.benchmark: cuDNN times its algorithms for each conv "
             "shape in the warm-up batches, then runs the fastest (off elsewhere, as PyTorch's "
             "default).")
    rows = []

    def add_row(*cells):
        rows.append(list(cells))
        sec.table(f"Inference: {config}", ["input", "batch", "bf16 autocast", "images/s"], rows)

    def predict(batch, size, autocast):     # the id maps reach the host in one copy
        return predictors[autocast].predict_batch(batch, size, size)

    resident = []
    runs = [(autocast, bs, "") for autocast in (False, True) for bs in (1, 8)]
    runs += [("nchw", 8, "NCHW"), (True, 8, "cudnn.benchmark")]
    for autocast, bs, variant in runs:
        what = f"batch {bs}, autocast {'off' if autocast is False else 'on'}{', ' + variant if variant else ''}"
        if not sec.affords(2 if ctx.smoke else 5, what):
            continue
        torch.backends.cudnn.benchmark = variant == "cudnn.benchmark"
        try:
            t = sec.attempt(what, functools.partial(
                ctx.timed, functools.partial(predict, images[:bs], sizes[:bs], autocast), 2,
                2 if ctx.smoke else (10 if bs == 1 else 5)))
        finally:
            torch.backends.cudnn.benchmark = False
        if t is None:
            continue
        resident.append({"batch": bs, "bf16_autocast": autocast is not False, "variant": variant or "channels-last",
                         "images_per_s": bs / t})
        sec.set(gpu_resident=resident)
        add_row(f"images on the {ctx.device.type}, {variant or 'channels-last'}", bs,
                "off" if autocast is False else "on", f"{bs / t:.1f}")
    b8 = {r["bf16_autocast"]: r["images_per_s"] for r in resident
          if r["batch"] == 8 and r["variant"] == "channels-last"}
    autocast = max(b8, key=b8.get) if b8 else False

    workers = os.cpu_count() or 1
    loader_data = JpegImages(paths * repeat, transform)

    def stream(consume) -> dict:
        """Images/s of the DataLoader feeding ``consume(batch, sizes)``: overall, and steady
        (after the first batch, so without the workers' start)."""
        loader = torch.utils.data.DataLoader(loader_data, batch_size=8, num_workers=workers,
                                             pin_memory=ctx.cuda, collate_fn=Transform.batch,
                                             prefetch_factor=4)
        t0 = time.perf_counter()
        first, count = None, 0
        for batch, size in loader:
            consume(batch, size)
            count += len(size)
            if first is None:
                first, n_first = time.perf_counter(), count
        end = time.perf_counter()
        return {"images": count, "images_per_s": count / (end - t0),
                "steady_images_per_s": (count - n_first) / (end - first) if end > first else None}

    alone = both = None
    if sec.affords(5 if ctx.smoke else 10, "loader alone"):
        alone = sec.attempt("loader alone", lambda: stream(lambda batch, size: None))
    if alone:
        sec.set(loader=alone)
        add_row(f"DataLoader alone, {workers} workers", 8, "-",
                f"{alone['images_per_s']:.1f} ({fmt(alone['steady_images_per_s'], '.1f')} steady)")
    if sec.affords(5 if ctx.smoke else 15, "loader + predict"):
        both = sec.attempt("loader + predict", lambda: stream(
            lambda batch, size: predict(batch.to(ctx.device, non_blocking=True), size, autocast)))
    if both:
        both["bf16_autocast"] = autocast
        sec.set(end_to_end=both)
        add_row(f"DataLoader ({workers} workers) + predict", 8, "on" if autocast else "off",
                f"{both['images_per_s']:.1f} ({fmt(both['steady_images_per_s'], '.1f')} steady)")
    model_ips = b8.get(autocast)
    loader_ips = sec.entry.get("loader", {}).get("steady_images_per_s")
    if model_ips and loader_ips:
        limit = ("CPU side: JPEG decode and resize" if loader_ips < model_ips
                 else "model side: predict (device work and its CPU post-processing)")
        sec.set(limited_by=limit)
        sec.note(f"At batch 8, predict on resident images runs {model_ips:.1f} img/s and the "
                 f"loader alone {loader_ips:.1f} img/s: the {limit} limits labeling.")
    sec.set(summary=f"batch 8: {fmt(model_ips, '.1f')} img/s resident, "
                    f"{fmt(sec.entry.get('end_to_end', {}).get('steady_images_per_s'), '.1f')} "
                    f"img/s from JPEG")


# ---- end-to-end numerics ----------------------------------------------------------------------

def section_e2e_numerics(ctx: Context, sec) -> None:
    from ciae.engine.train import Trainer, scale_schedule, to_device
    from kernels import dispatch
    from pipeline.evaluation.validation import evaluate
    from pipeline.feed.stream import batch_stream, model_for_shards

    cfg = ctx.small_config()
    steps = 20 if ctx.smoke else cfg.solver.iterations
    n_train, n_val, size = (8, 4, 64) if ctx.smoke else (256, 48, 192)
    train = ctx.shards("e2e_train", n_train, 0, size, size)
    val = ctx.shards("e2e_val", n_val, 1000, size, size)
    cfg.solver = scale_schedule(cfg.solver, steps)
    torch.manual_seed(cfg.solver.seed)
    model = model_for_shards(cfg, train).to(ctx.device)
    trainer = Trainer(model)
    stream = batch_stream(train, cfg)        # the plan seeded by cfg.solver.seed (0)
    backend = next(name for name, b in dispatch.BACKENDS.items()
                   if b.accepts(torch.empty(0, device=ctx.device)))
    sec.set(steps_planned=steps, train_images=n_train, val_images=n_val, size=size,
            backend=backend, bf16_autocast=ctx.cuda and cfg.solver.amp)
    reserve = 3 if ctx.smoke else 15           # for the evaluation
    t0 = time.perf_counter()
    losses = []
    while trainer.step < steps:
        if sec.left() < reserve:
            sec.skip(f"steps {trainer.step}-{steps} (budget spent)")
            break
        losses.append(trainer.train_step(to_device(next(stream), ctx.device))["loss"])
        if trainer.step % 100 == 0:
            sec.set(steps=trainer.step, train_s=time.perf_counter() - t0)
    train_s = time.perf_counter() - t0
    final_loss = float(np.mean(losses[-20:])) if losses else None
    sec.set(steps=trainer.step, train_s=train_s, steps_per_s=trainer.step / train_s,
            final_loss=final_loss, summary=f"{trainer.step} steps trained (evaluating)")
    result = sec.attempt("held-out PQ", functools.partial(evaluate, model, val))
    if result is None:
        return
    pq = result["All"]
    full = trainer.step == cfg.solver.iterations and not ctx.smoke
    sec.set(pq=pq["pq"], sq=pq["sq"], rq=pq["rq"], pq_things=result["Things"]["pq"],
            pq_stuff=result["Stuff"]["pq"], in_band=(pq["pq"] >= PQ_BAND) if full else None,
            summary=f"PQ {pq['pq']:.3f} after {trainer.step} steps"
                    + ("" if not full else (" (in band)" if pq["pq"] >= PQ_BAND
                                            else " (BELOW the CPU band)")))
    sec.table(f"Config.small() on {n_train} synthetic {size}x{size} images, {trainer.step} "
              f"steps, kernels {backend}, held-out {n_val} images",
              ["steps", "train s", "steps/s", "PQ", "SQ", "RQ", "PQ things", "PQ stuff",
               "loss (last 20)"],
              [[trainer.step, f"{train_s:.1f}", f"{trainer.step / train_s:.2f}",
                f"{pq['pq']:.3f}", f"{pq['sq']:.3f}", f"{pq['rq']:.3f}",
                f"{result['Things']['pq']:.3f}", f"{result['Stuff']['pq']:.3f}",
                fmt(final_loss, ".3f")]])
    sec.note(f"Band: CPU training reaches PQ 0.69-0.75 at 700-900 steps (benchmarks/RESULTS.md); "
             f"PQ >= {PQ_BAND} after the full schedule counts as in band"
             + (" (smoke: 20 steps, band not applied)." if ctx.smoke else "."))
