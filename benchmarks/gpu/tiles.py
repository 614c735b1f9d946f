"""The ``tiles`` section of benchmarks/gpu/suite.py: time candidate launch configurations of each
Triton kernel per shape class, and propose its autotune table.

The launchers read their ``Tile`` (pixels per program, warps, pipeline stages) from a table
beside each kernel, keyed by (size class, dtype class) (``kernels.triton_blocks.tile_for``). For
each group (kernel, class, dtype), in order of importance, this sets the table entry to each
candidate in turn, times the kernel on one COCO-sized image (800 x 1216, D = 32; the loss:
Q = 60, 113 or 153 queries for Q_PAD 64, 128, 256; the assignment, whose class is its query
tile: labeling's 153 slots, 83 of them valid, 53 stuff and 30 instances) and checks that its
outputs agree with the current tile's: within 1e-3 (labels: 99.99% equal), or within 4x of
how far the eager twin's outputs lie from the current tile's (top-K near-ties in the loss:
another summation order may keep the other term). The best agreeing candidate replaces the
entry in the proposal when it is at least 3% faster. Each group is one unit of the suite: a
CUDA fault ends its kernel's groups only. Groups left when the time runs out are listed as
skipped; the proposal keeps their entries. OUT/tiles.json holds every timing and the proposed
tables as Python, ready to paste.
"""

from __future__ import annotations

import functools
import json

import torch
from sections import EAGER_MULTIPLE, kernel_bench

from kernels import assign_triton, ciae_loss_triton, dispatch, segment_sums_triton
from kernels.triton_blocks import Tile, dtype_class
from pipeline.data.storage import write_uri

TABLES = {"loss fwd": (ciae_loss_triton, "LOSS_FWD_TILES"),
          "loss bwd": (ciae_loss_triton, "LOSS_BWD_TILES"),
          "assign": (assign_triton, "ASSIGN_TILES"),
          "assign_upsampled": (assign_triton, "ASSIGN_UPSAMPLED_TILES"),
          "segment_sums": (segment_sums_triton, "SEGMENT_SUMS_TILES"),
          "segment_sums bwd": (segment_sums_triton, "SEGMENT_SUMS_BWD_TILES")}
SIMILARITY = [Tile(32, 4), Tile(64, 4), Tile(128, 8), Tile(64, 8), Tile(32, 8), Tile(128, 4)]
CANDIDATES = {"loss fwd": SIMILARITY, "assign": SIMILARITY, "assign_upsampled": SIMILARITY,
              "loss bwd": [Tile(16, 8), Tile(16, 2), Tile(32, 4), Tile(16, 4, 1), Tile(32, 8),
                           Tile(16, 4, 2)],
              "segment_sums": [Tile(32, 4), Tile(128, 8), Tile(64, 4), Tile(32, 8)],
              "segment_sums bwd": [Tile(256, 4), Tile(64, 4), Tile(256, 8), Tile(128, 8)]}
BF16, FP32 = torch.bfloat16, torch.float32
# Training runs the loss under bf16 autocast at Q_PAD 64 (CAE: 54 categories; IAE: 53 stuff + a
# few instances) or 128; inference assigns 53 stuff + up to 100 instance queries, in tiles of 64.
GPU_GROUPS = [("loss bwd", 64, BF16), ("loss bwd", 128, BF16), ("loss fwd", 64, BF16),
              ("loss fwd", 128, BF16), ("segment_sums", 64, BF16),
              ("segment_sums bwd", 32, BF16), ("assign_upsampled", 64, BF16),
              ("loss bwd", 128, FP32), ("loss fwd", 128, FP32), ("assign_upsampled", 64, FP32),
              ("assign", 64, FP32), ("segment_sums", 64, FP32), ("segment_sums bwd", 32, FP32),
              ("loss bwd", 256, BF16), ("loss fwd", 256, BF16), ("assign", 64, BF16)]
SMOKE_GROUPS = [(kernel, 32 if kernel == "segment_sums bwd" else 16, FP32) for kernel in TABLES]
QUERIES = {16: 9, 64: 60, 128: 113, 256: 153}      # Q_PAD class -> queries (53 stuff + the rest)
SLOTS, KEPT = 153, 83      # the assignment: labeling's query slots, and the valid ones among them
FASTER = 0.97              # a candidate replaces the entry when it takes < 97% of the time
AGREE = 1e-3               # outputs of another tile: relative error below this, labels 99.99%


