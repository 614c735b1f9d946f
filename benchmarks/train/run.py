"""Training throughput: images/s per worker with Ray Train on 1 and 2 (or more) workers, against
the single-process training step without Ray in the same run, and the scaling efficiency.

CPU (default): ``Config.small()`` on synthetic 192x192 shards; each Ray Train worker gets
``--cpus-per-worker`` CPUs and one torch thread per whole CPU (at least one); the single-process
baseline runs with as many threads as one worker.

    python benchmarks/train/run.py --steps 40 --workers 1 2

GPU (one GPU, no Ray): the training step of the paper's ResNet-50 at shorter side 800, batch 2,
bfloat16 autocast, on synthetic tensors.

    python benchmarks/train/run.py --gpu --steps 30

Figures are medians over the steps after ``--warmup``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import torch

from ciae.config import Config


def make_shards(root: str, n: int, size: int) -> str:
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source
    from pipeline.data.synth import SynthSpec, write_dataset

    src = os.path.join(root, "synth")
    write_dataset(src, n, seed=0, spec=SynthSpec(height=size, width=size))
    out = os.path.join(root, "shards")
    prepare(Source(os.path.join(src, "images"), os.path.join(src, "panoptic.json"),
                   os.path.join(src, "panoptic")), out, progress=False)
    return out


def single_process(shards: str, cfg: Config, batch: int, steps: int, warmup: int, threads: int) -> float:
    """Images/s of ``ciae.engine.train.Trainer`` in this process (no Ray, no DDP)."""
    from ciae.engine.train import Trainer
    from pipeline.feed.stream import batch_stream, model_for_shards

    torch.set_num_threads(threads)
    cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, batch_size=batch))
    trainer = Trainer(model_for_shards(cfg, shards))
    stream = batch_stream(shards, cfg)
    times = []
    for _ in range(warmup + steps):
        batch_ = next(stream)
        t = time.perf_counter()
        trainer.train_step(batch_)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[warmup:])


def ray_train(shards: str, cfg: Config, workers: int, batch: int, steps: int, warmup: int,
              cpus: float, root: str) -> float:
    """Global images/s of ``ciae train`` with ``workers`` Ray Train workers, from rank 0's
    per-step MLflow metric (which includes waiting for data)."""
    from workflows.jobs.specs import TrainJob
    from workflows.jobs.train import train
    from workflows.tracking.location import Tracking

    job = TrainJob(data=shards, config=cfg, workers=workers, batch_per_worker=batch, cpus_per_worker=cpus,
                   iterations=warmup + steps, storage=os.path.join(root, "ray_results"),
                   tracking_uri=f"sqlite:///{root}/mlflow.db", experiment="bench-train", pictures=0)
    s = train(job, progress=False)
    history = Tracking(s["tracking_uri"]).client().get_metric_history(s["run_id"], "images_per_s")
    return statistics.median(m.value for m in history if m.step > warmup)


def gpu_step(steps: int, warmup: int, batch: int, shorter: int) -> float:
    """Images/s of the training step of Config() (ResNet-50-FPN) on one GPU, synthetic inputs."""
    from ciae.engine.train import Trainer, to_device
    from ciae.modeling.model import CIAEModel

    cfg = Config()
    model = CIAEModel(cfg, list(range(53)), list(range(80))).cuda()
    trainer = Trainer(model)
    h, w = shorter, int(shorter * 1.5) // 32 * 32
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 53, (batch, h, w), generator=g)
    seg[:, h // 4: h // 2, w // 4: w // 2] = 53                        # one instance per image
    batch_ = to_device({"images": torch.randint(0, 255, (batch, 3, h, w), dtype=torch.uint8, generator=g),
                        "sem": seg, "seg": seg,          # instance 0 = merged thing class 53
                        "boxes": [torch.tensor([[w / 4, h / 4, w / 2, h / 2]])] * batch,
                        "classes": [torch.tensor([0])] * batch, "image_sizes": [(h, w)] * batch},
                       torch.device("cuda"))
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step(batch_)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return batch / statistics.median(times[warmup:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="measured steps per setting (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="steps not measured (default 5)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--batch-per-worker", type=int, default=2, help="images per worker per step (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="CPUs per Ray Train worker (default 0.5: room for Ray Data on a small machine)")
    p.add_argument("--images", type=int, default=48, help="synthetic training images (default 48)")
    p.add_argument("--size", type=int, default=192, help="synthetic image size (default 192)")
    p.add_argument("--gpu", action="store_true", help="one GPU, no Ray: the paper's ResNet-50 step")
    p.add_argument("--shorter-side", type=int, default=800, help="GPU mode: input shorter side (default 800)")
    args = p.parse_args(argv)

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        ips = gpu_step(args.steps, args.warmup, args.batch_per_worker, args.shorter_side)
        print(f"| device | config | batch | images/s |\n|---|---|---|---|\n"
              f"| {torch.cuda.get_device_name()} | ResNet-50-FPN, shorter side {args.shorter_side}, bf16 | "
              f"{args.batch_per_worker} | {ips:.1f} |")
        return 0

    root = tempfile.mkdtemp(prefix="ciae-bench-train-")
    shards = make_shards(root, args.images, args.size)
    cfg = Config.small()
    threads = max(1, int(args.cpus_per_worker))
    base = single_process(shards, cfg, args.batch_per_worker, args.steps, args.warmup, threads)
    rows = [("single process, no Ray", 1, base)]
    for n in args.workers:
        rows.append((f"Ray Train, {n} worker{'s' * (n > 1)}", n,
                     ray_train(shards, cfg, n, args.batch_per_worker, args.steps, args.warmup,
                               args.cpus_per_worker, os.path.join(root, f"w{n}"))))
    one = next((ips for name, n, ips in rows[1:] if n == 1), None)
    print(f"\n{os.cpu_count()} CPUs, Config.small(), {args.size} px, batch {args.batch_per_worker} per worker, "
          f"{threads} torch thread(s) per worker\n")
    print("| setting | workers | images/s | images/s per worker | scaling efficiency |\n|---|---|---|---|---|")
    for name, n, ips in rows:
        eff = f"{ips / n / one:.2f}" if one and name.startswith("Ray") else "-"
        print(f"| {name} | {n} | {ips:.2f} | {ips / n:.2f} | {eff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
