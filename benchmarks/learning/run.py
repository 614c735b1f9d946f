"""How fast the CPU configuration learns: held-out synthetic PQ against training time.

Makes a synthetic train split (256 images) and a held-out split (48 images) at 192x192,
prepares them into shards, trains ``Config.small()`` in one process for its full schedule and
evaluates PQ on the held-out split at a few points (evaluation time is not counted as training).

    python benchmarks/learning/run.py --steps 700
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ciae.config import Config
from ciae.engine.train import Trainer, scale_schedule
from pipeline.data.prepare import prepare
from pipeline.data.shards import Source
from pipeline.data.synth import SynthSpec, write_dataset
from pipeline.evaluation.validation import evaluate
from pipeline.feed.stream import batch_stream, model_for_shards


def make_split(root: str, split: str, n: int, seed: int, size: int) -> str:
    src = os.path.join(root, split)
    write_dataset(src, n, seed=seed, spec=SynthSpec(height=size, width=size))
    out = os.path.join(root, f"{split}_shards")
    prepare(Source(os.path.join(src, "images"), os.path.join(src, "panoptic.json"),
                   os.path.join(src, "panoptic")), out, progress=False)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=Config.small().solver.iterations,
                   help="training steps (default: Config.small()'s schedule)")
    p.add_argument("--evals", type=int, default=4, help="evaluations along the run (default 4)")
    p.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    root = args.workdir or tempfile.mkdtemp(prefix="ciae-bench-learning-")
    train = make_split(root, "train", 256, 0, 192)
    val = make_split(root, "val", 48, 1000, 192)

    cfg = Config.small()
    cfg.solver = scale_schedule(cfg.solver, args.steps)
    torch.manual_seed(cfg.solver.seed)
    model = model_for_shards(cfg, train)
    trainer = Trainer(model)
    every = max(1, args.steps // args.evals)
    trained_s = 0.0
    print(f"{'step':>6s} {'train s':>8s} {'PQ':>6s} {'PQ th':>6s} {'PQ st':>6s} {'loss':>7s}")
    stream = batch_stream(train, cfg, seed=cfg.solver.seed)
    losses = []
    while trainer.step < args.steps:
        t = time.perf_counter()
        trainer.fit(stream, min(trainer.step + every, args.steps), on_step=lambda s, st: losses.append(st["loss"]))
        trained_s += time.perf_counter() - t
        r = evaluate(model, val)
        recent = sum(losses[-20:]) / len(losses[-20:])
        print(f"{trainer.step:6d} {trained_s:8.1f} {r['All']['pq']:6.3f} {r['Things']['pq']:6.3f} "
              f"{r['Stuff']['pq']:6.3f} {recent:7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
