"""Host cost per image of the labeling job's CPU stages at COCO size, in one process, no Ray, no
model: how many CPU cores keep a GPU labeling at a given rate fed.

Inputs: N JPEGs at 640x480 (quality 90), made from the real COCO sample's photos
(``tests/data/coco_sample``: resized to 640x480, each copy with its own crop, flip and
brightness, so that the files decode as photos do); per image a synthetic predicted id map at
640x480 (``--stuff`` stuff regions with warped borders and ``--things`` overlapping elliptic
instances on them, ids 1..n as the model's) and a ground truth made from it (regions moved and
resized, some instances dropped, thin void borders), written as COCO panoptic PNGs and a JSON.
The input is planned as ``ciae label`` plans it (``pipeline.label.sources.make_plan``).

Timed, per image, over --runs runs after one warm-up run (median and min-max), as this process's
CPU time (what a core spends, little moved by other load on the machine) and wall time:

* ``decode``: ``pipeline.label.stages.decode`` on chunks of ``DECODE_BATCH`` plan entries: the
  file read, JPEG decode, EXIF turn, resize to the test size of the paper's config (shorter side
  800: 640x480 -> 1067x800) into [3, h, w]; and its parts timed alone on the same files (the
  image decode, a JPEG at least 3x its test size at a reduced scale, and its baseline in full;
  the resize and its baseline, PIL's ``Image.resize`` into [h, w, 3], as decode did before);
* ``encode``: ``pipeline.label.stages.encode`` on labeled rows (decode's columns, the synthetic id
  maps and segments) in batches of --batch-size, each batch's rows written as one part of a
  fresh ``LabelStore``: the COCO panoptic PNG, RLE of the thing segments, per-image PQ against
  the ground truth PNG (read and decoded) when given; once with ground truth, once without; and
  its parts timed alone on the same rows (PNG, RLE and its per-mask baseline, PQ, part write);
* ``Transform.batch``: the model actor's host work before the device, padding a batch of
  --batch-size decoded images into one uint8 tensor.

Cores for R images/s: ``R * CPU ms per image / 1000`` per stage, summed (decode + encode run as Ray
tasks on the CPUs the model actors leave; the batch is made in the actor's own process). Ray adds
per block its own costs on top (object store writes and reads of the decoded images, about
2.5 MB each at 1067x800), so these are floors. Nothing is asserted.

    python benchmarks/label/host.py                         # 64 images, 5 runs
    python benchmarks/label/host.py --images 256 --runs 7 --rate 300 --json host.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

COCO_SAMPLE = ROOT / "tests" / "data" / "coco_sample" / "input_images"


# ---------------------------------------------------------------------------- inputs


def make_jpegs(folder: str, n: int, height: int, width: int, quality: int = 90) -> list[str]:
    """``n`` photo JPEGs at ``width`` x ``height``: the COCO sample's photos, each copy scaled up
    by 0-30 %, cropped at a random place, flipped half the time and brightened or darkened by up
    to 15 %. Returns the file names."""
    os.makedirs(folder, exist_ok=True)
    photos = [Image.open(COCO_SAMPLE / name).convert("RGB") for name in sorted(os.listdir(COCO_SAMPLE))]
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        scale = 1 + 0.3 * rng.random()
        big = photos[k % len(photos)].resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
        im = big.crop((x, y, x + width, y + height))
        if k % 2:
            im = ImageOps.mirror(im)
        im = ImageEnhance.Brightness(im).enhance(0.85 + 0.3 * rng.random())
        names.append(f"{k:06d}.jpg")
        im.save(os.path.join(folder, names[-1]), quality=quality)
    return names


def _regions(h: int, w: int, seeds: np.ndarray, phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-seed regions of an [h, w] map, the coordinates warped by sines (irregular borders):
    (index of the nearest seed, distance margin to the second nearest)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wy = yy + 18 * np.sin(xx / 37 + phase) + 7 * np.sin(xx / 11 + 2 * phase)
    wx = xx + 18 * np.sin(yy / 41 - phase) + 7 * np.sin(yy / 13 + 3 * phase)
    d = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    two = np.partition(d, 1, axis=0)[:2]
    return d.argmin(0), np.sqrt(two[1]) - np.sqrt(two[0])


def make_maps(k: int, h: int, w: int, n_stuff: int, n_things: int, stuff_ids: list[int],
              thing_ids: list[int]) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """Image ``k``'s (predicted id map, its segments, ground-truth id map, its segments): stuff
    regions with warped borders under overlapping elliptic instances, ids 1..n in each map; the
    ground truth has the regions moved, the instances shifted and resized, one in six dropped,
    and 2-pixel void borders between stuff regions."""
    rng = np.random.default_rng(1000 + k)
    seeds = rng.uniform((0, 0), (h, w), size=(n_stuff, 2)).astype(np.float32)
    stuff_cats = rng.choice(stuff_ids, n_stuff, replace=False)
    things = [(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 70), rng.uniform(8, 70),
               int(rng.choice(thing_ids))) for _ in range(n_things)]
    def paint(seeds, phase, things, void: bool):
        region, margin = _regions(h, w, seeds, phase)
        labels = region.astype(np.int32) + 1                      # 1..n_stuff
        cats = {s + 1: int(c) for s, c in enumerate(stuff_cats)}
        if void:
            labels[margin < 1.0] = 0
        for j, (cy, cx, ry, rx, cat) in enumerate(things):
            y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
            x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            labels[y0:y1, x0:x1][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = n_stuff + 1 + j
            cats[n_stuff + 1 + j] = cat
        # ids 1..n in order of appearance, segments with area and bbox as the model gives them
        present = np.unique(labels)
        present = present[present > 0]
        remap = np.zeros(n_stuff + n_things + 1, np.int32)
        remap[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        ids = remap[labels]
        flat = ids.ravel()
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ys, xs = order // w, order % w
        box = [np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts),
               np.maximum.reduceat(xs, starts), np.maximum.reduceat(ys, starts)]
        area = np.diff(np.r_[starts, len(flat)])
        segments = []
        for g, new in enumerate(ordered[starts].tolist()):
            if new:
                x0, y0, x1, y1 = (int(b[g]) for b in box)
                segments.append({"id": new, "category_id": cats[int(present[new - 1])], "iscrowd": 0,
                                 "area": int(area[g]), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                                 "score": float(rng.uniform(0.3, 1))})
        return ids, segments

    pred, pred_segments = paint(seeds, 0.0, things, void=False)
    moved = seeds + rng.normal(0, 12, seeds.shape).astype(np.float32)
    kept = [(cy + rng.normal(0, 3), cx + rng.normal(0, 3), ry * rng.uniform(0.85, 1.15),
             rx * rng.uniform(0.85, 1.15), cat) for j, (cy, cx, ry, rx, cat) in enumerate(things) if j % 6 != 5]
    gt, gt_segments = paint(moved, 0.4, kept, void=True)
    for s in gt_segments:
        del s["score"]
    return pred, pred_segments, gt, gt_segments


def make_input(root: str, n: int, h: int, w: int, n_stuff: int, n_things: int):
    """The JPEGs, the ground truth (PNGs + JSON) and the plan of ``root``; returns (plan, the
    predicted (ids, segments) by image id, categories)."""
    from pipeline.data.panoptic_png import encode_id_png
    from pipeline.data.synth import coco_categories
    from pipeline.label.sources import make_plan

    table = coco_categories()
    names = make_jpegs(os.path.join(root, "images"), n, h, w)
    gt_dir = os.path.join(root, "panoptic")
    os.makedirs(gt_dir)
    predicted, images, annotations = {}, [], []
    for k, name in enumerate(names):
        pred, pred_segments, gt, gt_segments = make_maps(k, h, w, n_stuff, n_things, table.stuff_ids,
                                                         table.thing_ids)
        png = name.replace(".jpg", ".png")
        with open(os.path.join(gt_dir, png), "wb") as f:
            f.write(encode_id_png(gt))
        images.append({"id": k + 1, "file_name": name, "height": h, "width": w})
        annotations.append({"image_id": k + 1, "file_name": png, "segments_info": gt_segments})
        predicted[k + 1] = (pred, pred_segments)
    gt_json = os.path.join(root, "panoptic.json")
    with open(gt_json, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": table.to_json()}, f)
    plan = make_plan(os.path.join(root, "images"), os.path.join(root, "plan"), gt_json, gt_dir, task_images=n)
    return plan, predicted, table


# ---------------------------------------------------------------------------- stages


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_decode(entries: list[dict], input_cfg) -> tuple[tuple[float, float], list[dict]]:
    """(wall, CPU) seconds of ``decode`` over all entries in chunks of DECODE_BATCH, and its
    output batches."""
    from pipeline.label.stages import DECODE_BATCH, _column, decode

    out = []
    took = timed(lambda: out.extend(decode({"task": np.array([0]), "entries": _column([entries[k:k + DECODE_BATCH]])},
                                           input_cfg) for k in range(0, len(entries), DECODE_BATCH)))
    return took, out


def decode_parts(entries: list[dict], input_cfg) -> dict[str, tuple[float, float]]:
    """Seconds of decode's parts alone on the same files: the image decode as decode does it
    (``decode_rgb_scaled``: a JPEG at least 3x its test size at a reduced scale) and, as its
    baseline, in full (``decode_rgb``); the resize to the test size (``resize_chw``, into
    [3, h, w]) of the full decode and, as its baseline, PIL's ``Image.resize`` (BILINEAR) into
    [h, w, 3], as decode did before (``Transform.batch`` then transposed it to [3, h, w], a cost
    now gone from the model actor)."""
    from PIL import Image

    from ciae.data.transform import Transform, decode_rgb, decode_rgb_scaled, resize_chw

    transform = Transform(input_cfg)
    data = [open(e["uri"], "rb").read() for e in entries]
    images = []
    scaled = timed(lambda: [decode_rgb_scaled(d, transform.test_size) for d in data])
    full = timed(lambda: images.extend(decode_rgb(d) for d in data))
    sizes = [transform.test_size(*im.shape[:2]) for im in images]
    return {"image decode": scaled, "image decode in full (before; not in decode)": full,
            "resize of the full decode": timed(lambda: [resize_chw(im, s) for im, s in zip(images, sizes)]),
            "resize with PIL (before; not in decode)": timed(lambda: [
                np.asarray(Image.fromarray(im).resize((s[1], s[0]), Image.BILINEAR)) for im, s in zip(images, sizes)])}


def labeled_rows(decoded: list[dict], predicted: dict, ground_truth: bool) -> list[dict]:
    """Decode's rows as the model actor gives them: without ``image``, with ``ids``, ``segments``
    and ``quality``; ``ground_truth`` False blanks the ground-truth columns."""
    from pipeline.label.stages import _column

    rows = []
    for batch in decoded:
        n = len(batch["key"])
        preds = [predicted[int(i)] for i in batch["image_id"]]
        row = {k: v for k, v in batch.items() if k != "image"}
        row |= {"ids": [p[0] for p in preds], "segments": _column([p[1] for p in preds]),
                "quality": np.full(n, 0.5, np.float32)}
        if not ground_truth:
            row |= {"gt_runs": _column([b""] * n), "gt_png": np.array([""] * n, dtype=object),
                    "gt_segments": _column([[] for _ in range(n)])}
        rows.append(row)
    return rows


def batches_of(rows: list[dict], size: int) -> list[dict]:
    """Column batches (decode's chunks) re-cut into batches of ``size`` rows."""
    from pipeline.label.stages import _column

    whole = {}
    for k in rows[0]:
        if all(isinstance(r[k], np.ndarray) and r[k].dtype != object for r in rows):
            whole[k] = np.concatenate([r[k] for r in rows])
        else:
            whole[k] = _column([x for r in rows for x in r[k]])
    n = len(whole["key"])
    return [{k: v[i:i + size] for k, v in whole.items()} for i in range(0, n, size)]


def run_encode(batches: list[dict], out: str, table) -> tuple[float, float]:
    from pipeline.label.stages import encode
    from pipeline.label.store import LabelStore

    store = LabelStore(out)
    return timed(lambda: [encode(b, store, table, coco_panoptic=False) for b in batches])


def encode_parts(batches: list[dict], table, out: str) -> dict[str, tuple[float, float]]:
    """Seconds of encode's parts alone on the same rows: the PNG, the RLE of the things (and, as
    the baseline, pycocotools on a full-image mask per segment, as encode did before), the PQ
    against the ground-truth PNG (read and decoded), one part written per batch."""
    from pycocotools import mask as rle

    from pipeline.data import storage
    from pipeline.data.coco import segment_rles
    from pipeline.data.panoptic_png import decode_id_png, encode_id_png
    from pipeline.evaluation.pq import PQAccumulator
    from pipeline.label.store import LabelStore

    things = set(table.thing_ids)
    rows = [(b["ids"][k], list(b["segments"][k]), b["gt_png"][k], list(b["gt_segments"][k]))
            for b in batches for k in range(len(b["key"]))]
    png = timed(lambda: [encode_id_png(ids) for ids, *_ in rows])
    thing_ids = [[s["id"] for s in segs if s["category_id"] in things] for _, segs, *_ in rows]
    runs = timed(lambda: [segment_rles(ids, wanted) for (ids, *_), wanted in zip(rows, thing_ids)])
    per_mask = timed(lambda: [rle.encode(np.asfortranarray(ids == k))["counts"].decode("ascii")
                              for (ids, *_), wanted in zip(rows, thing_ids) for k in wanted])

    def pq():
        for ids, segs, gt_png, gt_segs in rows:
            if gt_png:
                PQAccumulator(table).add(decode_id_png(storage.read_uri(gt_png)), gt_segs, ids, segs)

    store = LabelStore(out)
    part_rows = [[{"index": 0, "key": b["key"][k], "image_id": 0, "file_name": "", "height": 0, "width": 0,
                   "status": "labeled", "reason": "", "png": encode_id_png(b["ids"][k]), "segments": [],
                   "quality": 0.5, "pq": None, "pq_stats": None} for k in range(len(b["key"]))] for b in batches]
    return {"png": png, "rle": runs, "rle a mask per segment (before; not in encode)": per_mask, "pq": timed(pq),
            "write": timed(lambda: [store.write_part(0, r) for r in part_rows])}


def run_batch(decoded: list[dict], size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``Transform.batch`` over every image in batches of ``size``."""
    from ciae.data.transform import Transform

    images = [im for b in decoded for im in b["image"]]
    return timed(lambda: [Transform.batch(images[k:k + size]) for k in range(0, len(images), size)])


# ---------------------------------------------------------------------------- report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images (default 64)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (default 5)")
    p.add_argument("--height", type=int, default=480, help="image height (default 480)")
    p.add_argument("--width", type=int, default=640, help="image width (default 640)")
    p.add_argument("--stuff", type=int, default=15, help="stuff regions per image (default 15)")
    p.add_argument("--things", type=int, default=30, help="instances per image (default 30)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per encode call and images per padded batch (default 8, ciae label's)")
    p.add_argument("--rate", type=float, default=300.0, help="the GPU's images/s to feed (default 300)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: a Ray task's; the resize runs in torch)")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import torch

    from ciae.config import Config
    from pipeline.label.sources import Plan

    torch.set_num_threads(args.threads)
    root = args.workdir or tempfile.mkdtemp(prefix="ciae-bench-host-")
    t = time.perf_counter()
    plan, predicted, table = make_input(os.path.join(root, "input"), args.images, args.height, args.width,
                                        args.stuff, args.things)
    entries = Plan.read_task(plan.dir, 0)
    segments = statistics.mean(len(s) for _, s in predicted.values())
    things = statistics.mean(sum(x["category_id"] in set(table.thing_ids) for x in s) for _, s in predicted.values())
    input_cfg = Config().input
    kib = statistics.mean(os.path.getsize(e["uri"]) for e in entries) / 1024
    print(f"[host] {args.images} JPEGs {args.width}x{args.height} (mean {kib:.0f} KiB), "
          f"{segments:.1f} segments per image ({things:.1f} things), made in {time.perf_counter() - t:.1f} s; "
          f"test size: shorter side {input_cfg.test_shorter_side}, max {input_cfg.max_size}", flush=True)

    seconds: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.runs + 1):                  # run 0 warms up (imports, caches, page cache)
        took = {}
        took["decode"], decoded = run_decode(entries, input_cfg)
        for part, v in decode_parts(entries, input_cfg).items():
            took[f"  of which {part}"] = v
        with_gt = batches_of(labeled_rows(decoded, predicted, True), args.batch_size)
        without = batches_of(labeled_rows(decoded, predicted, False), args.batch_size)
        took["encode, ground truth (PQ)"] = run_encode(with_gt, os.path.join(root, f"out-gt-{r}"), table)
        took["encode, no ground truth"] = run_encode(without, os.path.join(root, f"out-{r}"), table)
        for part, v in encode_parts(with_gt, table, os.path.join(root, f"parts-{r}")).items():
            took[f"  of which {part}"] = v
        took["Transform.batch"] = run_batch(decoded, args.batch_size)
        if r:
            for k, v in took.items():
                seconds.setdefault(k, []).append(v)
        print(f"[host] run {r}{' (warm-up)' if not r else ''}, CPU (wall) ms/img: "
              + ", ".join(f"{k.strip()} {1000 * c / args.images:.2f} ({1000 * w / args.images:.2f})"
                          for k, (w, c) in took.items()), flush=True)

    figures = {}
    for k, v in seconds.items():
        cpu_ms = sorted(1000 * c / args.images for _, c in v)
        wall_ms = sorted(1000 * w / args.images for w, _ in v)
        figures[k] = {"cpu_ms_median": statistics.median(cpu_ms), "cpu_ms_min": cpu_ms[0], "cpu_ms_max": cpu_ms[-1],
                      "wall_ms_median": statistics.median(wall_ms), "wall_ms_min": wall_ms[0],
                      "wall_ms_max": wall_ms[-1], "cores": args.rate * statistics.median(cpu_ms) / 1000}
    batch_key = "Transform.batch"
    sums = {"decode + encode, ground truth": ["decode", "encode, ground truth (PQ)"],
            "decode + encode, no ground truth": ["decode", "encode, no ground truth"]}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = (f"{args.images} images {args.width}x{args.height} -> {input_cfg.test_shorter_side} px, "
            f"{segments:.0f} segments/img ({things:.0f} things), batch {args.batch_size}, {args.runs} runs, "
            f"{args.threads} torch thread(s), {os.cpu_count()} CPUs ({_cpu_name()}), load average {load:.1f}")
    print(f"\n{what}\n")
    print(f"| stage | CPU ms/img median | min-max | wall ms/img median | min-max | cores at {args.rate:g} img/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, f in figures.items():
        print(f"| {k} | {f['cpu_ms_median']:.2f} | {f['cpu_ms_min']:.2f}-{f['cpu_ms_max']:.2f} | "
              f"{f['wall_ms_median']:.2f} | {f['wall_ms_min']:.2f}-{f['wall_ms_max']:.2f} | {f['cores']:.2f} |")
    for name, parts in sums.items():
        total = sum(figures[k]["cpu_ms_median"] for k in parts)
        wall = sum(figures[k]["wall_ms_median"] for k in parts)
        print(f"| **{name}** | {total:.2f} | | {wall:.2f} | | **{args.rate * total / 1000:.1f}** |")
    print(f"\ncores = {args.rate:g} * CPU ms/img / 1000 (the CPU time is this process's, torch on {args.threads} "
          f"thread(s)); + {figures[batch_key]['cores']:.2f} cores in the model actors' own processes for "
          f"{batch_key}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": what, "rate": args.rate, "stages": figures,
                       "cores": {name: sum(figures[k]["cores"] for k in parts) for name, parts in sums.items()}},
                      f, indent=1)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
