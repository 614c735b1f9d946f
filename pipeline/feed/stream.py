"""The training stream: every step's images come from one seeded permutation of the dataset.

Epoch e visits the rows in the order ``np.random.default_rng([seed, e]).permutation(n)``. Global
step s of global batch G = W * B takes the next G rows (an epoch is n // G steps; the last
n mod G rows of each permutation are left out), and rank r of W takes rows r*B .. r*B+B-1 of
them. With aspect grouping (``InputConfig.aspect_grouping``, on by default, as detectron2's
``ASPECT_RATIO_GROUPING``), the permutation is first regrouped into whole global batches of
images of one orientation, in the order they fill up as it is walked (``epoch_order``): a
batch pads to its largest image, and one of both orientations would pad to a square, ~1.5x the
pixels of its images on COCO. An epoch is then the sum over the two orientations of
n_o // G steps. Augmentation draws from (seed, epoch, image id), the shorter side from
(seed, step). So:

* a step sees the images, and the jitter and flips, that one process with batch G sees,
  whatever W is (the jitter's shorter side is one per step, flips one per image);
* a worker restarted from the checkpoint of step s starts its stream at step s, so a restart
  neither repeats nor skips an image.

Each worker makes its part of the plan with Ray tasks (``stream_batches``): one task (one CPU)
per step reads the step's rows, one Parquet row group per row at most, turns them into targets
and pads them into the step's batch, as numpy arrays that reach the worker through the object
store without a copy; ``window`` steps are in flight, taken in step order. The training process
itself only submits tasks and takes results: it runs no thread and no scheduling loop beside the
step (an earlier design ran a Ray Data job per worker, whose executor thread held the
interpreter 93-95% of the time and slowed every op of a GPU step, benchmarks/RESULTS.md).
``local_batches`` yields the same batches in one process without Ray.

A row whose image cannot be decoded (the data stage only checks JPEG structure) is skipped with
a warning that names it, and its step trains on the rest. If a worker loses a whole step's
images, it trains that step on its previous batch, so the workers stay in step.
"""

from __future__ import annotations

import collections
import logging
import warnings
from collections.abc import Iterator

import numpy as np

from ciae.config import Config
from ciae.data.panoptic import IGNORE_SEG, IGNORE_SEM
from ciae.data.transform import padded_size
from pipeline.data import storage
from pipeline.data.shards import decode_portraits, model_categories, read_manifest, shard_paths
from pipeline.feed.targets import TargetMaker

log = logging.getLogger(__name__)


