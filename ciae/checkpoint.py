"""Checkpoints of this project: the format, and the one way a checkpoint or state dict is read.

A checkpoint is a dict of tensors and plain containers: ``model`` (the model's state dict,
category memory included), ``config`` (``Config.to_dict()``), ``stuff_ids`` / ``thing_ids``
(COCO ids in contiguous-index order), ``category_names`` (id -> name), and for resuming
``optimizer`` (its state dict) and ``step``. ``ciae.engine.train.Trainer.checkpoint`` makes one,
``Trainer.restore`` resumes from one, ``ciae.modeling.model.CIAEModel.from_checkpoint`` rebuilds the
model; ``ciae.engine.finetune.read_source`` also reads torchvision ResNet state dicts.

Checkpoints live in memory as dicts and travel as bytes (``to_bytes``); writing them to a path
or URI is the caller's (``pipeline.data.storage.write_uri``, atomic). Reading goes through ``load``
with ``weights_only=True``: tensors and plain containers only, pickled code is refused.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import BinaryIO

import torch

MODEL_KEYS = ("model", "config", "stuff_ids", "thing_ids")   # what rebuilding the model needs
RESUME_KEYS = ("optimizer", "step")                          # and what resuming training needs too


def make(model, optimizer: Mapping | None = None, step: int = 0) -> dict:
    """The checkpoint of a ``CIAEModel`` (and, for resuming, its optimiser's state dict and step)."""
    ckpt = {"model": model.state_dict(), "step": int(step), "config": model.cfg.to_dict(),
            "stuff_ids": list(model.stuff_ids), "thing_ids": list(model.thing_ids),
            "category_names": dict(model.category_names)}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    return ckpt


def missing(obj, keys=MODEL_KEYS) -> list[str]:
    """The ``keys`` that ``obj`` lacks (all of them when it is not a mapping)."""
    return [k for k in keys if not isinstance(obj, Mapping) or k not in obj]


def to_bytes(ckpt: dict) -> bytes:
    """A checkpoint as the bytes of a ``torch.save`` file."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def load(source: str | bytes | BinaryIO, name: str) -> object:
    """What a checkpoint or state dict file holds: ``source`` is a local path, the file's bytes or
    a binary file object; read with ``weights_only=True`` onto the CPU. A missing file raises
    FileNotFoundError naming ``name``; anything else unreadable, truncated or refused (pickled
    code) a ValueError ``"{name}: not a loadable checkpoint or state dict (...)"``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except Exception as e:   # UnpicklingError (weights_only refused it), RuntimeError, EOFError, ...
        raise ValueError(f"{name}: not a loadable checkpoint or state dict (refused by weights_only "
                         f"loading, truncated or not a torch file: {type(e).__name__}: {e})") from None