def make_run(kernel: str, cls: int, dtype, device, smoke: bool, backend: str = "triton"):
    """() -> outputs of one launch of ``kernel`` by ``backend`` (a backward alone, dL/demb and
    dL/dqueries: its forward ran once). Segment sums: 113 segments (53 stuff + 60 instances);
    the assignment: ``SLOTS`` queries, the first ``KEPT`` valid."""
    kb = kernel_bench()
    q = 9 if smoke else SLOTS if kernel.startswith("assign") else QUERIES[
        128 if kernel.startswith("segment") else cls]
    stuff = 5 if smoke else 53
    h, w = (24, 40) if smoke else (800, 1216)
    shape = kb.Shape(1, h, w, 32, stuff, q - stuff)
    emb, lowres, queries, boxes, target, weight = kb.make_inputs(shape, dtype, device, seed=cls)
    e, qs, bx, t, w = emb[0], queries[0], boxes[0], target[0], weight[0]
    size = emb.shape[2:]
    on = functools.partial   # the dispatch functions, bound to the backend
    loss = on(dispatch.embedding_loss, backend=backend)
    if kernel == "loss fwd":
        return lambda: loss(e, qs, bx, t, w, kb.MARGIN, kb.TOP_K)
    if kernel == "loss bwd":
        e, qs = e.clone().requires_grad_(), qs.clone().requires_grad_()
        total, _ = loss(e, qs, bx, t, w, kb.MARGIN, kb.TOP_K)
        return lambda: torch.autograd.grad(total, (e, qs), retain_graph=True)
    valid = torch.arange(q, device=device) < (q - 2 if smoke else KEPT)
    if kernel == "assign":
        return lambda: dispatch.assign(e, qs, bx, valid=valid, backend=backend)
    if kernel == "assign_upsampled":
        return lambda: dispatch.assign_upsampled(lowres[0], size, qs, bx, valid=valid, backend=backend)
    if kernel == "segment_sums":
        return lambda: dispatch.segment_sums(emb, target, q, backend=backend)
    e4 = emb.clone().requires_grad_()
    sums, _ = dispatch.segment_sums(e4, target, q, backend=backend)
    probe = torch.randn_like(sums)
    return lambda: torch.autograd.grad(sums, e4, probe, retain_graph=True)


def distances(out, ref) -> list[float]:
    """Per output: the share of labels that differ (int64), else the relative error."""
    return [(a != r).float().mean().item() if a.dtype == torch.int64 else
            ((a.double() - r.double()).norm() / r.double().norm().clamp_min(1e-300)).item()
            for a, r in zip(out, ref)]


def agrees(out, ref, noise: list[float]) -> bool:
    """Whether another tile's outputs match the current tile's: within AGREE (labels: 99.99%
    equal) or within EAGER_MULTIPLE times ``noise``, the eager twin's distance from them."""
    return all(d <= max(1e-4 if a.dtype == torch.int64 else AGREE, EAGER_MULTIPLE * n)
               for d, a, n in zip(distances(out, ref), out, noise))


def tile_source(t: Tile) -> str:
    stages = "" if t.num_stages is None else f", {t.num_stages}"
    return f"Tile({t.block}, {t.num_warps}{stages})"


def table_source(name: str, table: dict) -> str:
    """The table as the Python of its module: one line per size class, fp32 then bf16."""
    lines = [f"{name} = {{"]
    for c in sorted({c for c, _ in table}):
        lines.append(f'    ({c}, "fp32"): {tile_source(table[c, "fp32"])}, '
                     f'({c}, "bf16"): {tile_source(table[c, "bf16"])},')
    return "\n".join(lines + ["}"])


def section_tiles(ctx, sec) -> None:
    groups = SMOKE_GROUPS if ctx.smoke else GPU_GROUPS
    warmup, repeats = (1, 2) if ctx.smoke else (2, 20)
    per_candidate = 1 if ctx.smoke else 8         # seconds: a compile and the timing
    proposal = {k: dict(getattr(*v)) for k, v in TABLES.items()}
    measured, rows = [], []
    sec.note("Tile(pixels per program, warps[, pipeline stages]); class = Q_PAD (loss), the "
             "query tile (assignment), S_BLOCK (segment sums) or D_PAD (segment sums backward). A "
             "candidate replaces an entry when it takes under 97% of the current time and its "
             "outputs agree."
             + (" Smoke: under the interpreter tiles do not apply and times mean nothing."
                if ctx.smoke else ""))
    for kernel, cls, dtype in groups:
        what = f"{kernel} {cls} {dtype_class(dtype)}"
        if not sec.affords(2 * per_candidate, what):
            continue
        group, _ = sec.unit(kernel.split()[0], what, functools.partial(
            time_group, ctx, sec, kernel, cls, dtype, warmup, repeats, per_candidate))
        if group is None:
            continue
        if "proposed" in group:
            proposal[kernel][cls, group["dtype"]] = next(
                t for t in CANDIDATES[kernel] + [getattr(*TABLES[kernel])[cls, group["dtype"]]]
                if tile_source(t) == group["proposed"])
        if "current_ms" in group:
            timed = [t for t in group["tried"] if "ms" in t]
            rows.append([kernel, cls, group["dtype"], group["current"],
                         f"{group['current_ms']:.3f}", group["best"], f"{group['best_ms']:.3f}",
                         f"{group['speedup']:.2f}x", len(timed),
                         "yes" if all(t["agrees"] for t in timed) else "no"])
        measured.append(group)
        report(ctx, sec, measured, rows, proposal)
    report(ctx, sec, measured, rows, proposal)


