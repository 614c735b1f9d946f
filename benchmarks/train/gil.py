"""Does anything in the training process compete with a GPU step for the interpreter? A CPU proxy.

A GPU step is a few thousand small ops issued from Python, each of which releases and re-takes
the GIL, and then a wait on the device that releases it. Any thread of the training process that
holds the GIL meanwhile delays every op. This benchmark runs the real training worker's data
stream (``workflows.jobs.train_worker._batches`` inside a Ray Train worker, as ``ciae train`` runs it)
with the model step replaced by a stand-in: ``--ops`` small torch ops, timed, then a
``--gpu-ms`` sleep (the GPU's share, GIL released). Beside it, the same stand-in runs in a bare
Ray actor that streams nothing, under the same machine load. It reports:

* op-issue time per step, median and p90, in the worker and in the bare actor, and their ratio;
* how often a thread other than the training thread holds the worker's GIL: ``py-spy dump`` of
  the worker process, ``--samples`` times during the run.

On a machine with few cores the data tasks' decoding takes the cores the training thread needs,
which a GPU host (16 cores for one GPU) does not: ``--pin`` gives the two stand-in threads (the
worker's training thread and the bare actor's) core 0 and everything else (Ray, the data tasks,
the worker's other threads) the other cores, so that the ratio measures the training process
and not the machine's shortage of cores.

Usage (as the issue measured it: a node declaring 16 CPUs and a 2 GiB object store, 800 px,
batch 8, one worker with 4 CPUs)::

    python benchmarks/train/gil.py --workdir /tmp/gil [--size 800] [--batch 8] [--steps 24]

Prints one JSON object; ``--out FILE`` writes it too. Needs ``py-spy`` (pip) for the GIL share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

STANDIN = "standin_step"    # the function py-spy finds on the training thread's stack


def standin_step(ops: int, gpu_s: float) -> float:
    """Issue ``ops`` small torch ops (a GPU step's launches), then wait ``gpu_s`` with the GIL
    released (the device's work). Returns the seconds the ops took to issue."""
    import torch

    x = torch.ones(8, 8)
    t0 = time.perf_counter()
    for _ in range(ops // 2):
        x = x * 1.0001 + 0.0001
    issued = time.perf_counter() - t0
    time.sleep(gpu_s)
    return issued


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"steps": len(times), "issue_ms_median": 1e3 * statistics.median(times),
            "issue_ms_p90": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))]}


def pin_this_thread(cores: set[int] | None) -> None:
    """Run the calling thread (only it: Linux affinity is per thread) on ``cores``, if given."""
    if cores:
        os.sched_setaffinity(0, cores)


def worker_loop(config: dict) -> None:
    """A Ray Train worker: the real stream of ``ciae train``, the stand-in for the step."""
    import ray.train

    from workflows.jobs.train_worker import _batches

    pin_this_thread(config["pin"])
    with open(config["pid_file"], "w") as f:
        f.write(str(os.getpid()))
    times = []
    for k, _batch in enumerate(_batches(config["spec"], 0, 0, 1)):
        issued = standin_step(config["ops"], config["gpu_s"])
        if k >= config["warmup"]:
            times.append(issued)
    with open(config["result_file"], "w") as f:
        json.dump(times, f)
    ray.train.report({"steps": len(times)})


def bare_loop(ops: int, gpu_s: float, stop_file: str, pin: set[int] | None) -> list[float]:
    """The stand-in alone, until ``stop_file`` exists (10 minutes at most)."""
    pin_this_thread(pin)
    times, until = [], time.time() + 600
    while not os.path.exists(stop_file) and time.time() < until:
        times.append(standin_step(ops, gpu_s))
    return times


