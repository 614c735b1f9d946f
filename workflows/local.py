"""Training and validation on prepared shards in one process (no Ray): the plain loop that the
Ray Train driver wraps, and the streaming PQ of a model on held-out shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ciae.config import Config
from ciae.evaluation.pq import PQAccumulator
from ciae.model import CIAEModel
from ciae.panoptic import CategoryTable
from ciae.train import to_device
from ciae.transform import Transform
from pipeline.shards import (decode_panoptic_row, model_categories, read_manifest, read_shard,
                             shard_paths)
from pipeline.targets import TargetMaker, collate
from pipeline.train_stream import local_batches


def model_for_shards(cfg: Config, shards_uri: str) -> CIAEModel:
    """A fresh model whose classes are the shards' categories."""
    return CIAEModel(cfg, *model_categories(read_manifest(shards_uri)))


def batch_stream(shards_uri: str, cfg: Config) -> Iterator[dict]:
    """Endless training batches of cfg.solver.batch_size images: the plan of
    ``pipeline.train_stream`` (a permutation per epoch seeded by cfg.solver.seed, new jitter and
    flips each epoch), the same batches that Ray Train workers split between them."""
    return (batch for _, batch in local_batches(shards_uri, cfg))


@torch.no_grad()
def evaluate(model: CIAEModel, shards_uri: str, batch_size: int = 4, oracle: bool = False) -> dict:
    """PQ of ``model`` on shards, streamed shard by shard through the PQ accumulator (no PNG
    round trip). Predictions are made at the test size and mapped back to each image's own size
    (``ciae.transform.Transform.postprocess``), as ``ciae.predictor.Predictor`` does."""
    manifest = read_manifest(shards_uri)
    acc = PQAccumulator(CategoryTable.from_json(manifest["categories"]))
    maker = TargetMaker.from_manifest(manifest, input=model.cfg.input,
                                      thing_mode=model.cfg.embedding.thing_mode, train=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for chunk in _row_batches(shards_uri, manifest, batch_size):
        batch = to_device(collate([maker(r) for r in chunk]), device)
        preds = model.predict(batch["images"], batch["image_sizes"], oracle=batch if oracle else None)
        for row, pred in zip(chunk, preds):
            gt_index, gt_segments = decode_panoptic_row(row)
            ids, segments = Transform.postprocess(pred["panoptic"], pred["segments_info"], gt_index.shape)
            ids = ids.cpu().numpy()
            acc.add_indexed(gt_index, gt_segments, ids, segments,
                            image=f"image {row['image_id']} ({row['file_name']})")
    model.train(was_training)
    return acc.summary()


def _row_batches(shards_uri: str, manifest: dict, batch_size: int) -> Iterator[list[dict]]:
    """Rows of the shards, ``batch_size`` at a time, one shard in memory at a time."""
    for path in shard_paths(shards_uri, manifest):
        table = read_shard(path)
        for k in range(0, table.num_rows, batch_size):
            yield table.slice(k, batch_size).to_pylist()
