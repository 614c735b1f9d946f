"""Validation: the streaming PQ of a model on held-out shards, in one process (no Ray); Ray
Train's workers each take a part (``accumulate``) and sum the statistics."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ciae.data.panoptic import CategoryTable
from ciae.data.transform import batch_order, resize_nearest
from ciae.engine.predictor import Predictor
from ciae.modeling.model import CIAEModel
from pipeline.data.shards import read_manifest, read_shard, shard_paths
from pipeline.evaluation.pq import PQAccumulator
from pipeline.feed.targets import TargetMaker, decode_row


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

    Prediction is ``ciae.engine.predictor.Predictor``'s (test size, mapped back to each image's own
    size) in float32 and the model's own layout (no autocast: the PQ does not depend on the
    device's bfloat16); each row's image and ground truth are decoded once
    (``pipeline.feed.targets.decode_row``). ``oracle`` (Table IV) gives the predictor the ground
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
            truth = [maker.labels(resize_nearest(index, im.shape[1:]), segments)
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
    at a time, each shard's batched by shape (``ciae.data.transform.batch_order``)."""
    rank, parts = part
    total = sum(s["rows"] for s in manifest["shards"])
    lo, hi = total * rank // parts, total * (rank + 1) // parts
    first = 0                                   # the shard's first row in the whole set
    for path, shard in zip(shard_paths(shards_uri, manifest), manifest["shards"]):
        begin, end = max(lo, first), min(hi, first + shard["rows"])
        if begin < end:
            rows = read_shard(path).slice(begin - first, end - begin).to_pylist()
            order = batch_order([(r["height"], r["width"]) for r in rows])   # like shapes together
            for k in range(0, len(rows), batch_size):
                yield [rows[i] for i in order[k:k + batch_size]]
        first += shard["rows"]
