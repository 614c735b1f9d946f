"""The real jobs on one GPU machine: ``ciae prepare``, ``ciae train --workers 1 --gpus-per-worker 1``
(the paper's R50-FPN at shorter side 800, bf16 autocast, Triton loss) and ``ciae label`` with
one GPU actor on synthetic JPEGs, each a subprocess running the command line as a user would;
what each costs. ``benchmarks/gpu/jobs.sh`` runs it with Ray and MLflow on the path (README.md
beside this file).

    python benchmarks/gpu/jobs.py OUT [--smoke] [--budget-s 420] [--train-steps 300] [--label-images 2048]

Phases: env (versions, the device), data (synthetic COCO-category training images at 480x640,
a quarter of them turned to 640x480, trained at shorter side 800 in steps of one orientation;
labeling JPEGs at COCO's sizes and orientations, ``LABEL_SIZES``, 64 distinct renders written
many times with jitter; on every CPU), prepare, train, label, label_compile (the same
``ciae label`` with ``--compile``, into its own output). The budget is checked between phases:
training gets what is left after a reserve for labeling, past its share its process group is
stopped and labeling takes the newest checkpoint Ray Train stored; labeling takes fewer images
when little time is left. OUT/jobs.json holds every figure (rewritten through a temporary name after each
phase), OUT/jobs.md the same as tables, OUT/commands.log the commands' output, OUT/gpu.csv the
nvidia-smi samples (time, utilisation %, memory MiB). Work files go to --work. ``--smoke``: the
same on the CPU with tiny sizes (Config.small() at 64 px, a few images), the three commands on
one local Ray started for them (or on the Ray ``--address`` names: tests/test_ray_tree.py's
session's); its times mean nothing.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.data.storage import write_uri  # noqa: E402

RUN_NAME = "jobs"
# the labeling images' (h, w), a COCO-like mix: of 8 renders, 4 at 480x640, 2 at 427x640 and one
# portrait of each (in batches of mixed orientations, padding would cost the network ~1.5x the pixels
# it labels; the model actor batches like shapes together, ciae.data.transform.batch_order)
LABEL_SIZES = {False: [(480, 640)] * 4 + [(427, 640)] * 2 + [(640, 480), (640, 427)],
               True: [(96, 128), (128, 96)]}
# per mode: (train images, h, w), label distinct images, batch per worker, label batch and
# task size, labeling reserve s (two runs: as it is and --compile), labeling overhead s per run,
# compile s (a guess, sizing the input) and an assumed rate (img/s) to size its input, the least
# time worth training for, Ray's object store
SIZES = {False: {"train": (64, 480, 640), "label": 64, "batch": 8, "label_batch": 16,
                 "task_images": 256, "reserve_s": 220, "label_overhead_s": 45, "compile_s": 90,
                 "label_rate": 150, "min_train_s": 60, "object_store_mb": 8192},
         True: {"train": (16, 64, 96), "label": 8, "batch": 2, "label_batch": 4, "task_images": 8,
                "reserve_s": 300, "label_overhead_s": 120, "compile_s": 0, "label_rate": 2, "min_train_s": 60,
                "object_store_mb": 300}}


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Record:
    """jobs.json and jobs.md, rewritten whenever a figure arrives."""

    def __init__(self, out: Path):
        self.out, self.data = out, {"phases": {}}

    def set(self, phase: str, **figures) -> None:
        self.data["phases"].setdefault(phase, {}).update(figures)
        write_uri(str(self.out / "jobs.json"), json.dumps(self.data, indent=1, default=str).encode())
        write_uri(str(self.out / "jobs.md"), self.markdown().encode())

    def markdown(self) -> str:
        lines = []
        for phase, figures in self.data["phases"].items():
            lines += [f"## {phase}", "", "| figure | value |", "| --- | --- |"]
            for k, v in figures.items():
                if isinstance(v, (dict, list)) or (isinstance(v, str) and "\n" in v):
                    continue
                lines.append(f"| {k} | {fmt(v)} |")
            lines.append("")
        return "\n".join(lines)


class GpuSampler(threading.Thread):
    """nvidia-smi every 0.5 s: (time, utilisation %, memory MiB) rows, also written to gpu.csv."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.rows: list[tuple[float, float, float]] = []
        self.path = path
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
               "-lms", "500"]
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def run(self) -> None:
        if self.proc is None:
            return
        with open(self.path, "w") as f:
            f.write("time,utilization_gpu_pct,memory_used_mib\n")
            for line in self.proc.stdout:
                try:
                    util, mem = (float(x) for x in line.split(",")[:2])
                except ValueError:
                    continue
                self.rows.append((time.time(), util, mem))
                f.write(f"{self.rows[-1][0]:.2f},{util:g},{mem:g}\n")
                f.flush()

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [r for r in self.rows if t0 <= r[0] <= t1]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def command(args: list[str], log: Path, timeout: float, env: dict) -> dict:
    """Run ``python -m workflows.cli ARGS`` in its own process group, its output appended to
    ``log``; past ``timeout`` the group gets SIGINT, then SIGKILL. Returns {"rc", "seconds",
    "timed_out", "start", "output" (its last 20,000 characters)}."""
    cmd = [sys.executable, "-m", "workflows.cli", *args]
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        tail: list[str] = []
        timer = threading.Timer(max(1.0, timeout), _stop_group, (proc,))
        timer.start()
        for line in proc.stdout:
            f.write(line)
            f.flush()
            tail.append(line)
        proc.wait()
        timer.cancel()
    return {"rc": proc.returncode, "seconds": time.time() - start, "start": start,
            "timed_out": bool(getattr(proc, "stopped", False)), "output": "".join(tail)[-20000:]}


