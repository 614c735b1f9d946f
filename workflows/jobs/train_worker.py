"""What each Ray Train worker runs: ``ciae.engine.train.Trainer.fit`` under DDP, with hooks.

Per worker: build the model from the job's resolved config (same seed everywhere; DDP also
broadcasts rank 0's weights), resume from the latest Ray Train checkpoint if there is one, then
``Trainer.fit`` on its part of the training plan from the resumed step on, made by Ray tasks
(``pipeline.feed.stream.stream_batches``): the worker's process runs the step and nothing
beside it. Across workers:

* gradients are averaged by DDP, and every loss normaliser (FCOS positives and centerness sum,
  CIAE pixel counts) is averaged with them, so that W workers with batch B take the step one
  worker takes with batch W * B;
* the batch's category sums and counts are averaged before the memory update, so the memory is
  identical on every worker; both in one all-reduce per step (``model.reduce_mean``);
* trained BatchNorm layers become SyncBatchNorm (GPUs only; ``TrainJob`` refuses them on more
  than one CPU worker), so their statistics are the global batch's on every worker.

The hooks (:class:`StepHooks`): after each step rank 0 logs to MLflow (the run the driver
created); every ``eval_every`` steps and at the end every rank validates its part of the
held-out shards and the PQ statistics are summed over the ranks, so that no rank waits in a
collective while another validates (past the process group's timeout the job would abort); at
checkpoint steps every rank reports (``ray.train.report`` is collective) with its pid and step,
rank 0 also with the checkpoint and, at the end, the validation PQ.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

from ciae import checkpoint
from ciae.config import Config
from pipeline.data.storage import public_uri, write_uri
from workflows.tracking.location import Tracking

CHECKPOINT_FILE = "checkpoint.pt"   # the file of a Ray Train checkpoint (``ciae.checkpoint``)
STEP_TAG = "ciae.step"              # rank 0's latest logged step (the driver's progress bar reads it)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, built once by the driver (``workflows.jobs.train``)."""

    config: Config                 # resolved: the run's solver (global batch, lr, schedule)
    stuff_ids: list[int]
    thing_ids: list[int]
    category_names: dict[int, str]
    data: str                      # absolute path or URI of the training shards
    val: str | None
    batch_per_worker: int
    threads: int                   # torch threads of a CPU worker
    eval_every: int
    tracking: Tracking             # the job's MLflow location
    run_id: str
    init: tuple | None = None      # (the --init source's name, ModelSource.spec; an object ref to its bytes)
    data_window: int = 2           # training steps whose batches are in the making at once

    def __repr__(self) -> str:
        """Without the credentials of its URIs: Ray Train records the repr (its run state)."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return public_uri(f"WorkerSpec({fields})")


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


def sync_batchnorm(model: torch.nn.Module) -> int:
    """Replace, in place, every trained BatchNorm layer of ``model`` (a parameter requiring a
    gradient) by a SyncBatchNorm sharing its parameters and statistics (the state dict keeps
    its keys); frozen ones (``FrozenBatchNorm2d``, BatchNorm of frozen stages, in eval mode)
    stay as they are. Returns how many were replaced."""
    trained = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.modules.batchnorm._BatchNorm)
               and any(p.requires_grad for p in child.parameters())]
    for parent, name, child in trained:
        setattr(parent, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return len(trained)


def distributed_trainer(model, device: torch.device):
    """A ``Trainer`` for this worker: model on ``device``, wrapped in DDP when the world is
    larger than one, with trained BatchNorm synchronised (``sync_batchnorm``), the loss
    normalisers and the memory statistics reduced across workers. Call inside a Ray Train
    worker (or any initialised torch.distributed group)."""
    import torch.distributed as dist

    from ciae.engine.train import Trainer, memory_format

    model.to(device, memory_format=memory_format(model.cfg.solver))
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return Trainer(model)
    from torch.nn.parallel import DistributedDataParallel

    sync_batchnorm(model)     # before DDP, which refuses it on the CPU (so does TrainJob, earlier)

    # the memory is a buffer kept identical by the reduction, so DDP need not sync it before each
    # forward (torch 2.13 renamed the option; its new one still syncs once, at start, harmlessly)
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  **{no_sync: False})
    model.reduce_mean = _mean_over_workers
    return Trainer(model, module=ddp)


class _MlflowLog:
    """Rank 0's per-step metrics into the driver's MLflow run, handed every ``every_s`` seconds,
    with the latest step as a tag, to a writer thread that logs them in order: the training
    thread never waits on the tracking server. ``flush`` waits until all is written; ``close``
    (at the end, and when training fails) writes what is left and stops the writer. A write
    that fails is raised on the training thread at the next ``flush``, ``close`` or hand-over."""

    def __init__(self, tracking: Tracking, run_id: str, every_s: float = 2.0):
        self.client, self.run_id = tracking.client(), run_id
        self.pending, self.every_s, self.step, self.handed_at = [], every_s, 0, time.monotonic()
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.writer = threading.Thread(target=self._write, name="mlflow-log", daemon=True)
        self.writer.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        self.step = step
        if time.monotonic() - self.handed_at >= self.every_s:
            self.hand_over()

    def hand_over(self) -> None:
        """Give the pending metrics to the writer without waiting."""
        self._raise()
        if self.pending:
            self.queue.put((self.pending, self.step))
        self.pending, self.handed_at = [], time.monotonic()

    def flush(self) -> None:
        """Hand over and wait until everything logged so far is written."""
        self.hand_over()
        self.queue.join()
        self._raise()

    def close(self, quiet: bool = False) -> None:
        """Write what is left and stop the writer; ``quiet``: a write error is not raised."""
        if self.writer.is_alive():
            if self.pending:
                self.queue.put((self.pending, self.step))
                self.pending = []
            self.queue.put(None)
            self.writer.join()
        if not quiet:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"logging to MLflow failed: {error}") from error

    def _write(self) -> None:
        from mlflow.entities import RunTag

        while (work := self.queue.get()) is not None:
            metrics, step = work
            try:
                for k in range(0, len(metrics), 1000):
                    self.client.log_batch(self.run_id, metrics=metrics[k:k + 1000],
                                          tags=[RunTag(STEP_TAG, str(step))])
            except BaseException as e:      # raised on the training thread
                self.error = e
            finally:
                self.queue.task_done()
        self.queue.task_done()


def _batches(spec: WorkerSpec, start: int, rank: int, world: int):
    """This rank's collated batches for steps [start, iterations) in order (``Trainer.fit``
    draws them ahead of its steps): its part of the training plan, made by Ray tasks
    (``pipeline.feed.stream.stream_batches``), each checked against the step it is for."""
    from pipeline.feed.stream import stream_batches

    end = spec.config.solver.iterations
    batches = stream_batches(spec.data, spec.config, global_batch=world * spec.batch_per_worker,
                             world=world, rank=rank, start=start, end=end, window=spec.data_window)
    for step, (planned, batch) in enumerate(batches, start):
        if planned != step:
            raise RuntimeError(f"rank {rank}: the plan gave step {planned} at step {step}")
        yield batch


def validate(model, val_shards: str, rank: int, world: int, log: _MlflowLog | None, step: int) -> dict:
    """PQ of ``model`` on the held-out shards, a collective: every rank evaluates its part
    (``pipeline.evaluation.validation.accumulate``), the PQ statistics are summed over the ranks, and rank 0
    (the one with ``log``) logs. Returns the summary, with string keys, on every rank."""
    from pipeline.evaluation.validation import accumulate

    acc = accumulate(model, val_shards, part=(rank, world))
    if world > 1:       # one all-reduce of the accumulator's state vector
        device = next(model.parameters()).device
        (total,) = _sum_over_workers(torch.from_numpy(acc.to_vector()).to(device))
        acc = type(acc).from_vector(acc.categories, total.cpu().numpy())
    pq = acc.summary()
    if log:
        log.log(step, {"val_pq": pq["All"]["pq"], "val_sq": pq["All"]["sq"], "val_rq": pq["All"]["rq"],
                       "val_pq_things": pq["Things"]["pq"], "val_pq_stuff": pq["Stuff"]["pq"]})
    return pq | {"per_class": {str(k): v for k, v in pq["per_class"].items()}}


class StepHooks:
    """``Trainer.fit``'s hooks on one rank (see the module docstring). ``log``: rank 0's
    MLflow log, None elsewhere; ``report(metrics, checkpoint_dir)``: ``ray.train.report``,
    ``checkpoint_dir`` (with ``CHECKPOINT_FILE``) given on rank 0 only."""

    def __init__(self, spec: WorkerSpec, trainer, rank: int, world: int, log: _MlflowLog | None, report):
        self.spec, self.trainer, self.rank, self.world = spec, trainer, rank, world
        self.log, self.report = log, report
        self.t, self.val = time.perf_counter(), None

    def validate(self, step: int) -> None:
        """On every rank at once (``validate``); rank 0 writes the PQ to MLflow at once."""
        self.val = validate(self.trainer.model, self.spec.val, self.rank, self.world, self.log, step)
        if self.log:
            self.log.flush()

    def on_step(self, step: int, stats: dict) -> None:
        now = time.perf_counter()
        stats["images_per_s"] = self.world * self.spec.batch_per_worker / (now - self.t)   # data wait included
        self.t = now
        if self.log:
            self.log.log(step, stats)
        every = self.spec.eval_every
        if self.spec.val and (step == self.spec.config.solver.iterations or (every and step % every == 0)):
            self.validate(step)

    def on_checkpoint(self, step: int) -> None:
        """The checkpoint serialised here (it must be the step's state), then reported; its
        upload runs in Ray Train's background thread (``report`` with ASYNC upload), which
        removes the local copy once it is up, and which Ray Train drains before the run ends."""
        metrics = {"step": step, "pid": os.getpid()}
        if self.val and step == self.spec.config.solver.iterations:
            metrics["val"] = self.val
        if self.log:
            self.log.hand_over()
        folder = None
        if self.rank == 0:
            folder = tempfile.mkdtemp(prefix="ciae-checkpoint-")
            try:
                write_uri(os.path.join(folder, CHECKPOINT_FILE), checkpoint.to_bytes(self.trainer.checkpoint()))
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        self.report(metrics, folder)
        self.t = time.perf_counter()       # the report is not a training step


def train_worker(loop_config: dict) -> None:
    """The Ray Train worker function; ``loop_config``: {"spec": WorkerSpec}."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, CheckpointUploadMode

    from ciae.modeling.model import CIAEModel

    spec: WorkerSpec = loop_config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    cfg = spec.config
    torch.manual_seed(cfg.solver.seed)
    model = CIAEModel(cfg, spec.stuff_ids, spec.thing_ids, spec.category_names)
    resumed = ray.train.get_checkpoint()
    if spec.init and not resumed:       # fine-tuning: the source's weights, loaded here too
        from ciae.engine.finetune import transfer

        name, ref = spec.init
        transfer(model, checkpoint.read_source(checkpoint.load(ray.get(ref), name), name))
    trainer = distributed_trainer(model, device)
    if resumed:
        with resumed.as_directory() as d:
            path = os.path.join(d, CHECKPOINT_FILE)
            trainer.restore(checkpoint.load(path, path))
    log = _MlflowLog(spec.tracking, spec.run_id) if rank == 0 else None
    if log and resumed:
        log.log(trainer.step, {"resumed_at_step": trainer.step})

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    hooks = StepHooks(spec, trainer, rank, world, log, report)
    try:
        if spec.init and spec.val and not resumed:     # where fine-tuning starts from
            hooks.validate(0)
        trainer.fit(_batches(spec, trainer.step, rank, world), cfg.solver.iterations, on_step=hooks.on_step,
                    on_checkpoint=hooks.on_checkpoint)
    except BaseException:
        if log:     # what was logged before the failure is written; the failure is what is raised
            log.close(quiet=True)
        raise
    if log:
        log.close()
