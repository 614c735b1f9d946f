"""Registers and stack (spill) bytes per thread of each Triton kernel, compiled ahead of time for
an NVIDIA architecture at the GPU launch configuration the launchers read from their autotune
tables (COCO sizes by default: D = 32, Q = 113 -> Q_PAD 128, 113 segments; GroupNorm and
channel_affine maps of 256 channels), and its global memory accesses: how many of the PTX's loads and stores move 16
bytes at once (``ld/st.global.v4.b32``) and how many move less (coalescing and vector width,
per layout: ``--layout``). Each kernel is compiled as Triton's JIT specialises a launch at COCO
sizes: an integer argument equal to 1 (a unit stride) becomes a constant, one divisible by 16 is
marked so, and every pointer is 16-byte aligned. Needs no GPU: Triton compiles to a cubin with its
bundled ptxas and ``cuobjdump --dump-resource-usage`` reads it. This is how the tile sizes were
chosen without a GPU; timings still need ``run.py`` on one.

The figures depend on the Triton version (its code generation and bundled ptxas): run it through
``resources.sh``, which runs it with the GPU machine's Triton; the header names the version used.

    bash benchmarks/kernels/resources.sh [--arch 90] [--dtype bf16] [--queries 200]
    .venv/bin/python benchmarks/kernels/resources.py [...]   # with whatever Triton the venv has
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="embedding dtype (default fp32)")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension D (default 32)")
    p.add_argument("--queries", type=int, default=113,
                   help="queries Q, also the segments of segment_sums (default 113)")
    p.add_argument("--layout", default="pixels", choices=["pixels", "planes"],
                   help="the embedding map's layout: pixel-major (channels-last, as training and "
                        "labeling make it; default) or planes (contiguous)")
    p.add_argument("--channels", type=int, default=256,
                   help="channels of the GroupNorm and channel_affine maps (in --dtype; default 256, the head's)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)       # compile, do not interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import assign_triton as A
    from kernels import channel_affine_triton as CA
    from kernels import ciae_loss_triton as L
    from kernels import group_norm_triton as G
    from kernels import segment_sums_triton as S
    from ciae.modeling.backbone import group_count
    from kernels.triton_blocks import Tile, pad16, tile_for

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", args.arch, 32)
    e = "*" + args.dtype
    f32, i64, i32 = "*fp32", "*i64", "*i32"
    d_pad, q_pad = pad16(args.dim), pad16(args.queries)
    tiles = dict(D_PAD=d_pad, Q_PAD=q_pad, DOT="tf32x3")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    s_block = min(64, pad16(args.queries))
    fwd, bwd = tile_for(L.LOSS_FWD_TILES, q_pad, dtype), tile_for(L.LOSS_BWD_TILES, q_pad, dtype)
    q_tile = A.query_tile(args.queries)
    asg = tile_for(A.ASSIGN_TILES, q_tile, dtype)
    ups = tile_for(A.ASSIGN_UPSAMPLED_TILES, q_tile, dtype)
    assign_consts = dict(D_PAD=d_pad, Q_TILE=q_tile, DOT="tf32x3")
    seg = tile_for(S.SEGMENT_SUMS_TILES, s_block, dtype)
    seg_bwd = tile_for(S.SEGMENT_SUMS_BWD_TILES, d_pad, dtype)
    strides = dict(s_d="i32", s_p="i32")
    loss = dict(e_ptr=e, qt_ptr=f32, box_ptr=f32, t_ptr=i64, w_ptr=e, c_ptr=f32, n="i32",
                width="i32", Q="i32", D="i32", top_k="i32", **strides)
    assign = dict(e_ptr=e, qt_ptr=f32, bt_ptr=f32, valid_ptr="*i1", end_ptr=i32, lab_ptr=i64, best_ptr=f32,
                  second_ptr=f32, n="i32", width="i32", QA="i32", D="i32", **strides)
    taps = {f"{a}_ptr": (i32 if a[0] == "r" else f32)
            for a in ("ry0", "ry1", "wy0", "wy1", "rx0", "rx1", "wx0", "wx1")}
    sums = dict(lab_ptr=i64, n="i32", S="i32", D="i32", **strides)
    c_pad = triton.next_power_of_2(args.channels)
    gn_tile = Tile(max(1, G.ELEMENTS // c_pad), 8)
    gn = dict(x_ptr=e, st_ptr=f32, w_ptr=f32, b_ptr=f32, HW="i32", C="i32", G="i32", CG="i32", sN="i32",
              sC="i32", sP="i32", count="fp32", eps="fp32", chunk="i32")
    gn_consts = dict(C_PAD=c_pad, BLOCK_P=gn_tile.block)
    ca_tile = Tile(max(1, CA.ELEMENTS // c_pad), 8)
    ca = dict(s_ptr=e, HW="i32", C="i32", C_BLOCKS="i32", sN="i32", sC="i32", sP="i32")
    ca_consts = dict(BLOCK_C=c_pad, BLOCK_P=ca_tile.block, RES=2, RELU=True, ACC=tl.float32)
    # The integer arguments at COCO sizes (800 x 1216, its stride-4 map 200 x 304; GroupNorm on the
    # head's P3, 100 x 152, channels-last), which the launch specialises as Triton's JIT does:
    # a 1 compiles as a constant, a multiple of 16 as known divisible by 16 (alignment, vector
    # widths); every pointer is 16-byte aligned (PyTorch's allocations).
    n, hw = 800 * 1216, 100 * 152
    groups = group_count(args.channels)
    values = dict(n=n, width=1216, Q=args.queries, QA=triton.cdiv(args.queries, q_tile) * q_tile,
                  D=args.dim, top_k=5, S=args.queries,
                  num_blocks=triton.cdiv(n, bwd.block), lo_n=200 * 304, lo_w=304,
                  s_d=1 if args.layout == "pixels" else n, s_p=args.dim if args.layout == "pixels" else 1,
                  HW=hw, C=args.channels, C_BLOCKS=1, G=groups, CG=args.channels // groups, sN=args.channels * hw,
                  sC=1, sP=args.channels, chunk=gn_tile.block * triton.cdiv(triton.cdiv(hw, gn_tile.block), 33))
    specs = [
        ("loss forward", L._loss_fwd_kernel, dict(loss, loss_ptr=f32, count_ptr=i32),
         dict(tiles, BLOCK=fwd.block), fwd),
        *((f"loss backward {tag}", L._loss_bwd_kernel,
           dict(loss, gl_ptr=f32, ge_ptr=e, gw_ptr=f32, gq_ptr=f32, num_blocks="i32"),
           dict(tiles, BLOCK=bwd.block, NEED_E=ne, NEED_Q=nq, NEED_W=nw), bwd)
          for tag, (ne, nq, nw) in (("de", (True, False, False)), ("de+dq", (True, True, False)),
                                    ("de+dq+dw", (True, True, True)))),
        ("assign", A._assign_kernel, assign, dict(assign_consts, BLOCK=asg.block), asg),
        ("assign_upsampled", A._assign_upsampled_kernel,
         dict(assign, **taps, lo_n="i32", lo_w="i32"), dict(assign_consts, BLOCK=ups.block), ups),
        ("segment_sums forward", S._segment_sums_kernel,
         dict(sums, e_ptr=e, sums_ptr=f32, counts_ptr=f32),
         dict(D_PAD=d_pad, S_BLOCK=s_block, BLOCK=seg.block, DOT="tf32x3"), seg),
        ("segment_sums backward", S._segment_sums_bwd_kernel, dict(sums, gs_ptr=f32, ge_ptr=e),
         dict(D_PAD=d_pad, BLOCK=seg_bwd.block), seg_bwd),
        ("group_norm statistics", G._stats_kernel, gn, gn_consts, gn_tile),
        ("group_norm apply", G._apply_kernel, dict(gn, y_ptr=e), dict(gn_consts, RELU=True), gn_tile),
        ("group_norm backward sums", G._bwd_sums_kernel, dict(gn, y_ptr=e, dy_ptr=e, gs_ptr=f32, cs_ptr=f32),
         dict(gn_consts, RELU=True), gn_tile),
        ("group_norm backward dx", G._bwd_dx_kernel, dict(gn, y_ptr=e, dy_ptr=e, dx_ptr=e, gs_ptr=f32),
         dict(gn_consts, RELU=True), gn_tile),
        ("channel_affine forward", CA._forward_kernel,
         dict(ca, x_ptr=e, b_ptr=e, r_ptr=e, rs_ptr=e, rb_ptr=e, y_ptr=e), ca_consts, ca_tile),
        ("channel_affine backward", CA._backward_kernel,
         dict(ca, dy_ptr=e, y_ptr=e, rs_ptr=e, dx_ptr=e, dr_ptr=e), ca_consts, ca_tile),
    ]
    print(f"sm_{args.arch}, emb {args.dtype} {args.layout}, D = {args.dim}, Q = {args.queries}, "
          f"triton {triton.__version__} ({Path(triton.__file__).parent})\n")
    print("| kernel | pixels/program | warps | stages | registers | stack bytes "
          "| global loads: 16-byte / other | stores: 16-byte / other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, fn, sig, consts, tile in specs:
        names = fn.arg_names
        unset = [a for a in names if a not in sig and a not in consts]
        if unset:       # an argument added to the kernel since: it would compile as a constexpr
            raise SystemExit(f"{name}: no type or value for {', '.join(unset)} in resources.py")
        consts, attrs = dict(consts), {}
        for a in names:
            kind = sig.get(a, "")
            if kind == "i32" and values.get(a) == 1:
                consts[a] = 1
            elif kind.startswith("*") or (kind == "i32" and values.get(a, 1) % 16 == 0):
                attrs[(names.index(a),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, {a: "constexpr" if a in consts else sig[a] for a in names},
                        constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        compiled = triton.compile(src, target=target, options=tile.options())
        cubin, ptx = compiled.asm["cubin"], compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        reg = re.search(r"REG:(\d+)", usage).group(1)
        stack = re.search(r"STACK:(\d+)", usage).group(1)
        block = consts.get("BLOCK", consts.get("BLOCK_P"))
        access = {op: [len(re.findall(rf"\b{op}\.global\.v4\.b32", ptx)),
                       len(re.findall(rf"\b{op}\.global(?!\.v4\.b32)[.a-z0-9]*", ptx))]
                  for op in ("ld", "st")}
        print(f"| {name} | {block} | {tile.num_warps} | {tile.num_stages or 'default'} | {reg} | {stack} "
              f"| {access['ld'][0]} / {access['ld'][1]} | {access['st'][0]} / {access['st'][1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
