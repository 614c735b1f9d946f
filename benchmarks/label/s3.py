"""Labeling on S3 against local disk: throughput of `ciae label` (and of `ciae prepare`) reading
its images from and writing its output to an S3 server, against the same job on local folders,
with the requests it makes per image; and the resume scan
of an output on S3 whose plan covers 10k and 100k images with every task sealed (goal <= 10 s).

The S3 server is moto's (``tests/s3_server.py``: its own process on 127.0.0.1, stopped by its
pid), reached as a user reaches S3: credentials and ``AWS_ENDPOINT_URL`` in the environment, set
before Ray starts so that Ray's workers inherit them. Every figure comes with the requests the
server answered (its log has a line per request), by kind, so that a per-image request shows.

* **Throughput, the model.** N synthetic JPEGs (``pipeline.data.synth``), labeled by an untrained
  ``Config.small()`` checkpoint (or ``--checkpoint``) with the same job settings
  (``benchmarks/label/run.py``'s: one actor, batch 8, tasks of 4 batches) once from a local
  folder into a local output and once from a prefix of them uploaded to S3 into an output on
  S3; each run into a fresh output, ``--repeats`` rounds alternating which goes first, after
  an untimed warm-up on disk. Reported: images/s of the labeling stage (actor start and model
  build included, Ray already running) median, min and max, and S3 / disk.
* **Throughput, the data path.** The same with the model stage replaced by
  ``scale.TrivialLabeler`` (one segment per image) over ``--trivial-images`` names hard-linked
  to those JPEGs, batch 64: what storage costs once the model does not hide it (on a CPU the
  model dominates).
* **Prepare.** ``ciae prepare`` (its defaults, a Ray Data job) of a COCO panoptic dataset of
  ``--prepare-images`` images (those JPEGs and their PNGs hard-linked under new names, each with
  its record), once from a local folder into a local output and once from its copy on S3 into an
  output on S3, as the throughput rows. Reported: images/s of the whole job, and its S3
  requests per image (a GET of the image and one of its PNG, the rest per shard or per job).
* **Resume scan.** For each of ``--scan-sizes``: a folder of N hard links to one small JPEG
  (as ``scale.py``) labeled with the trivial model stage into an output on S3 in tasks of
  ``--scan-task-images`` (the build: the real job, every task sealed; its rate is local images
  -> S3 output), then ``--scan-repeats`` re-runs of the same job, which find everything done.
  Reported: the resume scan (plan read + scan of what is done, ``timings["plan"] +
  timings["scan"]``, as ``scale.py``), its S3 requests, and the re-run's whole wall time and
  requests (model fetch, and the end of the job: the shards' summary, ``_summaries/job.json``,
  and the exports written from it), median, min and max. The images stay on local disk here: the
  re-run never reads the input (the plan is read back from the output), and 100k PUTs to moto
  take too long (~30 ms each, sequential); the throughput rows measure reading from S3. The job
  builds ~300 images/s here (an hour for 1M): ``--scan-build direct`` writes the same output
  without Ray or decoding (``write_finished``: the plan, then each task through the trivial
  stage, the job's ``encode`` and ``LabelStore.seal``), which is what a re-run reads.

Each output on S3 lives in a bucket of its own kind (images, throughput outputs, one per scan
size): moto scans every key of a bucket for each LIST request, which real S3 does not. moto is
a single Python process on the same 2 cores as the job: absolute S3 figures are far slower than
a real S3 endpoint; the request counts carry over. Nothing is asserted.

    python benchmarks/label/s3.py                 # 96 images 256x256, 1024 trivial, 1024 prepared, scan 10k and 100k
    python benchmarks/label/s3.py --images 48 --repeats 2 --trivial-images 0 --scan-sizes 10000
    python benchmarks/label/s3.py --images 0 --trivial-images 0 --prepare-images 0 --scan-sizes 1000000 \
        --scan-task-images 8192 --scan-build direct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))            # s3_server
sys.path.insert(0, str(Path(__file__).resolve().parent))   # scale (TrivialLabeler)

from s3_server import Requests  # noqa: E402

LINKS_PER_FILE = 50_000        # a file system allows so many links to one file
IMAGES_BUCKET, OUT_BUCKET = "ciae-bench-images", "ciae-bench-out"


class CpuClock:
    """CPU seconds spent on this machine (every process, from ``/proc/stat``) and by the S3
    server's process alone (``/proc/PID/stat``): what the job costs with the server taken out,
    as if the store were elsewhere (the machine otherwise idle)."""

    def __init__(self, server_pid: int):
        self.pid, self.tick = server_pid, os.sysconf("SC_CLK_TCK")

    def read(self) -> tuple[float, float]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open(f"/proc/{self.pid}/stat") as f:
            utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
        return (user + nice + system + irq + softirq + steal) / self.tick, (utime + stime) / self.tick

    def since(self, start: tuple[float, float]) -> dict:
        machine, server = (b - a for a, b in zip(start, self.read()))
        return {"job_cpu_s": machine - server, "server_cpu_s": server}


def median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def link_folder(folder: str, n: int, sources: list[str]) -> None:
    """``folder/KKKKKKKK.jpg`` for k < n, hard links to ``sources`` in turn."""
    os.makedirs(folder)
    for k in range(n):
        os.link(sources[k % len(sources)], os.path.join(folder, f"{k:08d}.jpg"))


def link_dataset(src: str, dest: str, n: int) -> None:
    """A COCO panoptic dataset of ``n`` images at ``dest`` (``images/``, ``panoptic/``,
    ``panoptic.json``, as ``pipeline.data.synth.write_dataset`` writes them): the images and PNGs of
    ``src`` in turn, hard-linked, each with its record under a new id and name."""
    with open(os.path.join(src, "panoptic.json")) as f:
        doc = json.load(f)
    annotation = {a["image_id"]: a for a in doc["annotations"]}
    images, annotations = [], []
    for folder in ("images", "panoptic"):
        os.makedirs(os.path.join(dest, folder))
    for k in range(n):
        image = doc["images"][k % len(doc["images"])]
        ann = annotation[image["id"]]
        stem = f"{k:08d}"
        os.link(os.path.join(src, "images", image["file_name"]), os.path.join(dest, "images", stem + ".jpg"))
        os.link(os.path.join(src, "panoptic", ann["file_name"]), os.path.join(dest, "panoptic", stem + ".png"))
        images.append(image | {"id": k + 1, "file_name": stem + ".jpg"})
        annotations.append(ann | {"image_id": k + 1, "file_name": stem + ".png"})
    with open(os.path.join(dest, "panoptic.json"), "w") as f:
        json.dump(doc | {"images": images, "annotations": annotations}, f)


def tiny_jpegs(work: str, n: int) -> list[str]:
    """Enough copies of one 48x32 JPEG to hard-link ``n`` names to them (``LINKS_PER_FILE``
    each, at most)."""
    from PIL import Image

    paths = []
    for k in range(-(-n // LINKS_PER_FILE)):
        paths.append(os.path.join(work, f"tiny-{k}.jpg"))
        Image.new("RGB", (48, 32), (90, 120, 150)).save(paths[-1])
    return paths


def make_checkpoint(path: str) -> None:
    import torch

    from ciae import checkpoint
    from ciae.config import Config
    from ciae.engine.train import Trainer
    from ciae.modeling.model import CIAEModel
    from pipeline.data.storage import write_uri
    from pipeline.data.synth import select_categories

    cats = select_categories()
    torch.manual_seed(0)
    write_uri(path, checkpoint.to_bytes(Trainer(CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)).checkpoint()))


def throughput(name: str, images: dict, out: dict, job_kw: dict, repeats: int, requests: Requests,
               labeler, cpu: CpuClock) -> dict:
    """Label ``images[where]`` into a fresh output under ``out[where]`` for where in disk, s3,
    ``repeats`` rounds alternating the order; {where: [{"images_per_s", "seconds", "requests",
    "call_s", "job_cpu_s", "server_cpu_s"}]} (wall time and CPU of the whole ``label`` call)."""
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    clock = time.perf_counter()      # a warm-up (Ray Data's workers, the imports), not counted
    label(LabelJob(input=images["disk"], out=f"{out['disk']}/{name}-warm-up", **job_kw), progress=False,
          labeler=labeler)
    print(f"[s3-bench] {name} warm-up on disk: {time.perf_counter() - clock:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {"disk": [], "s3": []}
    for r in range(repeats):
        for where in (("disk", "s3") if r % 2 == 0 else ("s3", "disk")):
            job = LabelJob(input=images[where], out=f"{out[where]}/{name}-{r}", **job_kw)
            start, clock, wall = requests.mark(), cpu.read(), time.perf_counter()
            s = label(job, progress=False, labeler=labeler)
            row = {"images_per_s": s["images_per_second"], "seconds": s["seconds"],
                   "call_s": time.perf_counter() - wall,
                   "exports_s": s["timings"]["exports"], "labeled": s["labeled"],
                   "requests": requests.since(start), **cpu.since(clock)}
            runs[where].append(row)
            print(f"[s3-bench] {name} round {r + 1} {where}: {json.dumps(row)}", flush=True)
    return runs


def prepare_runs(sources: dict, out: dict, repeats: int, requests: Requests) -> dict:
    """``ciae prepare`` (its defaults, as a Ray Data job) of ``sources[where]`` (images, JSON,
    PNG folder) into a fresh output under ``out[where]`` for where in disk, s3, ``repeats``
    rounds alternating the order, after an untimed warm-up on disk; {where: [{"images_per_s",
    "seconds", "images", "requests"}]}."""
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source

    clock = time.perf_counter()
    prepare(Source(*sources["disk"]), f"{out['disk']}/prepare-warm-up", progress=False)
    print(f"[s3-bench] prepare warm-up on disk: {time.perf_counter() - clock:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {"disk": [], "s3": []}
    for r in range(repeats):
        for where in (("disk", "s3") if r % 2 == 0 else ("s3", "disk")):
            start, clock = requests.mark(), time.perf_counter()
            m = prepare(Source(*sources[where]), f"{out[where]}/prepare-{r}", progress=False)
            seconds = time.perf_counter() - clock
            row = {"images_per_s": m["counts"]["images"] / seconds, "seconds": seconds,
                   "images": m["counts"]["images"], "requests": requests.since(start)}
            runs[where].append(row)
            print(f"[s3-bench] prepare round {r + 1} {where}: {json.dumps(row)}", flush=True)
    return runs


def scan(n: int, work: str, checkpoint: str, repeats: int, requests: Requests, task_images: int = 1024,
         direct: bool = False) -> dict:
    """Build an output of ``n`` images on S3 in tasks of ``task_images`` (the trivial job, every
    task sealed; ``direct``: ``write_finished`` instead), then re-run the job ``repeats`` times;
    the build's and the re-runs' figures."""
    from s3_server import create_bucket
    from scale import TrivialLabeler

    from pipeline.label import store as ls
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    folder = os.path.join(work, f"scan-{n}")
    link_folder(folder, n, tiny_jpegs(work, n))
    bucket = f"ciae-bench-scan-{n}"
    create_bucket(bucket)
    job = LabelJob(model=checkpoint, input=folder, out=f"s3://{bucket}/labels", batch_size=64, review=100,
                   task_images=task_images)
    start, clock = requests.mark(), time.perf_counter()
    if direct:
        write_finished(job)
        build = {"direct": True}
    else:
        first = label(job, progress=False, labeler=TrivialLabeler)
        build = {"timings": first["timings"], "labeled": first["labeled"], "images_per_s": first["images_per_second"]}
    build |= {"wall_s": time.perf_counter() - clock, "requests": requests.since(start)}
    print(f"[s3-bench] scan {n} build: {json.dumps(build)}", flush=True)

    reruns = []
    original = ls.LabelStore.summary         # the first thing the job does once its scan is over
    for _ in range(repeats):
        marks = {}

        def summary(self, *args, _original=original, _marks=marks):
            _marks.setdefault("scan_end", requests.mark())
            return _original(self, *args)

        ls.LabelStore.summary = summary
        try:
            start, clock = requests.mark(), time.perf_counter()
            again = label(job, progress=False, labeler=TrivialLabeler)
            wall = time.perf_counter() - clock
        finally:
            ls.LabelStore.summary = original
        t = again["timings"]
        row = {"scan_s": t["plan"] + t["scan"], "plan_s": t["plan"], "exports_s": t["exports"], "wall_s": wall,
               "processed": again["processed"], "labeled": again["labeled"],
               "scan_requests": requests.since(start, marks["scan_end"]), "requests": requests.since(start)}
        reruns.append(row)
        print(f"[s3-bench] scan {n} re-run: {json.dumps(row)}", flush=True)
    subprocess.run(["rm", "-rf", folder])
    return {"images": n, "task_images": task_images, "build": build, "reruns": reruns}


def write_finished(job) -> None:
    """What the trivial job leaves in ``job.out`` once it has finished, without Ray or decoding:
    the job's plan, then each task's images as ``decode`` passes a 48x32 JPEG on, through
    ``scale.TrivialLabeler``, the job's ``encode`` (one part per task) and ``LabelStore.seal``,
    and the summary of them all."""
    import numpy as np
    from scale import TrivialLabeler

    from ciae.data.panoptic import CategoryTable
    from pipeline.data.storage import read_uri
    from pipeline.label.sources import Plan, make_plan
    from pipeline.label.stages import encode
    from pipeline.label.store import LabelStore
    from pipeline.label.sources import categories_of

    store = LabelStore(job.out)
    plan = make_plan(job.input, store.plan_uri, None, None, job.task_images)
    table = CategoryTable.from_json(categories_of(plan))
    labeler = TrivialLabeler(read_uri(job.model), os.path.basename(job.model), 1, False, False)
    for task, size in enumerate(plan.task_sizes):
        entries = Plan.read_task(plan.dir, task)
        batch = {"task": np.full(size, task, np.int64),
                 **{c: np.array([e[c] for e in entries], np.int64) for c in ("index", "image_id")},
                 **{c: np.array([e[c] for e in entries], dtype=object) for c in ("key", "file_name")},
                 "height": np.full(size, 32, np.int32), "width": np.full(size, 48, np.int32),
                 "image": np.zeros((size, 1), np.uint8), "status": np.full(size, "ok", dtype=object),
                 "reason": np.full(size, "", dtype=object), "gt_runs": np.full(size, b"", dtype=object),
                 "gt_png": np.full(size, "", dtype=object), "gt_segments": np.empty(size, dtype=object)}
        encode(labeler(batch), store, table, coco_panoptic=False)
        store.seal(task, size, table, job.review)
    store.summary(job.review, table)            # job.json, as the job's end writes it


def fmt_requests(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v and k != "total") + f" (total {c['total']})"


def fmt_per_image(c: dict, images: int) -> str:
    return (", ".join(f"{k} {v / images:.3f}" for k, v in c.items() if v and k != "total")
            + f" (total {c['total'] / images:.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="synthetic images for the model runs (default 96)")
    p.add_argument("--height", type=int, default=256, help="image height (default 256)")
    p.add_argument("--width", type=int, default=256, help="image width (default 256)")
    p.add_argument("--checkpoint", default=None, help="label with this checkpoint instead of an untrained one")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of disk and S3 runs (default 3)")
    p.add_argument("--trivial-images", type=int, default=1024,
                   help="images of the trivial-model runs (default 1024; 0: none)")
    p.add_argument("--prepare-images", type=int, default=1024,
                   help="images of the `ciae prepare` runs (default 1024; 0: none)")
    p.add_argument("--scan-sizes", type=int, nargs="*", default=[10_000, 100_000],
                   help="image counts of the resume scans (default 10000 100000; none: no scan)")
    p.add_argument("--scan-repeats", type=int, default=3, help="re-runs timed per scan size (default 3)")
    p.add_argument("--scan-task-images", type=int, default=1024,
                   help="images per task (and shard) of the scanned outputs (default 1024, the job's)")
    p.add_argument("--scan-build", choices=("job", "direct"), default="job",
                   help="build the scanned outputs with the job, or write them directly (default job)")
    p.add_argument("--workdir", default=None, help="local files here (default: a temporary folder)")
    args = p.parse_args(argv)

    import moto
    import s3_server

    os.environ.setdefault("CIAE_OBJECT_STORE_MB", "300")
    port = s3_server.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(s3_server.S3_ENV, AWS_ENDPOINT_URL=endpoint)      # before Ray starts
    work = args.workdir or tempfile.mkdtemp(prefix="ciae-bench-s3-")
    server = s3_server.S3Server(port).start()
    print(f"[s3-bench] moto {moto.__version__} server pid {server.proc.pid} at {endpoint}; work {work}", flush=True)
    try:
        return run(args, work, server, moto.__version__)
    finally:
        server.stop()


def run(args, work: str, server, moto_version: str) -> int:
    import ray.cloudpickle
    import scale
    from s3_server import create_bucket, upload

    from pipeline.cluster.ray_runtime import connect
    from pipeline.data.synth import SynthSpec, write_dataset
    from pipeline.label.stages import Labeler

    ray.cloudpickle.register_pickle_by_value(scale)     # Ray's workers cannot import it
    requests, cpu = Requests(server), CpuClock(server.proc.pid)
    for bucket in (IMAGES_BUCKET, OUT_BUCKET):
        create_bucket(bucket)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    checkpoint = args.checkpoint or os.path.join(work, "model.pt")
    if not args.checkpoint:
        make_checkpoint(checkpoint)
    results: dict = {"moto": moto_version, "cores": cores}

    if args.images or args.trivial_images or args.prepare_images:
        write_dataset(os.path.join(work, "data"), args.images or 1, seed=0,
                      spec=SynthSpec(height=args.height, width=args.width))
    local_images = os.path.join(work, "data", "images")
    out = {"disk": os.path.join(work, "out"), "s3": f"s3://{OUT_BUCKET}/out"}
    uploads = []

    def to_s3(folder: str, prefix: str) -> str:
        files = sum(len(names) for _, _, names in os.walk(folder))
        start, clock = requests.mark(), time.perf_counter()
        uri = upload(folder, f"s3://{IMAGES_BUCKET}/{prefix}")
        row = {"files": files, "seconds": time.perf_counter() - clock, "requests": requests.since(start)}
        uploads.append(row)
        print(f"[s3-bench] upload {prefix}: {json.dumps(row)}", flush=True)
        return uri

    with connect():
        if args.images:
            images = {"disk": local_images, "s3": to_s3(local_images, "model/images")}
            kw = dict(model=checkpoint, workers=1, batch_size=args.batch_size, cpus_per_worker=max(0.5, cores - 1.0),
                      task_images=4 * args.batch_size)
            results["model"] = throughput("model", images, out, kw, args.repeats, requests, Labeler, cpu)
        if args.trivial_images:
            folder = os.path.join(work, "trivial-images")
            sources = sorted(os.path.join(local_images, n) for n in os.listdir(local_images))
            link_folder(folder, args.trivial_images, sources)
            images = {"disk": folder, "s3": to_s3(folder, "trivial/images")}
            kw = dict(model=checkpoint, workers=1, batch_size=64)
            results["trivial"] = throughput("trivial", images, out, kw, args.repeats, requests, scale.TrivialLabeler, cpu)
        if args.prepare_images:
            folder = os.path.join(work, "prepare-data")
            link_dataset(os.path.join(work, "data"), folder, args.prepare_images)
            root = {"disk": folder, "s3": to_s3(folder, "prepare")}
            sources = {k: [f"{r}/images", f"{r}/panoptic.json", f"{r}/panoptic"] for k, r in root.items()}
            results["prepare"] = prepare_runs(sources, out, args.repeats, requests)
        scans = []
        for n in args.scan_sizes:
            scans.append(scan(n, work, checkpoint, args.scan_repeats, requests, args.scan_task_images,
                              args.scan_build == "direct"))
    results |= {"uploads": uploads, "scans": scans}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(args, results)
    return 0


def report(args, results: dict) -> None:
    print(f"\nmoto {results['moto']} (its S3 server on 127.0.0.1), {results['cores']} CPU cores; "
          f"images/s of the labeling stage (`ciae prepare`: of the whole job), median (min-max) of "
          f"{args.repeats} rounds; S3 to S3 against disk to disk\n")
    print("| run | images | disk img/s | S3 img/s | S3 / disk | S3 requests per run | S3 requests per image |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name, what, n in (("model", f"`ciae label`, `Config.small()` untrained, {args.width}x{args.height}, batch "
                           f"{args.batch_size}, 1 actor", args.images),
                          ("trivial", "`ciae label`, trivial model stage (data path only), batch 64",
                           args.trivial_images),
                          ("prepare", f"`ciae prepare` (images and PNGs), {args.width}x{args.height}",
                           args.prepare_images)):
        if name not in results:
            continue
        disk = median_min_max([r["images_per_s"] for r in results[name]["disk"]])
        s3 = median_min_max([r["images_per_s"] for r in results[name]["s3"]])
        counts = results[name]["s3"][0]["requests"]
        print(f"| {what} | {n} | {disk[0]:.1f} ({disk[1]:.1f}-{disk[2]:.1f}) | {s3[0]:.1f} ({s3[1]:.1f}-{s3[2]:.1f}) "
              f"| {s3[0] / disk[0]:.2f} | {fmt_requests(counts)} | {fmt_per_image(counts, n)} |")
    rows = [(name, n) for name, n in (("model", args.images), ("trivial", args.trivial_images)) if name in results]
    if rows:
        print("\nCPU of the whole `label` call, median: the job's (every process on the machine but the S3 "
              "server's) and the server's, ms per image, and the share of the cores busy. With the store "
              "elsewhere the server's share leaves the machine: a CPU-bound job's S3 / disk rate is then "
              "its disk / S3 job CPU.\n")
        print("| run | disk: job CPU | cores busy | S3: job CPU | server CPU | cores busy | disk / S3 job CPU |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, n in rows:
            def ms(where, key):
                return 1e3 * statistics.median(r[key] for r in results[name][where]) / n

            def busy(where):
                return statistics.median((r["job_cpu_s"] + r["server_cpu_s"]) / (r["call_s"] * results["cores"])
                                         for r in results[name][where])
            print(f"| {name} | {ms('disk', 'job_cpu_s'):.2f} | {busy('disk'):.0%} | {ms('s3', 'job_cpu_s'):.2f} "
                  f"| {ms('s3', 'server_cpu_s'):.2f} | {busy('s3'):.0%} "
                  f"| {ms('disk', 'job_cpu_s') / ms('s3', 'job_cpu_s'):.2f} |")
    for u in results["uploads"]:
        print(f"\nupload of {u['files']} files: {u['seconds']:.1f} s ({u['files'] / u['seconds']:.0f} files/s), "
              f"{fmt_requests(u['requests'])}")
    if results["scans"]:
        print(f"\nResume scan on S3 (trivial model stage; images on local disk; tasks of {args.scan_task_images}; "
              f"median (min-max) of {args.scan_repeats} re-runs)\n")
        print("| images | build: img/s | build wall s | resume scan s | scan's S3 requests | re-run wall s | "
              "re-run's S3 requests | processed again |")
        print("|---:|---:|---:|---:|---|---:|---|---:|")
        for s in results["scans"]:
            b, rr = s["build"], s["reruns"]
            sc, wall = median_min_max([r["scan_s"] for r in rr]), median_min_max([r["wall_s"] for r in rr])
            rate = "direct" if b.get("direct") else f"{b['images_per_s']:.0f}"
            print(f"| {s['images']} | {rate} | {b['wall_s']:.0f} | {sc[0]:.2f} ({sc[1]:.2f}-{sc[2]:.2f}) "
                  f"| {fmt_requests(rr[0]['scan_requests'])} | {wall[0]:.2f} ({wall[1]:.2f}-{wall[2]:.2f}) "
                  f"| {fmt_requests(rr[0]['requests'])} | {max(r['processed'] for r in rr)} |")


if __name__ == "__main__":
    raise SystemExit(main())
