"""What each Ray Train worker runs: the single-process ``ciae.train.Trainer`` under DDP.

Per worker: build the model (same seed everywhere; DDP also broadcasts rank 0's weights), resume
from the latest Ray Train checkpoint if there is one, then take steps until the run's step
count on its part of the training plan (``pipeline.train_stream``), streamed by a Ray Data job
of its own from the resumed step on. Across workers:

* gradients are averaged by DDP, and every loss normaliser (FCOS positives and centerness sum,
  CIAE pixel counts) is averaged with them, so that W workers with batch B take the step one
  worker takes with batch W * B;
* the batch's category sums and counts are summed before the memory update, so the memory is
  identical on every worker.

Rank 0 logs to MLflow (the run the driver created), evaluates on the held-out shards every
``eval_every`` steps and at the end, and writes the checkpoints; every rank reports at
checkpoint steps (``ray.train.report`` is collective) with its pid and step, rank 0 also with
the checkpoint and, at the end, the validation PQ.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

CHECKPOINT_FILE = "checkpoint.pt"
STEP_TAG = "ciae.step"          # rank 0's latest logged step (the driver's progress bar reads it)


def _sum_over_workers(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    import torch.distributed as dist

    out = tuple(t.detach().clone() for t in tensors)
    for t in out:
        dist.all_reduce(t)
    return out


def _mean_over_workers(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    (total,) = _sum_over_workers(t)
    return total / dist.get_world_size()


def distributed_trainer(model, solver, device: torch.device):
    """A ``Trainer`` for this worker: model on ``device``, wrapped in DDP when the world is
    larger than one, with the loss normalisers and the memory statistics reduced across
    workers. Call inside a Ray Train worker (or any initialised torch.distributed group)."""
    import torch.distributed as dist

    from ciae.train import Trainer

    model.to(device)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return Trainer(model, solver)
    from torch.nn.parallel import DistributedDataParallel

    # the memory is a buffer kept identical by the reduction, so DDP need not broadcast it
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False)
    model.reduce_mean = _mean_over_workers
    return Trainer(model, solver, reduce_memory_stats=_sum_over_workers, module=ddp)


class _MlflowLog:
    """Rank 0's per-step metrics into the driver's MLflow run, written every ``every_s`` seconds
    with the latest step as a tag."""

    def __init__(self, tracking_uri: str, run_id: str, every_s: float = 2.0):
        import mlflow

        self.client, self.run_id = mlflow.MlflowClient(tracking_uri), run_id
        self.pending, self.every_s, self.step, self.flushed_at = [], every_s, 0, time.monotonic()

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        self.step = step
        if time.monotonic() - self.flushed_at >= self.every_s:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import RunTag

        for k in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[k:k + 1000],
                                  tags=[RunTag(STEP_TAG, str(self.step))])
        self.pending, self.flushed_at = [], time.monotonic()


def _batches(c: dict, cfg, rank: int, world: int, start: int):
    """(step, collated batch) for steps [start, c["iterations"]): this rank's part of the
    training plan, streamed by its own Ray Data job."""
    from pipeline.train_stream import rows_of_batches, step_batches, training_dataset
    from workflows.local import train_target_config

    end = c["iterations"]
    ds = training_dataset(c["data"], train_target_config(cfg), global_batch=world * c["batch_size"],
                          world=world, rank=rank, start=start, end=end, seed=cfg.solver.seed)
    rows = rows_of_batches(ds.iter_batches(batch_size=c["batch_size"], batch_format="numpy", prefetch_batches=2))
    return step_batches(rows, start, end)


def validate(model, val_shards: str, log: _MlflowLog, step: int) -> dict:
    """PQ of ``model`` on the held-out shards, logged; returns the summary with string keys."""
    from workflows.local import evaluate

    pq = evaluate(model, val_shards)
    log.log(step, {"val_pq": pq["All"]["pq"], "val_sq": pq["All"]["sq"], "val_rq": pq["All"]["rq"],
                   "val_pq_things": pq["Things"]["pq"], "val_pq_stuff": pq["Stuff"]["pq"]})
    return pq | {"per_class": {str(k): v for k, v in pq["per_class"].items()}}


def train_loop_per_worker(c: dict) -> None:
    """The Ray Train worker function. ``c``: config (dict), solver (dict), stuff_ids, thing_ids,
    data (training shards), batch_size (per worker), iterations, threads, val (shards or None),
    eval_every, tracking_uri, run_id."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from ciae.config import Config, SolverConfig
    from ciae.model import CIAEModel
    from ciae.train import to_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(c["threads"])
    cfg = Config.from_dict(c["config"])
    solver = SolverConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["solver"].items()})
    torch.manual_seed(solver.seed)
    model = CIAEModel(cfg, c["stuff_ids"], c["thing_ids"])
    trainer = distributed_trainer(model, solver, device)

    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            trainer.load(os.path.join(d, CHECKPOINT_FILE))
    log = _MlflowLog(c["tracking_uri"], c["run_id"]) if rank == 0 else None
    if log and resumed:
        log.log(trainer.step, {"resumed_at_step": trainer.step})

    end = c["iterations"]
    t_prev = time.perf_counter()
    for planned, batch in _batches(c, cfg, rank, world, trainer.step):
        assert planned == trainer.step, (planned, trainer.step)
        stats = trainer.train_step(to_device(batch, device))
        now = time.perf_counter()
        stats["images_per_s"] = world * c["batch_size"] / (now - t_prev)   # data wait included
        t_prev = now
        step = trainer.step
        pq = None
        if log:
            log.log(step, stats)
            if c["val"] and (step == end or (c["eval_every"] and step % c["eval_every"] == 0)):
                pq = validate(model, c["val"], log, step)
        if step % solver.checkpoint_every == 0 or step == end:
            report = {"step": step, "pid": os.getpid(), "loss": stats["loss"]}
            if pq:
                report["val"] = pq
            if log:
                log.flush()
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    trainer.save(os.path.join(d, CHECKPOINT_FILE))
                    ray.train.report(report, checkpoint=Checkpoint.from_directory(d))
                else:
                    ray.train.report(report)
            t_prev = time.perf_counter()   # the report is not a training step
    if trainer.step < end:
        raise RuntimeError(f"rank {rank}: no image of steps {trainer.step + 1}..{end} could be decoded")