def time_group(ctx, sec, kernel: str, cls: int, dtype, warmup: int, repeats: int,
               per_candidate: float) -> dict:
    """Every candidate tile of one (kernel, class, dtype): median ms and agreement with the
    current tile's outputs; the best agreeing one as ``proposed`` when it is 3% faster."""
    dname = dtype_class(dtype)
    what = f"{kernel} {cls} {dname}"
    table = getattr(*TABLES[kernel])
    key = (cls, dname)
    current = table[key]
    run = make_run(kernel, cls, dtype, ctx.device, ctx.smoke)
    twin = make_run(kernel, cls, dtype, ctx.device, ctx.smoke, backend="torch")()
    tried, ref, noise = [], None, None
    for tile in [current] + [c for c in CANDIDATES[kernel] if c != current]:
        if sec.left() < per_candidate:
            sec.skip(f"{what}: candidates from {tile_source(tile)} on (budget spent)")
            break
        table[key] = tile
        try:
            ms = 1e3 * ctx.timed(run, warmup, repeats)
            out = run()
        except Exception as exc:     # a configuration that does not compile or launch
            tried.append({"tile": tile_source(tile),
                          "error": f"{type(exc).__name__}: {exc}"[:160]})
            continue
        finally:
            table[key] = current
        if ref is None:
            ref, noise = out, distances(twin, out)
        tried.append({"tile": tile_source(tile), "ms": ms, "agrees": agrees(out, ref, noise)})
    group = {"kernel": kernel, "class": cls, "dtype": dname, "tried": tried,
             "twin_distance": noise}
    timed = [t for t in tried if "ms" in t]
    if timed and timed[0]["tile"] == tile_source(current):
        best = min((t for t in timed if t["agrees"]), key=lambda t: t["ms"])
        group.update(current=timed[0]["tile"], current_ms=timed[0]["ms"], best=best["tile"],
                     best_ms=best["ms"], speedup=timed[0]["ms"] / best["ms"])
        if best["ms"] < FASTER * timed[0]["ms"]:
            group["proposed"] = best["tile"]
    return group


def report(ctx, sec, measured: list[dict], rows: list[list], proposal: dict) -> None:
    """The section's figures, its tables in results.md and OUT/tiles.json, as they stand."""
    changed = [k for k in TABLES if proposal[k] != getattr(*TABLES[k])]
    files = {}
    for kernel, (module, name) in TABLES.items():
        files.setdefault(f"kernels/{module.__name__.split('.')[-1]}.py", []).append(
            table_source(name, proposal[kernel]))
    doc = {"smoke": ctx.smoke, "groups": measured,
           "changed_tables": [TABLES[k][1] for k in changed],
           "proposal_py": {f: "\n".join(t) for f, t in files.items()}}
    write_uri(str(ctx.out / "tiles.json"), json.dumps(doc, indent=1).encode())
    best = max((g.get("speedup", 1.0) for g in measured), default=1.0)
    sec.set(groups=measured, changed_tables=doc["changed_tables"], best_speedup=best,
            summary=f"{len(rows)} groups timed, best speed-up {best:.2f}x, tables changed: "
                    f"{', '.join(doc['changed_tables']) or 'none'}")
    sec.table("Candidate tiles per (kernel, size class, dtype), one COCO-sized image",
              ["kernel", "class", "emb", "current", "ms", "best", "ms", "speed-up", "tried",
               "outputs agree"], rows)
    for f in sorted({f"kernels/{TABLES[k][0].__name__.split('.')[-1]}.py" for k in changed}):
        sec.lines(f"Proposed tables for {f} (the file's tables, in full)",
                  ["```python", *doc["proposal_py"][f].splitlines(), "```"])