def _stop_group(proc: subprocess.Popen) -> None:
    proc.stopped = True
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def requirement_conflicts(packages: list[str]) -> list[str]:
    """Requirements of the tree's packages that the installed versions (the machine's own
    among them) do not satisfy: what would break first, if anything does."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    problems = []
    for name in packages:
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:     # left out on purpose (ray_tree.sh's NOT_NEEDED)
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, found {have}")
    return problems


# ---------------------------------------------------------------------------- data


def _synth_part(args) -> dict:
    from pipeline.data.synth import SynthSpec, coco_categories, write_dataset

    folder, n, seed, h, w = args
    return write_dataset(folder, n, seed=seed, categories=coco_categories(),
                         spec=SynthSpec(height=h, width=w, min_things=6, max_things=10))


def training_data(root: Path, n: int, h: int, w: int, procs: int) -> Path:
    """A synthetic dataset of ``n`` images in COCO's 133 categories (1-3 stuff bands, 6-10
    things) made on ``procs`` processes: parts with their own seeds (so file names differ), every
    fourth part turned to w x h (portraits, as a quarter of COCO: with aspect grouping a step pads
    no more than one of a single size, so its pixels stay the bare step's), merged into one
    folder with image ids 1..n."""
    parts = [(str(root / f"part{k}"), len(range(k, n, procs)), 100 + k, *((w, h) if k % 4 == 3 else (h, w)))
             for k in range(min(procs, n))]
    with multiprocessing.get_context("spawn").Pool(len(parts)) as pool:
        docs = pool.map(_synth_part, parts)
    for sub in ("images", "panoptic"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    merged = {"info": docs[0]["info"], "images": [], "annotations": [], "categories": docs[0]["categories"]}
    for (folder, *_), doc in zip(parts, docs):
        for image, ann in zip(doc["images"], doc["annotations"]):
            new_id = len(merged["images"]) + 1
            os.replace(os.path.join(folder, "images", image["file_name"]), root / "images" / image["file_name"])
            os.replace(os.path.join(folder, "panoptic", ann["file_name"]), root / "panoptic" / ann["file_name"])
            merged["images"].append(image | {"id": new_id})
            merged["annotations"].append(ann | {"image_id": new_id})
        shutil.rmtree(folder)
    (root / "panoptic.json").write_text(json.dumps(merged))
    return root


def _label_copies(args) -> int:
    """Render distinct image k and write it as JPEG copies k, k + step, ... each with its own
    jitter (a brightness offset and a horizontal shift), so that no two files are alike."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.synth import SynthSpec, coco_categories, render

    folder, k, step, total, sizes = args
    h, w = sizes[k % len(sizes)]
    rgb = render(coco_categories(), k, 7, SynthSpec(height=h, width=w, min_things=6, max_things=10))[0]
    written = 0
    for j in range(k, total, step):
        rng = np.random.default_rng(j)
        image = np.roll(rgb, int(rng.integers(0, w)), axis=1).astype(np.int16) + int(rng.integers(-20, 21))
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (Path(folder) / f"{j:06d}.jpg").write_bytes(buf.getvalue())
        written += 1
    return written


def label_images(folder: Path, total: int, distinct: int, sizes: list[tuple[int, int]], procs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(distinct, total)
    with multiprocessing.get_context("spawn").Pool(min(procs, distinct)) as pool:
        pool.map(_label_copies, [(str(folder), k, distinct, total, sizes) for k in range(distinct)])
    return folder


# ---------------------------------------------------------------------------- figures


def train_figures(tracking: str, start: float, batch: int) -> dict:
    """From the run's MLflow metrics (rank 0 logs every step): steps, time to the first step
    (from the command's start), images/s (data wait included) and the compute-only rate
    (batch / step time), medians over the steps after the first tenth, and the losses."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`ciae.run_name` = '{RUN_NAME}'")
    if not runs:
        return {}
    run_id = runs[0].info.run_id
    hist = {k: sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)
            for k in ("images_per_s", "step_time", "loss")}
    if not hist["loss"]:
        return {"mlflow_run": run_id}
    steady = [m for m in hist["images_per_s"] if m.step > max(1, len(hist["images_per_s"]) // 10)]
    step_times = [m.value for m in hist["step_time"] if m.step > max(1, len(hist["step_time"]) // 10)]
    return {"mlflow_run": run_id, "steps_done": hist["loss"][-1].step,
            "time_to_first_step_s": hist["loss"][0].timestamp / 1000 - start,
            "images_per_s": statistics.median(m.value for m in steady) if steady else None,
            "compute_images_per_s": batch / statistics.median(step_times) if step_times else None,
            "step_ms": 1000 * statistics.median(step_times) if step_times else None,
            "first_loss": hist["loss"][0].value, "last_loss": hist["loss"][-1].value,
            "losses_finite": all(math.isfinite(m.value) for m in hist["loss"])}


def attempt(fn, *args):
    """``fn(*args)``, or {"figures_error": what went wrong}: a figure that cannot be read loses
    nothing else."""
    try:
        return fn(*args)
    except Exception as e:
        return {"figures_error": f"{fn.__name__}: {type(e).__name__}: {e}"}


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def stage_figures(stats: str, images: int, actor_cpus: float, cpus: int) -> dict:
    """Ray Data's per-operator statistics -> what each side could label per second from its
    summed task time: the one model actor alone, and the CPU tasks (decode, encode) on the CPUs
    the actor leaves; the smaller capacity limits."""
    ops = {}
    for block in re.split(r"\n(?=Operator \d+ )", stats):
        head = re.match(r"Operator \d+ (.+?):", block)
        wall = re.search(r"Remote wall time: .*?, ([\d.]+)(us|ms|s|m) total", block)
        if head and wall:
            ops[head[1]] = float(wall[1]) * _UNITS[wall[2]]
    actor = sum(v for k, v in ops.items() if "Labeler" in k)
    decode = sum(v for k, v in ops.items() if "decode" in k and "Labeler" not in k)
    encode = sum(v for k, v in ops.items() if "encode" in k and "Labeler" not in k)
    if not (images and actor and decode + encode):
        return {"stage_task_seconds": ops}
    capacity = {"actor": images / actor, "cpu_tasks": images * max(1.0, cpus - actor_cpus) / (decode + encode)}
    return {"stage_task_seconds": ops, "actor_capacity_images_per_s": capacity["actor"],
            "cpu_capacity_images_per_s": capacity["cpu_tasks"], "cpu_decode_share": decode / (decode + encode),
            "limited_by": ("the model actor" if capacity["actor"] <= capacity["cpu_tasks"] else
                           f"CPU tasks ({'decode' if decode >= encode else 'encode'} the larger)")}


def steady_rate(labels: Path, task_images: int) -> float | None:
    """Images per second between the first and the last sealed task (each seals
    ``task_images`` images), which leaves out start-up: Ray, the model's load, compiles."""
    times = sorted(os.path.getmtime(f) for f in glob.glob(str(labels / "labels" / "*.parquet")))
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return task_images * (len(times) - 1) / (times[-1] - times[0])


def segments_per_image(labels: Path) -> float | None:
    from pipeline.data.storage import read_parquet

    if not glob.glob(str(labels / "labels" / "*.parquet")):
        return None
    t = read_parquet(str(labels), columns=["status", "segments"]).to_pydict()     # the output as a dataset
    counts = [len(s) for st, s in zip(t["status"], t["segments"]) if st == "labeled"]
    return sum(counts) / len(counts) if counts else None


# ---------------------------------------------------------------------------- phases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for jobs.json, jobs.md, commands.log and gpu.csv")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 420; smoke 900)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default 300; smoke 3)")
    p.add_argument("--label-images", type=int, default=None, help="images to label (default 2048; smoke 24)")
    p.add_argument("--work", default=None, help="work folder, emptied first (default: $TMPDIR/ciae-jobs)")
    p.add_argument("--address", default=None,
                   help="a running Ray the commands use (default: each starts its own; smoke: one "
                        "local Ray started for the three)")
    args = p.parse_args(argv)
    if args.address or not args.smoke:
        return run(args, args.address)
    # the smoke's three commands share one local Ray, started here (--address): on 2 CPUs each
    # command's own start and stop of Ray take 3-4 s, most of a tiny job; on the GPU machine
    # each command starts its own, as a user's would, and its figures include that
    import ray

    from pipeline.cluster.ray_runtime import connect

    with connect():
        return run(args, ray.get_runtime_context().gcs_address)


def run(args, ray_address: str | None) -> int:
    """The phases; the commands connect to ``ray_address`` (None: each starts a local Ray)."""
    t0 = time.time()
    smoke, size = args.smoke, SIZES[args.smoke]
    deadline = t0 + (args.budget_s or (900 if smoke else 420))
    steps = args.train_steps or (3 if smoke else 300)
    n_label = args.label_images or (24 if smoke else 2048)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), "ciae-jobs"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = out / "commands.log"
    log.write_text("")
    cpus = os.cpu_count() or 1
    env = dict(os.environ, RAY_AUTH_MODE="disabled", CIAE_OBJECT_STORE_MB=str(size["object_store_mb"]),
               TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    rec = Record(out)
    left = lambda: deadline - time.time()   # noqa: E731

    def say(msg: str) -> None:
        print(f"[jobs {time.time() - t0:6.1f}s] {msg}", flush=True)

    # env: what runs, without touching the GPU (no CUDA context in this process)
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "triton", "ray", "mlflow-skinny", "mlflow", "pydantic", "jsonschema", "numpy",
                 "pandas", "pyarrow", "protobuf", "pillow"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    tree = os.environ.get("CIAE_RAY_TREE")
    tree = json.loads((Path(tree) / "tree.json").read_text()) if tree else None
    conflicts = attempt(requirement_conflicts, list(tree["packages"])) if tree else None
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None
    rec.set("env", python=sys.version.split()[0], cpus=cpus, gpu=gpu, versions=versions, smoke=smoke, tree=tree,
            requirement_conflicts=conflicts, budget_s=deadline - t0, train_steps=steps, label_images=n_label)
    say(f"{gpu or 'no GPU'}; {cpus} CPUs; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if conflicts:
        say(f"requirements the installed versions do not meet: {conflicts}")
    sampler = GpuSampler(out / "gpu.csv")
    sampler.start()

    # data
    t = time.time()
    n, h, w = size["train"]
    synth = training_data(work / "synth", n, h, w, procs=cpus)
    made_train, t = time.time() - t, time.time()
    distinct, label_sizes = size["label"], LABEL_SIZES[smoke]
    images = label_images(work / "label_images", n_label, distinct, label_sizes, cpus)
    rec.set("data", train_images=n, train_size=f"{h}x{w}", train_seconds=made_train, label_images=n_label,
            label_distinct=distinct, label_sizes=" ".join(sorted({f"{a}x{b}" for a, b in label_sizes})),
            label_seconds=time.time() - t)
    say(f"data: {n} training images in {made_train:.1f} s, {n_label} JPEGs in {time.time() - t:.1f} s")

    # prepare
    shards = work / "shards"
    at = ["--address", ray_address] if ray_address else []
    r = command(["prepare", *at, "--images", str(synth / "images"), "--panoptic-json", str(synth / "panoptic.json"),
                 "--panoptic-dir", str(synth / "panoptic"), "--out", str(shards), "--rows-per-shard", "16"],
                log, left() - size["reserve_s"] - 30, env)
    rec.set("prepare", rc=r["rc"], seconds=r["seconds"], timed_out=r["timed_out"])
    say(f"prepare: rc {r['rc']} in {r['seconds']:.1f} s")
    if r["rc"] != 0:
        return _finish(rec, sampler, say, t0, "prepare failed: see commands.log")

    # train
    config = ({"base": "small", "input": {"shorter_sides": [64], "max_size": 96, "test_shorter_side": 64}}
              if smoke else {"base": "paper", "backbone": {"norm": "bn", "freeze_at": 0}})
    # a checkpoint every 20 steps: training stopped at its share still leaves one to label with
    # (the first H200 run, 2026-12-04, trained 44 steps of 300 in its share and had none)
    config["solver"] = {"iterations": steps, "warmup_iters": min(100, steps // 2),
                        "checkpoint_every": max(1, min(20, steps // 2)), "clip_grad_norm": 10.0}
    (work / "train.json").write_text(json.dumps(config))
    tracking = f"sqlite:///{work}/mlruns/mlflow.db"
    gpus = "0" if smoke else "1"
    rec.set("train", config=config, command="ciae train --workers 1 --gpus-per-worker " + gpus
            + f" --batch-per-worker {size['batch']}")
    if left() - size["reserve_s"] < size["min_train_s"]:
        return _finish(rec, sampler, say, t0, f"out of time before training ({left():.0f} s left)")
    r = command(["train", *at, "--data", str(shards), "--config", str(work / "train.json"), "--workers", "1",
                 "--gpus-per-worker", gpus, "--batch-per-worker", str(size["batch"]), "--storage",
                 str(work / "ray_results"), "--name", RUN_NAME, "--tracking-uri", tracking, "--experiment", "jobs",
                 "--pictures", "0"], log, left() - size["reserve_s"], env)
    samples = sampler.window(r["start"], r["start"] + r["seconds"])
    rec.set("train", rc=r["rc"], seconds=r["seconds"], timed_out=r["timed_out"],
            peak_gpu_memory_mib=max((s[2] for s in samples), default=None),
            **attempt(train_figures, tracking, r["start"], size["batch"]))
    figs = rec.data["phases"]["train"]
    say(f"train: rc {r['rc']} in {r['seconds']:.1f} s, {figs.get('steps_done')} steps, "
        f"{fmt(figs.get('images_per_s'))} img/s, first step after {fmt(figs.get('time_to_first_step_s'))} s, "
        f"peak {figs['peak_gpu_memory_mib']} MiB")
    checkpoints = sorted(glob.glob(str(work / "ray_results" / "**" / "checkpoint.pt"), recursive=True),
                         key=os.path.getmtime)
    if not checkpoints:
        return _finish(rec, sampler, say, t0, "no checkpoint to label with: see commands.log")

    # label: with the checkpoint file (no registry involved), twice on the same images: as it is,
    # then with --compile (each into its own output); fewer images when time is short
    k = min(n_label, max(distinct, int((left() - 2 * size["label_overhead_s"] - size["compile_s"])
                                       * size["label_rate"] / 2)))
    source = images
    if k < n_label:
        source = work / "label_list.txt"
        source.write_text("".join(f"label_images/{j:06d}.jpg\n" for j in range(k)))
    actor_cpus = 0.5 if smoke else 1.0
    for phase, extra in (("label", []), ("label_compile", ["--compile"])):
        if phase != "label" and left() < size["label_overhead_s"] + size["compile_s"]:
            rec.set(phase, skipped=f"out of time ({left():.0f} s left)")
            break
        # torch.compile's recompiles, logged by the actor (TORCH_LOGS) into Ray's worker logs
        r = command(["label", *at, "--model", checkpoints[-1], "--input", str(source), "--out",
                     str(work / phase), "--workers", "1", "--gpus-per-worker", gpus, "--cpus-per-worker",
                     str(actor_cpus), "--batch-size", str(size["label_batch"]), "--task-images",
                     str(size["task_images"]), "--stats", *extra], log, left() - 5,
                    env | ({"TORCH_LOGS": "recompiles"} if extra else {}))
        figs = label_figures(r, sampler, work / phase, k, size["task_images"], actor_cpus, cpus)
        if extra:
            figs["recompiles"] = attempt(recompiles, r["start"])
        rec.set(phase, command=" ".join(["ciae label", *extra]), checkpoint=os.path.relpath(checkpoints[-1], work),
                **figs)
        say(f"{phase}: rc {r['rc']}, {figs['labeled']} images in {figs['labeling_seconds']} s: "
            f"{fmt(figs.get('images_per_s'))} img/s (steady {fmt(figs.get('steady_images_per_s'))}), GPU busy "
            f"{fmt(figs.get('gpu_busy_while_active'))}, limited by {figs.get('limited_by')}")
        if r["rc"] != 0:
            return _finish(rec, sampler, say, t0, f"{phase} failed: see commands.log")
    return _finish(rec, sampler, say, t0, None)


def label_figures(r: dict, sampler: GpuSampler, labels: Path, images: int, task_images: int, actor_cpus: float,
                  cpus: int) -> dict:
    """One ``ciae label`` command's figures, from its output, its shards and the GPU samples."""
    m = re.search(r"(\d+) of \d+ images labeled .*? this run in ([\d.]+) s", r["output"])
    first_op = re.search(r"^Operator \d+ ", r["output"], re.M)
    stats = r["output"][first_op.start():] if first_op else ""
    labeled, seconds = (int(m[1]), float(m[2])) if m else (None, None)
    samples = sampler.window(r["start"], r["start"] + r["seconds"])
    active = [s for s in samples if s[1] > 0]
    active = [s for s in samples if active and active[0][0] <= s[0] <= active[-1][0]]
    return dict(rc=r["rc"], seconds=r["seconds"], timed_out=r["timed_out"], images=images, labeled=labeled,
                labeling_seconds=seconds, images_per_s=labeled / seconds if m and seconds else None,
                steady_images_per_s=attempt(steady_rate, labels, task_images),
                command_images_per_s=labeled / r["seconds"] if m else None,
                gpu_busy=sum(s[1] for s in samples) / (100 * len(samples)) if samples else None,
                gpu_busy_while_active=sum(s[1] for s in active) / (100 * len(active)) if active else None,
                segments_per_image=attempt(segments_per_image, labels),
                **attempt(stage_figures, stats, labeled, actor_cpus, cpus), ray_data_stats=stats)


def recompiles(since: float) -> int:
    """``torch._dynamo``'s "Recompiling function" lines in the worker logs of the newest local Ray
    session written since ``since`` (a compiled actor's: one per graph after its first)."""
    root = os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR", "/tmp"), "ray",
                        "session_latest", "logs")
    count = 0
    for path in glob.glob(os.path.join(root, "worker-*")):
        if os.path.getmtime(path) >= since:
            with open(path, errors="replace") as f:
                count += sum("Recompiling function" in line for line in f)
    return count


def _finish(rec: Record, sampler: GpuSampler, say, t0: float, problem: str | None) -> int:
    sampler.stop()
    rec.set("end", seconds=time.time() - t0, problem=problem)
    say(problem or f"done: figures in {rec.out}/jobs.json and jobs.md")
    print(rec.markdown())
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