def gil_samples(pid: int, n: int, every_s: float, stop: threading.Event) -> dict:
    """``py-spy dump`` of ``pid`` ``n`` times: how often the GIL was held by the training thread
    (its stack has the stand-in or the model step), by another thread, or by none."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    counts = {"training": 0, "other": 0, "none": 0, "failed": 0}
    others: dict[str, int] = {}
    for _ in range(n):
        if stop.wait(every_s):
            break
        out = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                             text=True).stdout
        blocks = re.split(r"^(?=Thread )", out, flags=re.M)
        holders = [b for b in blocks if b.startswith("Thread ") and "+gil)" in b.split("\n", 1)[0]]
        if "Thread " not in out:
            counts["failed"] += 1
        elif not holders:
            counts["none"] += 1
        elif STANDIN in holders[0] or "worker_loop" in holders[0]:
            counts["training"] += 1
        else:
            counts["other"] += 1
            frames = [ln.strip() for ln in holders[0].split("\n")[1:] if ln.strip()]
            key = frames[0] if frames else "?"
            others[key] = others.get(key, 0) + 1
    taken = counts["training"] + counts["other"] + counts["none"]
    return {**counts, "other_share": counts["other"] / taken if taken else None,
            "other_top": sorted(others.items(), key=lambda kv: -kv[1])[:3]}


def make_shards(workdir: str, n: int, size: int) -> str:
    """Synthetic COCO panoptic data at ``size`` x 4/3 ``size``, prepared in this process (cached)."""
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source
    from pipeline.data.synth import SynthSpec, write_dataset

    shards = os.path.join(workdir, f"shards-{n}-{size}")
    if not os.path.exists(os.path.join(shards, "_manifest.json")):
        data = os.path.join(workdir, f"data-{n}-{size}")
        if not os.path.exists(os.path.join(data, "panoptic.json")):
            write_dataset(data, n, seed=0, spec=SynthSpec(height=size, width=size * 4 // 3))
        prepare(Source(os.path.join(data, "images"), os.path.join(data, "panoptic.json"),
                       os.path.join(data, "panoptic")), shards, rows_per_shard=16, progress=False, in_process=True)
    return shards


def run(args) -> dict:
    import dataclasses

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ciae.config import Config
    from pipeline.data.shards import model_categories, read_manifest
    from workflows.jobs.train_worker import WorkerSpec

    os.makedirs(args.workdir, exist_ok=True)
    shards = args.shards or make_shards(args.workdir, args.images, args.size)
    cfg = Config().merged({"input": {"shorter_sides": (args.size,), "max_size": args.size * 4 // 3 + 32},
                           "solver": {"batch_size": args.batch, "iterations": args.steps + args.warmup}})
    stuff, thing, names = model_categories(read_manifest(shards))
    fields = {f.name for f in dataclasses.fields(WorkerSpec)}
    spec = WorkerSpec(**{k: v for k, v in dict(
        config=cfg, stuff_ids=stuff, thing_ids=thing, category_names=names, data=shards, val=None,
        batch_per_worker=args.batch, threads=args.cpus_per_worker, eval_every=0, tracking=None, run_id="",
        data_window=None).items() if k in fields})
    temp = tempfile.mkdtemp(prefix="ray-gil-", dir="/tmp")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = sorted(os.sched_getaffinity(0))
    pin = {cores[0]} if args.pin and len(cores) > 1 else None
    if pin:     # Ray and all it starts inherit the other cores; the stand-in threads move to core 0
        os.sched_setaffinity(0, set(cores[1:]))
    ray.init(num_cpus=args.cpus, object_store_memory=int(args.store_gb * 2**30), include_dashboard=False,
             _temp_dir=temp, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        if "data_window" in fields:
            from workflows.jobs.train import _data_window

            spec = dataclasses.replace(spec, data_window=_data_window(cfg, args.batch, 1, args.cpus_per_worker))
        pid_file, result_file, stop_file = (os.path.join(args.workdir, f)
                                            for f in ("worker.pid", "worker.json", "bare.stop"))
        for f in (pid_file, result_file, stop_file):
            if os.path.exists(f):
                os.remove(f)
        config = {"spec": spec, "ops": args.ops, "gpu_s": args.gpu_ms / 1e3, "warmup": args.warmup,
                  "pid_file": pid_file, "result_file": result_file, "pin": pin}
        trainer = TorchTrainer(worker_loop, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=1,
                                                            resources_per_worker={"CPU": args.cpus_per_worker}),
                               run_config=RunConfig(name="gil", storage_path=os.path.join(args.workdir, "ray")))
        done = threading.Event()
        fit = threading.Thread(target=lambda: (trainer.fit(), done.set()), daemon=True)
        fit.start()
        while not os.path.exists(pid_file) and fit.is_alive():
            time.sleep(0.2)
        if not fit.is_alive():
            raise RuntimeError("the training worker ended before it started streaming")
        pid = int(open(pid_file).read())
        # the bare stand-in beside it, under the same load
        bare = ray.remote(num_cpus=0)(bare_loop).remote(args.ops, args.gpu_ms / 1e3, stop_file, pin)
        gil = gil_samples(pid, args.samples, args.sample_every_s, done)
        fit.join()
        open(stop_file, "w").close()
        bare_times = ray.get(bare)[args.warmup:]
        worker = json.load(open(result_file))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    w, b = _summary(worker), _summary(bare_times)
    return {"size": args.size, "batch": args.batch, "images": args.images, "steps": args.steps,
            "worker_ms": [round(1e3 * t, 1) for t in worker], "ops": args.ops, "gpu_ms": args.gpu_ms, "cpus": args.cpus,
            "store_gb": args.store_gb, "pinned": sorted(pin) if pin else None, "worker": w, "bare": b,
            "ratio_median": w["issue_ms_median"] / b["issue_ms_median"],
            "ratio_p90": w["issue_ms_p90"] / b["issue_ms_p90"], "gil": gil}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ciae-gil"))
    p.add_argument("--size", type=int, default=800, help="shorter side of the images")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shards", help="prepared shards to stream (default: synthetic ones made in --workdir)")
    p.add_argument("--images", type=int, default=208, help="images of the synthetic dataset (the plan "
                   "runs over it epoch after epoch)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ops", type=int, default=1900, help="ops of the stand-in step")
    p.add_argument("--gpu-ms", type=float, default=100.0, help="the stand-in step's device time")
    p.add_argument("--cpus", type=int, default=16, help="CPUs the Ray node declares")
    p.add_argument("--cpus-per-worker", type=float, default=4)
    p.add_argument("--store-gb", type=float, default=2.0)
    p.add_argument("--pin", action="store_true", help="the stand-in threads on core 0, all else on the "
                   "other cores (a GPU host's spare cores, on a small machine)")
    p.add_argument("--samples", type=int, default=30, help="py-spy dumps of the worker")
    p.add_argument("--sample-every-s", type=float, default=0.3)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
