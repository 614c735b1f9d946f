"""The training stream: every step's images come from one seeded permutation of the dataset.

Epoch e visits the rows in the order ``np.random.default_rng([seed, e]).permutation(n)``. Global
step s of global batch G = W * B takes the next G rows (an epoch is n // G steps; the last
n mod G rows of each permutation are left out), and rank r of W takes rows r*B .. r*B+B-1 of
them. Augmentation draws from (seed, epoch, image id), the shorter side from (seed, step). So:

* a step sees the images, and the jitter and flips, that one process with batch G sees,
  whatever W is (the jitter's shorter side is one per step, flips one per image);
* a worker restarted from the checkpoint of step s starts its stream at step s, so a restart
  neither repeats nor skips an image.

Each worker runs its own Ray Data job over its part of the plan (``training_dataset``), so no
split coordinator sits between the workers and their data. The plan is cut into items of
``steps_per_item`` steps. A Ray Data task (``flat_map``) reads an item's rows, one Parquet row
group per row at most, and turns them into targets, with order preserved. ``step_batches``
groups the rows back into one collated batch per step. ``local_batches`` yields the same
batches in one process without Ray.

A row whose image cannot be decoded (the data stage only checks JPEG structure) is skipped with
a warning that names it, and its step trains on the rest. If a worker loses a whole step's
images, it trains that step on its previous batch, so the workers stay in step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np

from ciae.config import Config
from pipeline import storage
from pipeline.shards import read_manifest, shard_paths
from pipeline.targets import TargetMaker, collate

log = logging.getLogger(__name__)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the dataset's rows (global row indices)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    if num_images < global_batch:
        raise ValueError(f"the training set holds {num_images} images, fewer than one global batch "
                         f"of {global_batch}")
    return num_images // global_batch


def plan_items(num_images: int, global_batch: int, world: int, rank: int, start: int, end: int | None,
               seed: int = 0, steps_per_item: int = 8) -> Iterator[dict]:
    """Rank ``rank``'s part of steps [start, end) (``end`` None: endless), ``steps_per_item``
    steps per item: {"step": [B * k], "epoch": [B * k], "row": [B * k] global row indices}."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} workers")
    b, per_epoch = global_batch // world, steps_per_epoch(num_images, global_batch)
    step, order, order_epoch = start, None, -1
    while end is None or step < end:
        item = {"step": [], "epoch": [], "row": []}
        for s in range(step, step + steps_per_item if end is None else min(step + steps_per_item, end)):
            epoch, k = divmod(s, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(num_images, seed, epoch), epoch
            first = k * global_batch + rank * b
            item["row"] += order[first:first + b].tolist()
            item["step"] += [s] * b
            item["epoch"] += [epoch] * b
        step = item["step"][-1] + 1
        yield item


class ShardTargets:
    """Ray Data ``flat_map`` function (and the local reader): a plan item -> the targets of its
    rows in plan order, each with its step. Reads only the row groups that hold the rows."""

    def __init__(self, shards_uri: str, manifest: dict, cfg: Config):
        self.paths = shard_paths(shards_uri, manifest)
        self.first_row = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])
        self.maker = TargetMaker.from_manifest(manifest, input=cfg.input, thing_mode=cfg.embedding.thing_mode,
                                               train=True, seed=cfg.solver.seed)

    def _rows(self, rows: list[int]) -> dict[int, tuple[str, dict]]:
        """Global row index -> (shard path, row dict), one read per row group."""
        out, groups = {}, {}
        for r in rows:
            shard = int(np.searchsorted(self.first_row, r, side="right")) - 1
            groups.setdefault(shard, []).append(r)
        for shard, wanted in groups.items():
            with storage.parquet_file(self.paths[shard]) as file:
                ends = np.cumsum([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)])
                by_group = {}
                for r in wanted:
                    local = r - int(self.first_row[shard])
                    by_group.setdefault(int(np.searchsorted(ends, local, side="right")), []).append((r, local))
                for g, members in by_group.items():
                    table = file.read_row_group(g)
                    offset = int(ends[g]) - table.num_rows
                    for r, local in members:
                        out[r] = (self.paths[shard], table.slice(local - offset, 1).to_pylist()[0])
        return out

    def __call__(self, item: dict) -> Iterator[dict]:
        rows = self._rows(sorted(set(item["row"])))
        for step, epoch, r in zip(item["step"], item["epoch"], item["row"]):
            path, row = rows[r]
            self.maker.epoch = int(epoch)
            try:
                t = self.maker(row, step=int(step))
            except Exception as e:  # a corrupt image: skip it, name it
                log.warning("skipping image %s (%s) in %s: %s", row.get("image_id"),
                            row.get("file_name"), path, e)
                continue
            yield {"step": int(step), "image": t["image"], "sem": t["sem"], "seg": t["seg"],
                   "boxes": t["boxes"], "classes": t["classes"], "image_id": t["image_id"]}


