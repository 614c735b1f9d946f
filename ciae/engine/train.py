"""The training loop: SGD with warm-up and step decay, the memory update, checks for non-finite
losses, and checkpoints that resume exactly (model, optimiser, memory, step).

The schedule is the paper's (lr 0.01, momentum 0.9, weight decay 1e-4, x0.1 at 2/3 and 8/9 of
the run) scaled to the run length with ``scale_schedule``. ``Trainer.fit`` is the one loop: in
one process it is called as it is; a Ray Train worker calls it with hooks (``on_step`` for
metrics and validation, ``on_checkpoint`` to report checkpoints) on a model whose
``reduce_mean`` all-reduces over the workers. On a GPU, ``prefetch`` keeps the device fed: the
next batch is pinned and copied on a side stream while the current step runs, and a step reads
its losses back in one copy, once its backward and optimiser step are queued: its one host sync.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from ciae import checkpoint
from ciae.config import SolverConfig
from ciae.modeling.model import CIAEModel
from ciae.utils.allocator import retain_freed_memory

LOSS_TERMS = ("loss_cls", "loss_box", "loss_ctr", "loss_cae", "loss_iae")


def scale_schedule(solver: SolverConfig, iterations: int) -> SolverConfig:
    """The solver with its decay steps and warm-up scaled from solver.iterations to ``iterations``."""
    f = iterations / solver.iterations
    return dataclasses.replace(solver, iterations=iterations,
                               steps=tuple(max(1, round(s * f)) for s in solver.steps),
                               warmup_iters=min(solver.warmup_iters, max(1, iterations // 10)))


def lr_at(step: int, solver: SolverConfig) -> float:
    """Linear warm-up from lr * warmup_factor, then x gamma at each of solver.steps."""
    lr = solver.lr * solver.gamma ** sum(step >= s for s in solver.steps)
    if step < solver.warmup_iters:
        alpha = step / solver.warmup_iters
        lr *= solver.warmup_factor * (1 - alpha) + alpha
    return lr


def build_optimizer(model: torch.nn.Module, solver: SolverConfig) -> torch.optim.SGD:
    """SGD; no weight decay on norm parameters and biases (as detectron2's RetinaNet recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": solver.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=solver.lr, momentum=solver.momentum)


def memory_format(solver: SolverConfig) -> torch.memory_format:
    """The layout training uses for weights and images (``solver.channels_last``)."""
    return torch.channels_last if solver.channels_last else torch.contiguous_format


class Trainer:
    """Owns a model, its optimiser and the step counter; the schedule is ``model.cfg.solver``.

    ``module`` is what a step calls: the model itself, or its DistributedDataParallel wrapper
    (made after ``model.to(memory_format=memory_format(solver))``, so that DDP's gradient buckets
    have the weights' layout). Creating one makes this process keep freed memory
    (``ciae.utils.allocator``), which speeds CPU steps up by a quarter; channels-last weights and
    images speed the CPU step up by another ~14% (oneDNN's convolutions prefer NHWC)."""

    def __init__(self, model: CIAEModel, module: torch.nn.Module | None = None):
        retain_freed_memory()
        self.layout = memory_format(model.cfg.solver)
        self.model = model.to(memory_format=self.layout)
        self.module = module or model
        self.solver = model.cfg.solver
        self.optimizer = build_optimizer(model, self.solver)
        self.step = 0

    def train_step(self, batch: dict) -> dict[str, float]:
        """One SGD step on a collate batch (already on the model's device): the memory update
        and the losses (``CIAEModel.forward``), backward, clipping, the optimiser step. Returns
        the loss terms, the learning rate and the step's wall time.

        One host sync: the loss values, copied to the host once after the forward, are read
        when the backward and the optimiser step are queued (so the host waits for the forward
        only, and the GPU runs the backward while the host takes up the next step). The check
        for non-finite losses comes then: its FloatingPointError finds this step applied."""
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, self.solver)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = {**batch, "images": batch["images"].contiguous(memory_format=self.layout)}
        device = batch["images"].device
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=self.solver.amp and device.type == "cuda"):
            out = self.module(batch, memory_step=(self.step, self.solver.iterations))
        terms = LOSS_TERMS + ("loss",)
        # the loss values start for the host now, and are read once the whole step is queued
        values = _LossReadback(torch.stack([out[t].detach().float() for t in terms]))
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.solver.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.solver.clip_grad_norm)
        self.optimizer.step()
        values = values.wait()                                     # the step's one host sync
        for term, value in zip(terms, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {term} = {value} "
                                         f"(lr {lr:.3g}; the step was applied); lower the "
                                         f"learning rate or check the inputs")
        self.step += 1
        stats = dict(zip(terms, values))
        stats.update(lr=lr, step_time=time.perf_counter() - t0)
        return stats

    def fit(self, batches: Iterable[dict], num_steps: int | None = None,
            on_step: Callable[[int, dict], None] | None = None,
            on_checkpoint: Callable[[int], None] | None = None) -> None:
        """Train until ``num_steps`` (default: solver.iterations) steps have been taken in all.

        After each step ``on_step(step, stats)``; at every ``solver.checkpoint_every``-th step
        and the last, ``on_checkpoint(step)``, which takes ``self.checkpoint()`` where it wants
        it kept (e.g. ``pipeline.data.storage.write_uri(path, ciae.checkpoint.to_bytes(...))``)."""
        end = num_steps if num_steps is not None else self.solver.iterations
        it = prefetch(batches, next(self.model.parameters()).device)
        while self.step < end:
            batch = next(it, None)
            if batch is None:
                raise ValueError(f"the batches ran out at step {self.step}, before step {end}")
            stats = self.train_step(batch)
            if on_step:
                on_step(self.step, stats)
            if on_checkpoint and (self.step % self.solver.checkpoint_every == 0 or self.step == end):
                on_checkpoint(self.step)

    def checkpoint(self) -> dict:
        """The checkpoint (``ciae.checkpoint``): model with memory, optimiser, step, config and
        categories, in memory (tensors shared with the live model: serialise before training on)."""
        return checkpoint.make(self.model, self.optimizer.state_dict(), self.step)

    def restore(self, ckpt: dict) -> None:
        """Resume model, optimiser, memory and step from a checkpoint of the same model."""
        lacking = checkpoint.missing(ckpt, checkpoint.MODEL_KEYS + checkpoint.RESUME_KEYS)
        if lacking:
            raise ValueError(f"cannot resume from a checkpoint without {', '.join(lacking)}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])


class _LossReadback:
    """A small device tensor on its way to the host: on CUDA copied (``non_blocking``) into
    pinned memory as soon as it is made, with an event after the copy, so that ``wait()`` blocks
    only until that copy is done, not until the work queued since; elsewhere read in ``wait()``.
    ``wait()`` -> the values as a list of floats (the one host sync)."""

    def __init__(self, values: torch.Tensor):
        self.values, self.event = values, None
        if values.is_cuda:
            self.values = torch.empty(values.shape, dtype=values.dtype, device="cpu",
                                      pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(values.device))   # the copy's stream

    def wait(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


def _map_tensors(batch: dict, fn) -> dict:
    """``fn`` applied to a collate batch's tensors (and lists of tensors)."""
    def apply(v):
        if torch.is_tensor(v):
            return fn(v)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return [fn(x) for x in v]
        return v
    return {k: apply(v) for k, v in batch.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collate batch's tensors (and lists of tensors) to ``device``."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def prefetch(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """``batches`` on ``device``, in order. The batch for step k + 1 is drawn (collation, in
    training Ray Data's iterator too) and, on CUDA, pinned and copied on a side stream as soon
    as step k has queued its kernels, so that this host work and the copy overlap the GPU's
    work on step k. No thread: a Python thread beside a step that queues thousands of small
    kernels takes the GIL from it (a busy one slowed such a loop 660x on the CPU,
    benchmarks/RESULTS.md)."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def send(batch: dict | None) -> tuple[dict | None, torch.cuda.Event | None]:
        if batch is None or not cuda:
            return batch, None
        with torch.cuda.stream(stream):
            moved = to_device(_map_tensors(batch, torch.Tensor.pin_memory), device)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    it = iter(batches)
    batch, done = send(next(it, None))
    while batch is not None:
        if done is None:
            batch = to_device(batch, device)
        else:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            # the copies were allocated on the side stream: keep them until this one is done
            _map_tensors(batch, lambda t: t.record_stream(current))
        yield batch
        batch, done = send(next(it, None))
