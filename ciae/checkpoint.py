"""Checkpoints of this project: the format, and the one way a checkpoint or state dict is read.

A checkpoint is a dict of tensors and plain containers: ``model`` (the model's state dict,
category memory included), ``config`` (``Config.to_dict()``), ``stuff_ids`` / ``thing_ids``
(COCO ids in contiguous-index order), ``category_names`` (id -> name), and for resuming
``optimizer`` (its state dict) and ``step``. ``ciae.engine.train.Trainer.checkpoint`` makes one,
``Trainer.restore`` resumes from one, ``ciae.modeling.model.CIAEModel.from_checkpoint`` rebuilds the
model, ``ciae.engine.finetune.transfer`` starts a model from a :class:`Source`.

Checkpoints live in memory as dicts and travel as bytes (``to_bytes``); writing them to a path
or URI is the caller's (``pipeline.data.storage.write_uri``, atomic). Reading goes through ``load``
with ``weights_only=True``: tensors and plain containers only, pickled code is refused.
``read_source`` tells what a loaded file holds (a ciae checkpoint or a torchvision ResNet state
dict); ``read_meta`` reads a checkpoint's config and categories with the same unpickler, its
tensors made on the ``meta`` device: no tensor bytes read or allocated.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch

MODEL_KEYS = ("model", "config", "stuff_ids", "thing_ids")   # what rebuilding the model needs
RESUME_KEYS = ("optimizer", "step")                          # and what resuming training needs too
META_KEYS = ("config", "stuff_ids", "thing_ids", "category_names", "step")   # read_meta's


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
    return _load(source, name, "cpu")


def read_meta(source: str | bytes | BinaryIO, name: str) -> dict:
    """A ciae checkpoint's fields but its tensors, {"config", "stuff_ids", "thing_ids",
    "category_names" ({} when it has none), "step" (0 when it has none)}, without reading its
    tensors: ``load`` with ``map_location="meta"`` (the same ``weights_only`` unpickler; a tensor
    is its shape and dtype, its storage record is not read). Errors as ``load``'s, and a
    ValueError naming ``name`` when the file is a torchvision ResNet state dict or no checkpoint."""
    obj = _load(source, name, "meta")
    if read_source(obj, name).kind != "ciae":
        raise ValueError(f"{name}: a torchvision ResNet state dict, not a trained ciae model")
    return {"config": obj["config"], "stuff_ids": list(obj["stuff_ids"]), "thing_ids": list(obj["thing_ids"]),
            "category_names": dict(obj.get("category_names") or {}), "step": int(obj.get("step", 0))}


def _load(source: str | bytes | BinaryIO, name: str, map_location: str) -> object:
    """``load`` onto ``map_location``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file") from None
    except Exception as e:   # UnpicklingError (weights_only refused it), RuntimeError, EOFError, ...
        raise ValueError(f"{name}: not a loadable checkpoint or state dict (refused by weights_only "
                         f"loading, truncated or not a torch file: {type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Source:
    """Weights as a file held them (``read_source``). ``kind``: "ciae" (a checkpoint of this
    project: its categories and config known) or "torchvision" (a ResNet state dict)."""

    name: str
    kind: str
    state: Mapping[str, torch.Tensor]
    stuff_ids: tuple[int, ...] = ()
    thing_ids: tuple[int, ...] = ()
    category_names: Mapping[int, str] | None = None
    config: Mapping | None = None


def read_source(obj, name: str) -> Source:
    """What ``load`` gave for ``name`` -> a Source; ValueError when it is neither a ciae
    checkpoint nor a torchvision ResNet state dict."""
    if not missing(obj):
        return Source(name, "ciae", obj["model"], tuple(obj["stuff_ids"]), tuple(obj["thing_ids"]),
                      obj.get("category_names"), obj["config"])
    try:
        state = torchvision_state(obj, name)
    except ValueError:
        state = None
    if state is not None and "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return Source(name, "torchvision", state)
    keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{name}: neither a ciae checkpoint (model, config, stuff_ids, thing_ids) nor a "
                     f"torchvision ResNet state dict (conv1, layer1..4); it holds {keys}")


def torchvision_state(obj, name: str) -> Mapping[str, torch.Tensor]:
    """The state dict of tensors in ``obj``, unwrapped from ``{"state_dict": ...}`` or
    ``{"model": ...}``; ValueError naming ``name`` when there is none."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name} does not hold a state dict of tensors")
    return obj