def training_dataset(shards_uri: str, cfg: Config, *, global_batch: int, world: int, rank: int,
                     start: int, end: int, steps_per_item: int = 8):
    """Rank ``rank``'s stream for steps [start, end) as an order-preserving ``ray.data.Dataset``
    of targets: columns step, image [3, H, W] uint8, sem [H, W] uint8, seg [H, W] int16,
    boxes [N, 4], classes [N], image_id. Group it with ``step_batches``."""
    import ray.data

    from pipeline import ray_idle

    manifest = read_manifest(shards_uri)
    items = list(plan_items(manifest["counts"]["images"], global_batch, world, rank, start, end,
                            cfg.solver.seed, steps_per_item))
    ray_idle.install().execution_options.preserve_order = True
    return (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
            .flat_map(ShardTargets(shards_uri, manifest, cfg)))


def local_batches(shards_uri: str, cfg: Config, start: int = 0) -> Iterator[tuple[int, dict]]:
    """(step, collated batch) from ``start`` on, endless, in this process: the batches of the
    plan with one worker, which W workers' batches of each step add up to."""
    manifest = read_manifest(shards_uri)
    targets = ShardTargets(shards_uri, manifest, cfg)
    items = plan_items(manifest["counts"]["images"], cfg.solver.batch_size, 1, 0, start, None, cfg.solver.seed)
    yield from step_batches((row for item in items for row in targets(item)), start)


def rows_of_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """Numpy batches (``iter_batches``) -> rows."""
    for batch in batches:
        for k in range(len(batch["step"])):
            yield {key: batch[key][k] for key in batch}


def step_batches(rows: Iterator[dict], start: int, end: int | None = None) -> Iterator[tuple[int, dict]]:
    """Rows in step order -> (step, collated batch) for every step from ``start`` (to ``end``).
    A step with no rows (all its images failed to decode) reuses the previous batch; when it
    is the first, it takes the next one."""
    expected, last = start, None
    for step, group in itertools.groupby(rows, key=lambda r: int(r["step"])):
        batch = _collate(list(group))
        for missing in range(expected, step):
            _warn_lost(missing)
            yield missing, batch if last is None else last
        yield step, batch
        expected, last = step + 1, batch
    for missing in range(expected, end if end is not None and last is not None else expected):
        _warn_lost(missing)
        yield missing, last


def _warn_lost(step: int) -> None:
    log.warning("step %d: no image of this worker's batch could be decoded; it trains on a "
                "neighbouring batch", step)


def _collate(rows: list[dict]) -> dict:
    return collate([{"image": np.array(r["image"]), "sem": np.array(r["sem"], np.uint8),
                     "seg": np.array(r["seg"], np.int16),
                     "boxes": np.array(r["boxes"], np.float32).reshape(-1, 4),
                     "classes": np.array(r["classes"], np.int64), "image_id": int(r["image_id"])}
                    for r in rows])
