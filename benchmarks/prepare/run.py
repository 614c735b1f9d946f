"""Benchmark the data stage: images/s per core of COCO panoptic -> shard conversion.

Baseline, run in the same process on the same files: the conversion detectron2's
``prepare_panoptic_fpn.py`` does per image (decode the panoptic PNG with PIL, rgb -> id, one
full-image comparison per segment to paint a semantic map, save it as a PNG).

Ours: ``pipeline.data.shards.convert_record`` per image (read image and PNG, validate, index the
segments, measure areas and boxes, encode the index map) plus writing the Parquet shards and the
manifest: the job in one process (``pipeline.data.prepare.prepare(..., in_process=True)``, per core),
then as a Ray Data job on all cores.

Data: the real COCO sample (2 val2017 images, repeated) and COCO-sized synthetic images
(640x480, 10-40 segments) whose PNGs are saved the way COCO's were (PIL, default settings).

    python benchmarks/prepare/run.py --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from pipeline.data import coco
from pipeline.data.shards import Source

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "coco_sample")


def baseline_convert(png_path: str, out_path: str, segments: list[coco.Segment], lut: dict) -> None:
    """detectron2-style: panoptic PNG -> semantic PNG, one full-image mask per segment."""
    pan = np.asarray(Image.open(png_path), dtype=np.uint32)
    pan = pan[:, :, 0] + 256 * pan[:, :, 1] + 256 * 256 * pan[:, :, 2]
    out = np.zeros_like(pan, dtype=np.uint8) + 255
    for s in segments:
        out[pan == s.id] = lut[s.category_id]
    Image.fromarray(out).save(out_path)


def run_baseline(src: dict, records: list[coco.PanopticRecord], lut: dict, work: str) -> float:
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    for r in records:
        baseline_convert(os.path.join(src["panoptic_dir"], r.panoptic_file),
                         os.path.join(work, r.panoptic_file), r.segments, lut)
    return len(records) / (time.perf_counter() - t)


def run_ours_single(src: dict, work: str, rows_per_shard: int) -> float:
    """The job in one process (``prepare(..., in_process=True)``: the same plan, shards and
    manifest, one shard after the other), images/s."""
    from pipeline.data.prepare import prepare

    t = time.perf_counter()
    m = prepare(Source(src["images"], src["panoptic_json"], src["panoptic_dir"]), work,
                rows_per_shard=rows_per_shard, progress=False, in_process=True)
    return m["counts"]["images"] / (time.perf_counter() - t)


def run_ours_ray(src: dict, work: str, rows_per_shard: int) -> tuple[float, float, int]:
    """The whole Ray Data job, images/s: a cold run (Ray workers start and import) and a warm one."""
    import ray

    from pipeline.cluster.ray_runtime import connect
    from pipeline.data.prepare import prepare

    rates = []
    with connect():
        cpus = int(ray.cluster_resources()["CPU"])
        for run in ("cold", "warm"):
            t = time.perf_counter()
            m = prepare(Source(src["images"], src["panoptic_json"], src["panoptic_dir"]),
                        f"{work}-{run}", rows_per_shard=rows_per_shard, progress=False)
            rates.append(m["counts"]["images"] / (time.perf_counter() - t))
    return rates[0], rates[1], cpus


def make_datasets(root: str, n: int) -> dict:
    """The COCO sample repeated to n images, and n synthetic COCO-sized images."""
    from pipeline.data.synth import SynthSpec, write_dataset

    doc = json.load(open(os.path.join(SAMPLE, "panoptic_examples.json")))
    rep = os.path.join(root, "coco_sample")
    for sub in ("images", "panoptic"):
        os.makedirs(os.path.join(rep, sub))
    images, anns = [], []
    for i in range(n):
        im, ann = dict(doc["images"][i % 2]), dict(doc["annotations"][i % 2])
        stem = f"{i:06d}"
        shutil.copy(os.path.join(SAMPLE, "input_images", im["file_name"]), os.path.join(rep, "images", stem + ".jpg"))
        shutil.copy(os.path.join(SAMPLE, "panoptic_examples", ann["file_name"]), os.path.join(rep, "panoptic", stem + ".png"))
        images.append(im | {"id": i + 1, "file_name": stem + ".jpg"})
        anns.append(ann | {"image_id": i + 1, "file_name": stem + ".png"})
    json.dump({"images": images, "annotations": anns, "categories": doc["categories"]},
              open(os.path.join(rep, "panoptic.json"), "w"))

    syn = os.path.join(root, "synthetic")
    write_dataset(syn, n, seed=0, spec=SynthSpec(height=480, width=640, min_things=8, max_things=36))
    for name in os.listdir(os.path.join(syn, "panoptic")):  # re-save as COCO's files were saved
        path = os.path.join(syn, "panoptic", name)
        Image.open(path).save(path)
    out = {}
    for name, d in (("COCO val2017 sample (2 images, repeated)", rep), ("synthetic 640x480", syn)):
        out[name] = {"images": os.path.join(d, "images"), "panoptic_json": os.path.join(d, "panoptic.json"),
                     "panoptic_dir": os.path.join(d, "panoptic")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images per dataset (default 256)")
    p.add_argument("--rows-per-shard", type=int, default=32, help="rows per shard (default 32)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Data job")
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="ciae-bench-prepare-")
    try:
        datasets = make_datasets(root, args.images)
        print(f"{'dataset':42s} {'segments/img':>12s} {'baseline img/s':>15s} {'ours img/s/core':>16s} "
              f"{'speed-up':>9s} {'Ray job img/s cold / warm (cores)':>34s}")
        for k, (name, src) in enumerate(datasets.items()):
            ds = coco.load_panoptic_json(src["panoptic_json"])
            lut = {c.id: i for i, c in enumerate(ds.categories.categories)}
            segs = np.mean([len(r.segments) for r in ds.records])
            base = max(run_baseline(src, ds.records, lut, os.path.join(root, f"base{k}")) for _ in range(2))
            ours = max(run_ours_single(src, os.path.join(root, f"ours{k}_{i}"), args.rows_per_shard)
                       for i in range(2))
            ray_col = "-"
            if not args.no_ray:
                cold, warm, cpus = run_ours_ray(src, os.path.join(root, f"ray{k}"), args.rows_per_shard)
                ray_col = f"{cold:.0f} / {warm:.0f} ({cpus})"
            print(f"{name:42s} {segs:12.1f} {base:15.1f} {ours:16.1f} {ours / base:8.2f}x {ray_col:>34s}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
