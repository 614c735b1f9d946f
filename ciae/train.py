"""The single-process training loop: SGD with warm-up and step decay, the memory update, checks
for non-finite losses, and checkpoints that resume exactly (model, optimiser, memory, step).

The schedule is the paper's (lr 0.01, momentum 0.9, weight decay 1e-4, x0.1 at 2/3 and 8/9 of
the run) scaled to the run length with ``scale_schedule``. Ray Train wraps ``Trainer`` for
multi-worker runs; ``reduce_memory_stats`` is the hook through which it all-reduces the
category sums so that every worker's memory stays identical.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable

import torch

from ciae.allocator import retain_freed_memory
from ciae.config import Config, SolverConfig
from ciae.model import CIAEModel

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


class Trainer:
    """Owns a model, its optimiser and the step counter.

    ``module`` is what a step calls: the model itself, or its DistributedDataParallel wrapper.
    ``reduce_memory_stats`` sums the batch's category sums and counts over data-parallel workers
    before the memory update, so that every worker's memory stays identical. Creating one makes
    this process keep freed memory (``ciae.allocator``), which speeds CPU steps up by a quarter."""

    def __init__(self, model: CIAEModel, solver: SolverConfig | None = None,
                 reduce_memory_stats: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                 module: torch.nn.Module | None = None):
        retain_freed_memory()
        self.model = model
        self.module = module or model
        self.solver = solver or model.cfg.solver
        self.optimizer = build_optimizer(model, self.solver)
        self.step = 0
        self.reduce_memory_stats = reduce_memory_stats or (lambda s, c: (s, c))

    def train_step(self, batch: dict) -> dict[str, float]:
        """One SGD step on a collate batch (already on the model's device). Returns the loss
        terms, the learning rate and the step's wall time."""
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, self.solver)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        device = batch["images"].device
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=self.solver.amp and device.type == "cuda"):
            out = self.module(batch)
        for term in LOSS_TERMS + ("loss",):
            value = out[term]
            if not torch.isfinite(value):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {term} = {value.item()} "
                                         f"(lr {lr:.3g}); lower the learning rate or check the inputs")
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.solver.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.solver.clip_grad_norm)
        self.optimizer.step()
        sums, counts = self.reduce_memory_stats(out["category_sums"], out["category_counts"])
        self.model.memory.update(sums, counts, self.step, self.solver.iterations)
        self.step += 1
        stats = {k: float(out[k].detach()) for k in LOSS_TERMS + ("loss",)}
        stats.update(lr=lr, step_time=time.perf_counter() - t0)
        return stats

    def fit(self, batches: Iterable[dict], num_steps: int | None = None,
            on_step: Callable[[int, dict], None] | None = None, checkpoint_path: str | None = None) -> None:
        """Train until ``num_steps`` (default: solver.iterations) steps have been taken in all,
        checkpointing every solver.checkpoint_every steps and at the end."""
        end = num_steps if num_steps is not None else self.solver.iterations
        device = next(self.model.parameters()).device
        it = iter(batches)
        while self.step < end:
            batch = next(it, None)
            if batch is None:
                raise ValueError(f"the batches ran out at step {self.step}, before step {end}")
            stats = self.train_step(to_device(batch, device))
            if on_step:
                on_step(self.step, stats)
            if checkpoint_path and (self.step % self.solver.checkpoint_every == 0 or self.step == end):
                self.save(checkpoint_path)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "config": self.model.cfg.to_dict(), "solver": dataclasses.asdict(self.solver),
                "stuff_ids": self.model.stuff_ids, "thing_ids": self.model.thing_ids}

    def save(self, path: str) -> None:
        """Atomically write a checkpoint (a temporary file moved into place)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        """Resume model, optimiser, memory and step from a checkpoint of the same model."""
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint without executing pickled code (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a loadable ciae checkpoint ({type(e).__name__}: {e})") from None


def model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> CIAEModel:
    """A model rebuilt from a checkpoint's config and categories, weights and memory loaded."""
    ckpt = load_checkpoint(path)
    model = CIAEModel(Config.from_dict(ckpt["config"]), ckpt["stuff_ids"], ckpt["thing_ids"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collate batch's tensors (and lists of tensors) to ``device``."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return [x.to(device, non_blocking=True) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}