def epoch_order(num_images: int, seed: int, epoch: int, groups: np.ndarray | None = None,
                global_batch: int = 1) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the dataset's rows (global row indices): a seeded
    permutation; with ``groups`` ([n] per row its group, ``aspect_groups``), regrouped into whole
    global batches of one group each, in the order in which walking the permutation fills them
    (each group's last n_g mod ``global_batch`` rows of it left out)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    if groups is None:
        return order
    of = groups[order]
    blocks, filled = [], []
    for g in np.unique(of):
        at = np.flatnonzero(of == g)                    # the group's positions in the permutation
        k = len(at) // global_batch * global_batch
        blocks.append(order[at[:k]].reshape(-1, global_batch))
        filled.append(at[global_batch - 1:k:global_batch])
    return np.concatenate(blocks)[np.argsort(np.concatenate(filled), kind="stable")].reshape(-1)


def steps_per_epoch(num_images: int, global_batch: int, groups: np.ndarray | None = None) -> int:
    if num_images < global_batch:
        raise ValueError(f"the training set holds {num_images} images, fewer than one global batch "
                         f"of {global_batch}")
    if groups is None:
        return num_images // global_batch
    return int(sum(n // global_batch for n in np.bincount(groups)))


def aspect_groups(manifest: dict, cfg: Config, global_batch: int) -> np.ndarray | None:
    """The training plan's groups ([n] int8, 1 where an image is taller than wide, from the
    manifest's ``portrait`` masks, ``pipeline.data.shards.encode_portraits``), or None (no
    grouping): ``cfg.input.aspect_grouping`` off, a shard prepared before its masks were kept,
    or too few images of each orientation for one global batch."""
    shards = manifest["shards"]
    if not cfg.input.aspect_grouping:
        return None
    if any("portrait" not in s for s in shards):
        log.info("training without aspect grouping: the shards were prepared before `ciae prepare` "
                 "kept their images' orientations; prepare them again to group them")
        return None
    groups = np.concatenate([np.zeros(0, bool)] + [decode_portraits(s["portrait"], s["rows"]) for s in shards])
    if len(groups) < global_batch or steps_per_epoch(len(groups), global_batch, groups.astype(np.int8)) == 0:
        return None
    return groups.astype(np.int8)


def plan_items(num_images: int, global_batch: int, world: int, rank: int, start: int, end: int | None,
               seed: int = 0, steps_per_item: int = 8, groups: np.ndarray | None = None) -> Iterator[dict]:
    """Rank ``rank``'s part of steps [start, end) (``end`` None: endless), ``steps_per_item``
    steps per item: {"step": [B * k], "epoch": [B * k], "row": [B * k] global row indices};
    ``groups``: ``aspect_groups``'s, or None."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} workers")
    b, per_epoch = global_batch // world, steps_per_epoch(num_images, global_batch, groups)
    step, order, order_epoch = start, None, -1
    while end is None or step < end:
        item = {"step": [], "epoch": [], "row": []}
        for s in range(step, step + steps_per_item if end is None else min(step + steps_per_item, end)):
            epoch, k = divmod(s, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(num_images, seed, epoch, groups, global_batch), epoch
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


def data_window(cfg: Config, batch_per_worker: int, world: int, free_cpus: float,
                object_store_bytes: float) -> int:
    """Steps each worker keeps in flight: enough tasks for the CPUs the training workers leave
    free (one more, so that a CPU never waits on the consumer), at most a quarter of the object
    store's room for all workers' outputs together, at least 2."""
    step_bytes = batch_per_worker * cfg.input.max_size * max(cfg.input.shorter_sides) * 6   # image, sem, seg
    by_cpus = int(free_cpus // world) + 1
    by_store = int(object_store_bytes // 4 // world // max(step_bytes, 1))
    return max(2, min(by_cpus, by_store))


_targets_cache: dict[tuple, ShardTargets] = {}


def _step_task(source: dict, item: dict) -> tuple[int, dict | None]:
    """A Ray task: one step's plan item -> (step, ``numpy_batch`` of its rows, or None when no
    image of the step could be decoded). The shard readers are kept per worker process."""
    key = (source["uri"], source["manifest"].get("created"), repr(source["cfg"]))
    if key not in _targets_cache:
        _targets_cache.clear()
        _targets_cache[key] = ShardTargets(source["uri"], source["manifest"], source["cfg"])
    return int(item["step"][0]), numpy_batch(list(_targets_cache[key](item)))


def stream_batches(shards_uri: str, cfg: Config, *, global_batch: int, world: int, rank: int,
                   start: int, end: int, window: int = 2) -> Iterator[tuple[int, dict]]:
    """Rank ``rank``'s (step, collated batch) for steps [start, end), each step's targets made
    by a Ray task (one CPU) of its own, ``window`` steps in flight, in step order.

    The calling process (a training worker) only submits tasks and takes their results: no
    thread of its own, no scheduling loop, so nothing in it competes with the training step
    for the interpreter. A batch's arrays are read from the object store without a copy.
    A failed task is retried by Ray (the plan makes it produce the same batch)."""
    import ray

    manifest = read_manifest(shards_uri)
    groups = aspect_groups(manifest, cfg, global_batch)
    # what the tasks read of the manifest, without the portrait rows (every task deserialises it)
    slim = manifest | {"shards": [{"file": s["file"], "rows": s["rows"]} for s in manifest["shards"]]}
    source = ray.put({"uri": shards_uri, "manifest": slim, "cfg": cfg})
    task = ray.remote(num_cpus=1)(_step_task)
    items = plan_items(manifest["counts"]["images"], global_batch, world, rank, start, end,
                       cfg.solver.seed, steps_per_item=1, groups=groups)
    pending: collections.deque = collections.deque()

    def take() -> tuple[int, dict | None]:
        step, batch = ray.get(pending.popleft())
        return step, None if batch is None else to_torch(batch)

    def results() -> Iterator[tuple[int, dict | None]]:
        for item in items:
            pending.append(task.remote(source, item))
            if len(pending) >= window:
                yield take()
        while pending:
            yield take()

    yield from fill_lost_steps(results())


def local_batches(shards_uri: str, cfg: Config, start: int = 0) -> Iterator[tuple[int, dict]]:
    """(step, collated batch) from ``start`` on, endless, in this process: the batches of the
    plan with one worker, which W workers' batches of each step add up to."""
    manifest = read_manifest(shards_uri)
    targets = ShardTargets(shards_uri, manifest, cfg)
    items = plan_items(manifest["counts"]["images"], cfg.solver.batch_size, 1, 0, start, None,
                       cfg.solver.seed, steps_per_item=1,
                       groups=aspect_groups(manifest, cfg, cfg.solver.batch_size))
    steps = ((int(item["step"][0]), numpy_batch(list(targets(item)))) for item in items)
    yield from fill_lost_steps((s, None if b is None else to_torch(b)) for s, b in steps)


def batch_stream(shards_uri: str, cfg: Config) -> Iterator[dict]:
    """Endless training batches of cfg.solver.batch_size images: the plan above (a permutation
    per epoch seeded by cfg.solver.seed, new jitter and flips each epoch), the same batches that
    Ray Train workers split between them."""
    return (batch for _, batch in local_batches(shards_uri, cfg))


def model_for_shards(cfg: Config, shards_uri: str):
    """A fresh ``ciae.modeling.model.CIAEModel`` whose classes are the shards' categories."""
    from ciae.modeling.model import CIAEModel
    return CIAEModel(cfg, *model_categories(read_manifest(shards_uri)))


def fill_lost_steps(steps: Iterator[tuple[int, dict | None]]) -> Iterator[tuple[int, dict]]:
    """(step, batch or None) for consecutive steps -> (step, batch). A step without a batch (all
    its images failed to decode) reuses the previous batch; when it is the first, it takes the
    next one."""
    lost, last = [], None
    for step, batch in steps:
        if batch is None:
            _warn_lost(step)
            if last is None:
                lost.append(step)
                continue
            batch = last
        for missing in lost:
            yield missing, batch
        lost, last = [], batch
        yield step, batch
    if lost:
        raise ValueError(f"no image of steps {lost[0]}..{lost[-1]} could be decoded")


def _warn_lost(step: int) -> None:
    log.warning("step %d: no image of this worker's batch could be decoded; it trains on a "
                "neighbouring batch", step)


def numpy_batch(rows: list[dict]) -> dict | None:
    """Targets of one step's images (``ShardTargets`` rows) -> a batch as ``collate`` lays it
    out, in numpy arrays (the object store passes them without a copy); None without rows."""
    if not rows:
        return None
    hh, ww = padded_size([r["image"].shape[1:] for r in rows])

    def pad(key: str, fill: int, dtype) -> np.ndarray:
        first = np.asarray(rows[0][key])
        out = np.full((len(rows), *first.shape[:-2], hh, ww), fill, dtype=dtype)
        for k, r in enumerate(rows):
            m = np.asarray(r[key])
            out[k, ..., :m.shape[-2], :m.shape[-1]] = m
        return out

    return {"images": pad("image", 0, np.uint8), "sem": pad("sem", IGNORE_SEM, np.uint8),
            "seg": pad("seg", IGNORE_SEG, np.int16),
            "boxes": [np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in rows],
            "classes": [np.asarray(r["classes"], np.int64) for r in rows],
            "image_sizes": [tuple(int(v) for v in r["image"].shape[1:]) for r in rows],
            "image_ids": [int(r["image_id"]) for r in rows]}


def to_torch(batch: dict) -> dict:
    """``numpy_batch`` -> ``pipeline.feed.targets.collate``'s batch, sharing the arrays' memory (read
    only when they come from the object store: the step reads its batch and writes none of it)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {**batch, "images": torch.from_numpy(batch["images"]), "sem": torch.from_numpy(batch["sem"]),
                "seg": torch.from_numpy(batch["seg"]), "boxes": [torch.from_numpy(b) for b in batch["boxes"]],
                "classes": [torch.from_numpy(c) for c in batch["classes"]]}
