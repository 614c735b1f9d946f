"""Benchmark PQ evaluation: images/s of panopticapi vs ciae on the same files, in the same run.

Data: COCO-sized synthetic panoptic PNGs made here from a fixed seed (640x480; Voronoi stuff
regions under 8-30 overlapping thing ellipses, 10-40 segments; crowd segments; void on some
segment borders and in blobs), saved the way COCO's were (PIL, default settings). The
prediction is the ground truth perturbed: shifted a few pixels, some segments with a confused
category, merged into a neighbour or split in two, false-positive blobs, a few empty images.

Measured, best of ``--repeats`` interleaved runs, by wall clock and, for the single-core rows,
also by CPU time of this process (robust to other work on a shared machine):

* decode: panopticapi's PNG -> id map (PIL to uint32, rgb2id) vs ``pipeline.data.panoptic_png.decode_id_png``
  (libspng to RGBA, ids one mask away, into a reused array);
* files, 1 core: ``pq_compute_single_core`` vs our accumulator's file path
  (``pipeline.evaluation.files.evaluate_pairs``) vs hotcoco's ``PanopticEval`` (one thread) over the
  same (ground truth, prediction) pairs, JSONs already parsed (read, decode, match, count);
* in memory, 1 core: ``PQAccumulator.add`` on decoded id maps and ``add_indexed`` on segment-
  index maps, and torchmetrics' ``PanopticQuality.update`` on (category, instance) maps (when
  torchmetrics is installed; once, on the first 20 images: it takes about a second per image;
  it has no crowd rules, so its figure differs by design);
* whole commands, start-up included, on 1 and all cores: ``ciae evaluate --workers N`` (hotcoco
  on N threads for local folders), hotcoco's command ``coco panoptic eval``, a bare call of
  hotcoco's ``pq_compute`` (no command line) and panopticapi's ``pq_compute``.

Every implementation's metrics are compared with panopticapi's (max absolute difference).
Nothing asserts on time.

    .venv/bin/python benchmarks/pq/run.py --images 300
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

from ciae.data.panoptic import CategoryTable
from pipeline.data.coco import load_panoptic_json
from pipeline.data.panoptic_png import decode_id_png as decode_ids
from pipeline.data.panoptic_png import id_to_rgb
from pipeline.evaluation.files import default_workers, evaluate_pairs, load_predictions
from pipeline.evaluation.pq import PQAccumulator

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

TORCHMETRICS_IMAGES = 20  # torchmetrics takes about a second per COCO-sized image


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


def to_category_instance(ids: np.ndarray, segments: list, crowd_as_void: bool = False) -> np.ndarray:
    """[H, W] ids -> [H, W, 2] int64 (category id, instance) for torchmetrics; void -> (-1, 0)."""
    out = np.full(ids.shape + (2,), -1, dtype=np.int64)
    out[..., 1] = 0
    for k, s in enumerate(segments):
        if crowd_as_void and s.iscrowd:
            continue
        mask = ids == s.id
        out[mask, 0], out[mask, 1] = s.category_id, k + 1
    return out


def process_rate(cmd: list[str], n: int, env: dict, repeats: int) -> float:
    """Images/s of a whole command (start-up included), best of ``repeats``."""
    import subprocess
    import sys

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, *cmd], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="synthetic image pairs (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes or threads for the all-core runs (default: available cores)")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = "1"          # hotcoco in this process: one core

    from hotcoco.panoptic import PanopticEval
    from panopticapi.evaluation import pq_compute_single_core
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

        categories = {c["id"]: c for c in gt_doc["categories"]}
        matched = list(zip(gt_doc["annotations"], pred_doc["annotations"]))
        files = [(os.path.join(src["gt_dir"], g["file_name"]), os.path.join(src["pred_dir"], p["file_name"]))
                 for g, p in matched]
        gt = load_panoptic_json(src["gt_json"])
        preds, errors, _ = load_predictions(src["pred_json"], gt.records, gt.categories)
        assert not errors, errors
        pairs = [(r, preds[r.image_id]) for r in gt.records]
        maps = [(decode_ids(open(g, "rb").read()), decode_ids(open(p, "rb").read())) for g, p in files]
        indexed = [(to_index(g, gr.segments), to_index(p, pr.segments)) for (g, p), (gr, pr) in zip(maps, pairs)]

        def papi_decode():
            for g, p in files:
                rgb2id(np.array(Image.open(g), dtype=np.uint32))
                rgb2id(np.array(Image.open(p), dtype=np.uint32))

        def ours_decode():  # into reused arrays, as the accumulator's file path does
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

        def hotcoco_single():
            ev = PanopticEval(gt_doc, pred_doc, gt_folder=src["gt_dir"], pred_folder=src["pred_dir"])
            ev.evaluate()
            return ev.results()

        def stream(add, inputs):
            def run():
                acc = PQAccumulator(gt.categories)
                for (g, p), (gr, pr) in zip(inputs, pairs):
                    add(acc, g, gr.segments, p, pr.segments)
                return acc.summary()
            return run

        functions = {"papi decode": papi_decode, "ours decode": ours_decode,
                     "papi single": papi_single, "ours single": ours_single, "hotcoco single": hotcoco_single,
                     "ours add": stream(PQAccumulator.add, maps),
                     "ours add_indexed": stream(PQAccumulator.add_indexed, indexed)}
        try:
            import torch
            from torchmetrics.detection import PanopticQuality

            tm_inputs = [(torch.from_numpy(to_category_instance(p, pr.segments))[None],
                          torch.from_numpy(to_category_instance(g, gr.segments, crowd_as_void=True))[None])
                         for (g, p), (gr, pr) in zip(maps[:TORCHMETRICS_IMAGES], pairs)]

            def torchmetrics_stream():
                torch.set_num_threads(1)
                metric = PanopticQuality(things=set(table.thing_ids), stuffs=set(table.stuff_ids),
                                         allow_unknown_preds_category=True, return_sq_and_rq=True)
                for p, g in tm_inputs:
                    metric.update(p, g)
                pq_, sq_, rq_ = metric.compute().tolist()
                return {"All": {"pq": pq_, "sq": sq_, "rq": rq_}}
        except ImportError:
            torchmetrics_stream = None
            print("torchmetrics is not installed: its row is left out (pip install torchmetrics)")
        wall, cpu, out = race(functions, n, args.repeats)
        if torchmetrics_stream is not None:  # ~1 image/s: once, on the first images only
            tm_wall, tm_cpu, tm_out = race({"torchmetrics add": torchmetrics_stream}, len(tm_inputs), 1)
            wall, cpu, out = wall | tm_wall, cpu | tm_cpu, out | tm_out

        # whole commands, start-up included: ours, hotcoco's and panopticapi's, on 1 and all cores
        # our modules' bytecode cached, as the installed packages' is (PYTHONDONTWRITEBYTECODE would
        # compile them at every start, ~20 ms that no installed peer pays); best of N, so the
        # first run's compiling does not count
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ciae = ["-m", "workflows.cli", "evaluate", "--gt-json", src["gt_json"], "--gt-dir", src["gt_dir"],
                "--pred-json", src["pred_json"], "--pred-dir", src["pred_dir"]]
        hot = ["-c", "import sys, hotcoco.panoptic as p; p.pq_compute(*sys.argv[1:])",
               src["gt_json"], src["pred_json"], src["gt_dir"], src["pred_dir"]]
        hot_cli = ["-m", "hotcoco.cli", "panoptic", "eval", "--gt", src["gt_json"], "--pred", src["pred_json"],
                   "--gt-folder", src["gt_dir"], "--pred-folder", src["pred_dir"]]
        papi = ["-c", "import sys, panopticapi.evaluation as p; p.pq_compute(*sys.argv[1:])",
                src["gt_json"], src["pred_json"], src["gt_dir"], src["pred_dir"]]
        commands = {}
        for cores in sorted({1, args.workers}):
            threads = {**env, "RAYON_NUM_THREADS": str(cores)}
            commands[f"ciae {cores}"] = process_rate(ciae + ["--workers", str(cores)], n, threads, args.repeats)
            commands[f"hotcoco {cores}"] = process_rate(hot, n, threads, args.repeats)
            commands[f"hotcoco cli {cores}"] = process_rate(hot_cli, n, threads, args.repeats)
        commands[f"papi {args.workers}"] = process_rate(papi, n, env, args.repeats)

        diff = max(max_difference(out[k], papi_all_reference(out["papi single"], table))
                   for k in ("ours single", "ours add", "ours add_indexed"))
        hot_diff = max_difference(hotcoco_summary(out["hotcoco single"]), papi_all_reference(out["papi single"], table))
        print(f"PQ {100 * out['ours single']['All']['pq']:.2f}; max |ciae - panopticapi| over every figure: {diff:.1e}; "
              f"|hotcoco - panopticapi|: {hot_diff:.1e}; load average after: {os.getloadavg()[0]:.2f}")
        if "torchmetrics add" in out:
            print(f"torchmetrics' PQ {100 * out['torchmetrics add']['All']['pq']:.2f} on the first "
                  f"{min(n, TORCHMETRICS_IMAGES)} images, once (no crowd or void rules: crowd regions given "
                  "as void; a different figure by design)")
        print("\n| images/s, 1 core (this process's CPU time; wall in brackets) | panopticapi | ciae | hotcoco | torchmetrics |")
        print("|---|---:|---:|---:|---:|")

        def cell(name):
            return f"{cpu[name]:.0f} ({wall[name]:.0f})" if name in cpu else "-"
        print(f"| decode 2 PNGs | {cell('papi decode')} | {cell('ours decode')} | - | - |")
        print(f"| files, JSONs parsed | {cell('papi single')} | {cell('ours single')} | {cell('hotcoco single')} | - |")
        print(f"| in memory: id maps (`add`) | - | {cell('ours add')} | - | {cell('torchmetrics add')} |")
        print(f"| in memory: index maps (`add_indexed`) | - | {cell('ours add_indexed')} | - | - |")
        print("\n| images/s, whole command, start-up included (wall) | panopticapi `pq_compute` | `ciae evaluate` "
              "| hotcoco `coco panoptic eval` | hotcoco `pq_compute` |")
        print("|---|---:|---:|---:|---:|")
        for cores in sorted({1, args.workers}):
            theirs = f"{commands[f'papi {cores}']:.0f}" if f"papi {cores}" in commands else "-"
            print(f"| {cores} core(s) | {theirs} | {commands[f'ciae {cores}']:.0f} "
                  f"| {commands[f'hotcoco cli {cores}']:.0f} | {commands[f'hotcoco {cores}']:.0f} |")


def hotcoco_summary(result: dict) -> dict:
    """hotcoco's result in our summary's shape (per_class: the classes with a TP, FP or FN)."""
    out = {g: result[g] for g in ("All", "Things", "Stuff")}
    out["per_class"] = {cid: r for cid, r in result["per_class"].items() if r["tp"] + r["fp"] + r["fn"]}
    return out


def papi_all_reference(pq_stat, table: CategoryTable) -> dict:
    """panopticapi's results dict from its single-core PQStat."""
    cats = {c.id: {"isthing": int(c.isthing)} for c in table.categories}
    out = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        out[name], per_class = pq_stat.pq_average(cats, isthing=isthing)
        if name == "All":
            out["per_class"] = per_class
    return out


if __name__ == "__main__":
    main()
