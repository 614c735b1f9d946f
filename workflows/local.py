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
from ciae.predictor import Predictor
from ciae.transform import resize_nearest
from pipeline.shards import model_categories, read_manifest, read_shard, shard_paths
from pipeline.targets import TargetMaker, decode_row
from pipeline.train_stream import local_batches


def model_for_shards(cfg: Config, shards_uri: str) -> CIAEModel:
    """A fresh model whose classes are the shards' categories."""
    return CIAEModel(cfg, *model_categories(read_manifest(shards_uri)))


def batch_stream(shards_uri: str, cfg: Config) -> Iterator[dict]:
    """Endless training batches of cfg.solver.batch_size images: the plan of
    ``pipeline.train_stream`` (a permutation per epoch seeded by cfg.solver.seed, new jitter and
    flips each epoch), the same batches that Ray Train workers split between them."""
    return (batch for _, batch in local_batches(shards_uri, cfg))


def evaluate(model: CIAEModel, shards_uri: str, batch_size: int = 4, oracle: bool = False) -> dict:
    """PQ of ``model`` on shards (``accumulate`` over all their rows, summarised)."""
    return accumulate(model, shards_uri, batch_size, oracle).summary()


@torch.no_grad()
def accumulate(model: CIAEModel, shards_uri: str, batch_size: int = 4, oracle: bool = False,
               part: tuple[int, int] = (0, 1)) -> PQAccumulator:
    """PQ statistics of ``model`` on the rows of part ``(rank, parts)`` of the shards (rank r
    of W takes rows [r N / W, (r + 1) N / W) and reads only the shards holding them), streamed
    shard by shard through the PQ accumulator (no PNG round trip); the parts' accumulators
    merge into the whole set's.

    Prediction is ``ciae.predictor.Predictor``'s (test size, mapped back to each image's own
    size) in float32 and the model's own layout (no autocast: the PQ does not depend on the
    device's bfloat16); each row's image and ground truth are decoded once
    (``pipeline.targets.decode_row``). ``oracle`` (Table IV) gives the predictor the ground
    truth's instances at the test size (``TargetMaker.labels``)."""
    manifest = read_manifest(shards_uri)
    acc = PQAccumulator(CategoryTable.from_json(manifest["categories"]))
    maker = TargetMaker.from_manifest(manifest, input=model.cfg.input,
                                      thing_mode=model.cfg.embedding.thing_mode, train=False)
    was_training = model.training
    predictor = Predictor(model, batch_size, amp=False, channels_last=False)
    try:
        for chunk in _row_batches(shards_uri, manifest, batch_size, part):
            rows = [decode_row(r) for r in chunk]
            images = [predictor.transform.resize_for_test(image) for image, _, _ in rows]
            truth = [maker.labels(resize_nearest(index, im.shape[:2]), segments)
                     for im, (_, index, segments) in zip(images, rows)] if oracle else None
            preds = predictor.predict_resized(images, [index.shape for _, index, _ in rows], oracle=truth)
            for row, (_, index, segments), pred in zip(chunk, rows, preds):
                acc.add_indexed(index, segments, pred["panoptic"], pred["segments_info"],
                                image=f"image {row['image_id']} ({row['file_name']})")
    finally:
        model.train(was_training)
    return acc


def _row_batches(shards_uri: str, manifest: dict, batch_size: int,
                 part: tuple[int, int]) -> Iterator[list[dict]]:
    """The rows of ``part`` (see ``accumulate``), ``batch_size`` at a time, one shard in memory
    at a time."""
    rank, parts = part
    total = sum(s["rows"] for s in manifest["shards"])
    lo, hi = total * rank // parts, total * (rank + 1) // parts
    first = 0                                   # the shard's first row in the whole set
    for path, shard in zip(shard_paths(shards_uri, manifest), manifest["shards"]):
        begin, end = max(lo, first), min(hi, first + shard["rows"])
        if begin < end:
            table = read_shard(path).slice(begin - first, end - begin)
            for k in range(0, table.num_rows, batch_size):
                yield table.slice(k, batch_size).to_pylist()
        first += shard["rows"]
