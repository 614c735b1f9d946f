"""Benchmark PQ evaluation: images/s of panopticapi vs ciae on the same files, in the same run.

Data: COCO-sized synthetic panoptic PNGs made here from a fixed seed (640x480; Voronoi stuff
regions under 8-30 overlapping thing ellipses, 10-40 segments; crowd segments; void on some
segment borders and in blobs), saved the way COCO's were (PIL, default settings). The
prediction is the ground truth perturbed: shifted a few pixels, some segments with a confused
category, merged into a neighbour or split in two, false-positive blobs, a few empty images.

Measured, best of ``--repeats`` interleaved runs, by wall clock and, for the single-core rows,
also by CPU time of this process (robust to other work on a shared machine):

* decode: panopticapi's PNG -> id map (PIL to uint32, rgb2id) vs ``pipeline.panoptic_png.decode_id_png``
  (libspng to RGBA, ids one mask away, into a reused array);
* files, 1 core: ``pq_compute_single_core`` vs ``workflows.evaluate.evaluate_pairs`` over the
  same (ground truth, prediction) pairs, JSONs already parsed (read, decode, match, count);
* files, all cores: ``pq_compute`` vs ``workflows.evaluate.evaluate``, end to end (JSONs,
  worker processes, merge; panopticapi forks one process per core, ours spawns ``--workers``);
* streaming, 1 core: ``PQAccumulator.add`` on decoded id maps and ``add_indexed`` on segment-
  index maps, against panopticapi's single-core rate on the files.

Both sides' metrics are compared (max absolute difference). Nothing asserts on time.

    .venv/bin/python benchmarks/pq/run.py --images 200
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from ciae.evaluation.pq import PQAccumulator
from ciae.panoptic import CategoryTable
from pipeline.coco import load_panoptic_json
from pipeline.panoptic_png import decode_id_png as decode_ids
from pipeline.panoptic_png import id_to_rgb
from workflows.evaluate import default_workers, evaluate, evaluate_pairs, load_predictions

CATEGORIES = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "data",
                          "coco_panoptic_categories.json")


# ----------------------------------------------------------------------------------- data


def _ellipse(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A random rotated ellipse as an [H, W] bool mask."""
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    a, b = rng.uniform(lo, hi), rng.uniform(lo, hi)
    t = rng.uniform(0, np.pi)
    yy, xx = np.ogrid[:h, :w]
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _boundary(labels: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def _segments(labels: np.ndarray, category: dict[int, int], crowd: dict[int, int],
              rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Label map (0 = void) -> COCO id map [H, W] uint32 and segments_info, random 24-bit ids."""
    present, areas = np.unique(labels, return_counts=True)
    areas = areas[present > 0]
    present = present[present > 0]
    ids = rng.choice(np.arange(1, 256**3, dtype=np.int64), size=len(present), replace=False)
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint32)
    lut[present] = ids
    segs = [{"id": int(i), "category_id": category[int(lab)], "iscrowd": crowd.get(int(lab), 0),
             "area": int(a)} for lab, i, a in zip(present, ids, areas)]
    return lut[labels], segs


def synth_pair(rng: np.random.Generator, table: CategoryTable, h: int = 480, w: int = 640):
    """One image: ground-truth (id map, segments) and a perturbed prediction (id map, segments)."""
    stuff, things = table.stuff_ids, table.thing_ids
    # Stuff: Voronoi cells of 3-8 seeds; things: 8-30 ellipses painted over them.
    seeds = rng.uniform((0, 0), (h, w), size=(rng.integers(3, 9), 2))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    dist = (yy[None] - seeds[:, :1, None]) ** 2 + ((xx[None] - seeds[:, 1:, None]) * 0.6) ** 2
    labels = (dist.argmin(0) + 1).astype(np.int32)
    category = {k + 1: int(rng.choice(stuff)) for k in range(len(seeds))}
    crowd = {}
    for k in range(rng.integers(8, 31)):
        lab = len(category) + 1
        labels[_ellipse(h, w, rng, 8, 90)] = lab
        category[lab] = int(rng.choice(things))
        if rng.random() < 0.05:
            crowd[lab] = 1
    # Prediction: the ground truth shifted, with confusions, merges, splits and false positives.
    pred = np.roll(labels, (rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1))
    pred_category = dict(category)
    for lab in list(category):
        r = rng.random()
        if r < 0.1:
            pred_category[lab] = int(rng.choice(things if category[lab] in things else stuff))
        elif r < 0.18:
            pred[pred == lab] = rng.integers(1, len(category) + 1)
        elif r < 0.28:
            new = max(pred_category) + 1
            pred[(pred == lab) & (np.arange(w) > rng.integers(0, w))[None, :]] = new
            pred_category[new] = pred_category[lab]
    for _ in range(rng.integers(0, 5)):
        new = max(pred_category) + 1
        pred[_ellipse(h, w, rng, 5, 40)] = new
        pred_category[new] = int(rng.choice(things))
    if rng.random() < 0.03:
        pred[:] = 0
    # Void: borders of about half the segments and a couple of blobs in the ground truth.
    on_border = _boundary(labels) & (rng.random(len(category) + 1) < 0.5)[labels]
    labels[on_border] = 0
    for _ in range(rng.integers(0, 3)):
        labels[_ellipse(h, w, rng, 5, 30)] = 0
    return _segments(labels, category, crowd, rng), _segments(pred, pred_category, {}, rng)


def write_dataset(root: str, n: int, seed: int, table: CategoryTable) -> dict:
    """Write gt.json + gt/ and pred.json + pred/ under ``root``; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = {k: os.path.join(root, k) for k in ("gt", "pred")}
    docs = {k: {"images": [], "annotations": [], "categories": table.to_json()} for k in paths}
    for d in paths.values():
        os.makedirs(d, exist_ok=True)
    for i in range(n):
        pair = synth_pair(rng, table)
        for k, (ids, segs) in zip(paths, pair):
            name = f"{i:012d}"
            Image.fromarray(id_to_rgb(ids)).save(os.path.join(paths[k], name + ".png"))
            docs[k]["images"].append({"id": i, "file_name": name + ".jpg", "height": ids.shape[0],
                                      "width": ids.shape[1]})
            docs[k]["annotations"].append({"image_id": i, "file_name": name + ".png",
                                           "segments_info": segs})
    for k, d in paths.items():
        with open(d + ".json", "w") as f:
            json.dump(docs[k], f)
    return {"gt_json": paths["gt"] + ".json", "gt_dir": paths["gt"],
            "pred_json": paths["pred"] + ".json", "pred_dir": paths["pred"]}


# ------------------------------------------------------------------------------- timings


def race(functions: dict, n: int, repeats: int) -> tuple[dict, dict, dict]:
    """Call each function ``repeats`` times, interleaved so that both sides see the same load;
    returns the images/s of each one's fastest call over ``n`` images by wall clock and by
    this process's CPU time (which other processes on a shared machine do not inflate), and
    each one's last result."""
    wall = {name: float("inf") for name in functions}
    cpu = dict(wall)
    results = {}
    for _ in range(repeats):
        for name, fn in functions.items():
            t, c = time.perf_counter(), time.process_time()
            results[name] = fn()
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return ({name: n / t for name, t in wall.items()}, {name: n / t for name, t in cpu.items()}, results)


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference over All/Things/Stuff and per class (panopticapi's
    per_class has every category, those without TP/FP/FN at 0)."""
    diffs = [abs(a[g][k] - b[g][k]) for g in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq", "n")]
    for cid, r in b["per_class"].items():
        mine = a["per_class"].get(cid, {"pq": 0.0, "sq": 0.0, "rq": 0.0})
        diffs += [abs(mine[k] - r[k]) for k in ("pq", "sq", "rq")]
    return max(diffs)


def to_index(ids: np.ndarray, segments: list) -> np.ndarray:
    """[H, W] ids -> [H, W] int32 segment-index map (0 = void, i = segments[i - 1])."""
    keys = np.array([0] + [s.id for s in segments], dtype=np.uint32)
    order = np.argsort(keys)
    return order.astype(np.int32)[np.searchsorted(keys[order], ids)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="synthetic image pairs (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes for the all-core runs (default: available cores)")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    args = parser.parse_args(argv)

    from panopticapi.evaluation import pq_compute, pq_compute_single_core
    from panopticapi.utils import rgb2id

    with tempfile.TemporaryDirectory() as tmp:
        root, n = args.workdir or tmp, args.images
        table = CategoryTable.from_json(json.load(open(CATEGORIES)))
        t = time.perf_counter()
        src = write_dataset(root, n, args.seed, table)
        gt_doc, pred_doc = json.load(open(src["gt_json"])), json.load(open(src["pred_json"]))
        nseg = [len(a["segments_info"]) for a in gt_doc["annotations"]]
        print(f"data: {n} pairs, 640x480, {min(nseg)}-{max(nseg)} ground-truth segments "
              f"(mean {np.mean(nseg):.1f}), made in {time.perf_counter() - t:.1f} s")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({default_workers()} available), "
              f"load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}, "
              f"numpy {np.__version__}")

        # panopticapi's inputs: its JSON dicts. Ours: checked records (parsing is not timed).
        categories = {c["id"]: c for c in gt_doc["categories"]}
        matched = list(zip(gt_doc["annotations"], pred_doc["annotations"]))
        files = [(os.path.join(src["gt_dir"], g["file_name"]), os.path.join(src["pred_dir"], p["file_name"]))
                 for g, p in matched]
        gt = load_panoptic_json(src["gt_json"])
        preds, errors, _ = load_predictions(src["pred_json"], gt.records, gt.categories)
        assert not errors, errors
        pairs = [(r, preds[r.image_id]) for r in gt.records]
        # Streaming inputs: maps already in memory, as in a labeling or training job.
        maps = [(decode_ids(open(g, "rb").read()), decode_ids(open(p, "rb").read())) for g, p in files]
        indexed = [(to_index(g, gr.segments), to_index(p, pr.segments)) for (g, p), (gr, pr) in zip(maps, pairs)]

        def papi_decode():
            for g, p in files:
                rgb2id(np.array(Image.open(g), dtype=np.uint32))
                rgb2id(np.array(Image.open(p), dtype=np.uint32))

        def ours_decode():  # into reused arrays, as evaluate_pairs does
            out = np.empty((2, 480, 640), dtype=np.uint32)
            for g, p in files:
                decode_ids(open(g, "rb").read(), out[0])
                decode_ids(open(p, "rb").read(), out[1])

        def papi_single():
            with contextlib.redirect_stdout(io.StringIO()):
                return pq_compute_single_core(0, copy.deepcopy(matched), src["gt_dir"], src["pred_dir"],
                                              categories)

        def ours_single():
            acc, errors = evaluate_pairs(pairs, gt.categories, src["gt_dir"], src["pred_dir"])
            assert not errors, errors
            return acc.summary()

        def papi_all():
            with contextlib.redirect_stdout(io.StringIO()):
                return pq_compute(src["gt_json"], src["pred_json"], src["gt_dir"], src["pred_dir"])

        def stream(add, inputs):
            def run():
                acc = PQAccumulator(gt.categories)
                for (g, p), (gr, pr) in zip(inputs, pairs):
                    add(acc, g, gr.segments, p, pr.segments)
                return acc.summary()
            return run

        functions = {"papi decode": papi_decode, "ours decode": ours_decode,
                     "papi single": papi_single, "ours single": ours_single,
                     "papi all": papi_all, "ours all": lambda: evaluate(**src, workers=args.workers),
                     "ours add": stream(PQAccumulator.add, maps),
                     "ours add_indexed": stream(PQAccumulator.add_indexed, indexed)}
        rows = [("decode 2 PNGs, 1 core", "papi decode", "ours decode"),
                ("files, 1 core", "papi single", "ours single")]
        wall, cpu, out = race(functions, n, args.repeats)
        rows += [
                ("streaming id maps (`add`), 1 core", "papi single", "ours add"),
                ("streaming index maps (`add_indexed`), 1 core", "papi single", "ours add_indexed"),
                (f"files, all cores, end to end ({os.cpu_count()} vs {args.workers} processes)",
                 "papi all", "ours all")]
        diff = max(max_difference(out[k], out["papi all"])
                   for k in ("ours single", "ours all", "ours add", "ours add_indexed"))
        print(f"PQ {100 * out['papi all']['All']['pq']:.2f}; max |ciae - panopticapi| over every figure: "
              f"{diff:.1e}; load average after: {os.getloadavg()[0]:.2f}\n")
        print("| images/s | panopticapi | ciae | speed-up | 1-core rows by CPU time: panopticapi | ciae | speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, theirs, ours in rows:
            line = f"| {name} | {wall[theirs]:.1f} | {wall[ours]:.1f} | {wall[ours] / wall[theirs]:.1f}x |"
            if "all cores" in name:  # worker processes' CPU time is not this process's
                line += " | | |"
            else:
                line += f" {cpu[theirs]:.1f} | {cpu[ours]:.1f} | {cpu[ours] / cpu[theirs]:.1f}x |"
            print(line)


if __name__ == "__main__":
    main()
