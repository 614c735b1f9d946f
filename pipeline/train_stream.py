"""The training stream as a Ray Data job: shard rows -> augmented targets, off the training loop.

The dataset is a plan of (epoch, shard group) items: per epoch the shards in a seeded order, cut
into groups of ``shards_per_item``; each item is read and turned into targets by a Ray Data task
(``flat_map``), the rows of its shards shuffled together. An item is one block of the stream, and
a worker's consecutive batches come from one block, so grouping shards mixes the batches without
the cost of more, smaller blocks.
Augmentation draws from (seed, epoch, image id), so a row gives the same targets wherever it
runs. Ray Train splits the stream between its workers (``get_dataset_shard``), which iterate
prefetched batches and ``collate_rows`` them.

A row whose image cannot be decoded (the data stage only checks JPEG structure) is skipped with
a warning naming it, and the job goes on.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pipeline.shards import read_manifest, read_shard, shard_paths
from pipeline.targets import TargetConfig, TargetMaker, collate

log = logging.getLogger(__name__)


class ShardTargets:
    """Ray Data ``flat_map`` function: {"shards": [paths], "epoch": e, "index": i} -> the
    targets of those shards' rows, shuffled together."""

    def __init__(self, manifest: dict, config: TargetConfig, seed: int):
        self.stuff_index, self.thing_index = manifest["stuff_index"], manifest["thing_index"]
        self.config, self.seed = config, seed

    def __call__(self, item: dict):
        epoch = int(item["epoch"])
        maker = TargetMaker(self.stuff_index, self.thing_index, self.config, train=True,
                            seed=self.seed, epoch=epoch)
        rows = [(path, row) for path in item["shards"] for row in read_shard(path).to_pylist()]
        order = np.random.default_rng([self.seed, epoch, int(item["index"])]).permutation(len(rows))
        for i in order:
            path, row = rows[i]
            try:
                t = maker(row)
            except Exception as e:  # a corrupt image: skip it, name it
                log.warning("skipping image %s (%s) in %s: %s", row.get("image_id"),
                            row.get("file_name"), path, e)
                continue
            yield {"image": t["image"], "sem": t["sem"].astype(np.uint8), "seg": t["seg"].astype(np.int16),
                   "boxes": t["boxes"], "classes": t["classes"], "image_id": t["image_id"]}


def epochs_needed(steps: int, global_batch: int, num_images: int) -> int:
    """Epochs of the plan that cover ``steps`` global batches, with one to spare (workers may
    drop a partial batch at the end of their split)."""
    return math.ceil(steps * global_batch / max(num_images, 1)) + 1


def training_dataset(shards_uri: str, config: TargetConfig, steps: int, global_batch: int,
                     seed: int = 0, shards_per_item: int = 4):
    """A ``ray.data.Dataset`` of training targets covering ``steps`` batches of ``global_batch``
    images: columns image [3, H, W] uint8, sem [H, W] uint8, seg [H, W] int16, boxes [N, 4],
    classes [N], image_id."""
    import ray.data

    manifest = read_manifest(shards_uri)
    paths = shard_paths(shards_uri)
    if not paths or manifest["counts"]["images"] == 0:
        raise ValueError(f"{shards_uri}: no training images in the shards")
    rng = np.random.default_rng(seed)
    plan = []
    for e in range(epochs_needed(steps, global_batch, manifest["counts"]["images"])):
        order = [paths[i] for i in rng.permutation(len(paths))]
        plan += [{"shards": order[k:k + shards_per_item], "epoch": e, "index": len(plan) + k}
                 for k in range(0, len(order), shards_per_item)]
    return (ray.data.from_items(plan, override_num_blocks=len(plan))
            .flat_map(ShardTargets(manifest, config, seed)))


def collate_rows(batch: dict) -> dict:
    """A numpy batch from ``iter_batches`` -> ``pipeline.targets.collate`` output (torch)."""
    n = len(batch["image_id"])
    items = [{"image": batch["image"][k], "sem": batch["sem"][k].astype(np.int64),
              "seg": batch["seg"][k].astype(np.int64), "boxes": np.asarray(batch["boxes"][k], np.float32).reshape(-1, 4),
              "classes": np.asarray(batch["classes"][k], np.int64), "image_id": int(batch["image_id"][k])}
             for k in range(n)]
    return collate(items)
