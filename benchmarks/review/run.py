"""Review queue throughput: images/s of ``ciae review push`` and ``pull`` against a local Label
Studio server (issue 27's goal: at least 50 images/s each).

Starts a Label Studio server the way the tests do (``tests/label_studio_server.py``: its own
virtualenv ``.ls-venv``, a free port, a temporary data dir, a personal access token), writes a
labeling output of N synthetic images (``pipeline.data.synth``, each "labeled" with its ground truth,
as ``tests/test_review.py`` does), then, --repeats times, each round into a new project:

* push: ``workflows.review.sync.push`` of all N images (project creation, uploads, task imports with
  their predictions, the brush encoding included);
* push again: the same call, which finds every image already there and adds nothing;
* pull: ``workflows.review.sync.pull --from predictions`` into a new folder (tasks read, regions
  decoded and painted, PNGs and JSON written); its maps are checked equal to the labels'.

The first round also pays this process's one-time costs (importing the SDK's client, starting
the workers' server process), which every ``ciae review`` command pays once.

Reported: images/s of each round and their median, min and max; the CPU seconds each step took
in this process and its workers, and in the server (from /proc: Linux), which tell what a busy
shared machine does to the wall clock; and, measured last (so that the first round imports the
converter as a command does), the per-image cost of the tool's brush converter alone in this
process (``mask2rle`` over every segment, ``decode_rle`` over every region), which push and pull
pay. The server shares the machine's cores. Timings are printed, never asserted.

    .venv/bin/python benchmarks/review/run.py                      # 64 images of 256x256, 3 rounds
    .venv/bin/python benchmarks/review/run.py --images 256 --repeats 5
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

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))          # label_studio_server: the tests' server

import label_studio_server  # noqa: E402

from ciae.data.panoptic import CategoryTable  # noqa: E402
from pipeline.data.panoptic_png import decode_id_png  # noqa: E402
from pipeline.data.synth import SynthSpec, write_dataset  # noqa: E402
from pipeline.label import store as ls  # noqa: E402
from pipeline.label.sources import make_plan  # noqa: E402
from workflows.review import sync as review  # noqa: E402


def labeling_output(root: Path, n: int, size: int) -> tuple[str, dict[str, dict]]:
    """A sealed labeling output of n synthetic size x size images labeled with their ground
    truth, qualities shuffled: (its folder, {key: row})."""
    data = root / "synth"
    write_dataset(str(data), n, seed=0, spec=SynthSpec(height=size, width=size))
    store = ls.LabelStore(str(root / "labels"))
    plan = make_plan(str(data / "images"), store.plan_uri, gt_json=str(data / "panoptic.json"),
                     gt_dir=str(data / "panoptic"))
    table = CategoryTable.from_json(plan.categories)
    rng = np.random.default_rng(0)
    quality = rng.permutation(n) / n
    rows = {}
    for task, task_size in enumerate(plan.task_sizes):
        part = []
        for e in plan.read_task(plan.dir, task):
            segments = [s | {"score": float(rng.uniform(0.3, 1.0)), "rle": None} for s in json.loads(e["gt_segments"])]
            part.append({"index": e["index"], "key": e["key"], "image_id": e["image_id"],
                         "file_name": e["file_name"], "height": size, "width": size, "status": "labeled",
                         "reason": "", "png": open(e["gt_png"], "rb").read(), "segments": segments,
                         "quality": float(quality[e["index"]]), "pq": None, "pq_stats": None})
            rows[e["key"]] = part[-1]
        store.write_part(task, part)
        store.seal(task, task_size, table, review=100)
    return store.uri, rows


def converter_ms(rows: dict[str, dict]) -> tuple[float, float]:
    """(mask2rle, decode_rle) milliseconds per image, in this process."""
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    maps = [(decode_id_png(r["png"]), r["segments"]) for r in rows.values()]
    t0 = time.perf_counter()
    rles = [mask2rle(np.where(ids == s["id"], np.uint8(255), np.uint8(0))) for ids, segs in maps for s in segs]
    t1 = time.perf_counter()
    for rle in rles:
        decode_rle(rle)
    t2 = time.perf_counter()
    return 1e3 * (t1 - t0) / len(maps), 1e3 * (t2 - t1) / len(maps)


def same_maps(out: Path, rows: dict[str, dict]) -> bool:
    """Whether every pulled map has the labels' segments, pixel for pixel (ids aside)."""
    doc = json.loads((out / "panoptic.json").read_text())
    by_image = {r["image_id"]: r for r in rows.values()}

    def canonical(ids, segments):
        return (ids == 0).tobytes(), sorted((s["category_id"], (ids == s["id"]).tobytes()) for s in segments)

    return len(doc["annotations"]) == len(rows) and all(
        canonical(decode_id_png((out / "panoptic" / a["file_name"]).read_bytes()), a["segments_info"])
        == canonical(decode_id_png(by_image[a["image_id"]]["png"]), by_image[a["image_id"]]["segments"])
        for a in doc["annotations"])


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and its descendants, those they have reaped included (Linux)."""
    parent, ticks = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(name)] = int(fields[1])
            ticks[int(name)] = sum(int(x) for x in fields[11:15])   # utime stime cutime cstime
    total = 0
    for pid in ticks:
        p = pid
        while p not in (root, 0, 1) and p in parent:
            p = parent[p]
        if p == root:
            total += ticks[pid]
    return total / os.sysconf("SC_CLK_TCK")


def spread(rates: list[float]) -> str:
    return f"median {statistics.median(rates):6.1f}  min {min(rates):6.1f}  max {max(rates):6.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="synthetic images (default 64)")
    p.add_argument("--size", type=int, default=256, help="their height and width (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, each into a new project (default 3)")
    p.add_argument("--workers", type=int, default=None,
                   help="push's and pull's --workers (default: theirs, one per CPU)")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ciae-review-bench-") as tmp:
        run(Path(args.workdir or tmp), args)


def run(root: Path, args: argparse.Namespace) -> None:
    labels, rows = labeling_output(root, args.images, args.size)
    segments = sum(len(r["segments"]) for r in rows.values()) / len(rows)
    print(f"{args.images} images of {args.size}x{args.size}, {segments:.1f} segments each")
    server = label_studio_server.start(root / "label_studio")
    print(f"Label Studio {server.url} started in {server.start_seconds:.1f} s")
    rates: dict[str, list[float]] = {"push": [], "push again": [], "pull": []}
    workers = {"workers": args.workers} if args.workers else {}
    try:
        for r in range(args.repeats):
            project, out = f"bench-{r}", root / f"pulled-{r}"
            times, cpu = {}, {}
            for name, call in (
                    ("push", lambda: review.push(labels, server.url, server.token, project, args.images,
                                                 progress=False, **workers)),
                    ("push again", lambda: review.push(labels, server.url, server.token, project, args.images,
                                                       progress=False, **workers)),
                    ("pull", lambda: review.pull(labels, server.url, server.token, project, str(out),
                                                 source="predictions", progress=False, **workers))):
                mine, its, t0 = tree_cpu(os.getpid()), tree_cpu(server.proc.pid), time.perf_counter()
                call()
                times[name] = time.perf_counter() - t0
                cpu[name] = (tree_cpu(os.getpid()) - mine, tree_cpu(server.proc.pid) - its)
                rates[name].append(args.images / times[name])
            print(f"round {r + 1}: pulled maps identical: {same_maps(out, rows)}")
            for k, t in times.items():
                print(f"  {k:<11} {args.images / t:6.1f} img/s ({t:5.2f} s; CPU s: client {cpu[k][0]:5.2f}, "
                      f"server {cpu[k][1]:5.2f})", flush=True)
    finally:
        server.stop()
    print(f"\nimages/s over {args.repeats} rounds of {args.images} images:")
    for name, values in rates.items():
        print(f"  {name:<11} {spread(values)}")
    encode, decode = converter_ms(rows)
    print(f"converter per image, one process: mask2rle {encode:.1f} ms, decode_rle {decode:.1f} ms")


if __name__ == "__main__":
    main()
