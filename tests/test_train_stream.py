"""The training plan and its streams: W workers' batches add up to one process's, a restart
starts where it left off, corrupt images are skipped, and the Ray tasks make what the plan says."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ciae.config import Config
from pipeline.data.shards import decode_portraits, encode_portraits, read_manifest, shard_paths
from pipeline.feed.stream import (ShardTargets, aspect_groups, data_window, fill_lost_steps, local_batches,
                                  numpy_batch, plan_items, steps_per_epoch, stream_batches, to_torch)
from pipeline.feed.targets import collate


def stream_config(batch: int, seed: int = 5) -> Config:
    return Config.small().merged({"input": {"shorter_sides": (64, 96), "max_size": 160, "flip_prob": 0.5},
                                  "solver": {"batch_size": batch, "seed": seed}})


def plan_rows(n, batch, world, rank, start, end, seed=3, steps_per_item=8, groups=None):
    items = list(plan_items(n, batch, world, rank, start, end, seed, steps_per_item, groups=groups))
    return sum((i["row"] for i in items), []), sum((i["step"] for i in items), [])


def _portraits(n: int, share: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(1).random(n) < share).astype(np.int8)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_aspect_grouped_steps_hold_one_orientation_and_add_up_over_workers(world):
    """Each global batch is of one orientation; an epoch visits 37 // 4 + 13 // 4 = 12 steps'
    rows (36 + 12), each at most once; W workers' rows add up to one process's; a resumed plan is the
    rest of the plan; with a single group the plan is the ungrouped one."""
    n, batch, steps = 50, 4, 36
    groups = _portraits(n)
    assert np.bincount(groups).tolist() == [37, 13] and steps_per_epoch(n, batch, groups) == 12
    one, _ = plan_rows(n, batch, 1, 0, 0, steps, groups=groups)
    for s in range(steps):
        assert len(set(groups[one[batch * s:batch * (s + 1)]])) == 1
    for e in range(3):
        epoch = one[12 * batch * e:12 * batch * (e + 1)]
        assert len(set(epoch)) == len(epoch) == 48
        assert np.bincount(groups[epoch]).tolist() == [36, 12]
    assert one[:48] != one[48:96]
    b = batch // world
    ranks = [plan_rows(n, batch, world, r, 0, steps, steps_per_item=5, groups=groups)[0] for r in range(world)]
    for s in range(steps):
        assert one[batch * s:batch * (s + 1)] == sum((rows[b * s:b * (s + 1)] for rows in ranks), [])
    rest, _ = plan_rows(n, batch, world, world - 1, 17, steps, groups=groups)
    assert rest == ranks[-1][b * 17:]
    same = np.zeros(n, np.int8)
    assert plan_rows(n, batch, 1, 0, 0, steps, groups=same) == plan_rows(n, batch, 1, 0, 0, steps)


def _hw(portrait: int) -> dict:
    return {"height": 640, "width": 480} if portrait else {"height": 480, "width": 640}


def test_portrait_masks_round_trip():
    for n in [0, 1, 7, 8, 9, 128, 130]:
        flags = np.random.default_rng(n).random(n) < 0.3
        mask = encode_portraits([_hw(f) for f in flags])
        assert len(mask) == 2 * -(-n // 8) and decode_portraits(mask, n).tolist() == flags.tolist()
    assert encode_portraits([_hw(1)] + [_hw(0)] * 8 + [_hw(1)]) == "0102"   # row k: bit k % 8 of byte k // 8


def test_aspect_groups_come_from_the_manifest_or_not_at_all():
    cfg = stream_config(4)
    manifest = {"shards": [{"rows": 3, "portrait": encode_portraits([_hw(r) for r in [0, 1, 0]])},
                           {"rows": 6, "portrait": encode_portraits([_hw(r) for r in [1, 0, 0, 0, 1, 1]])}]}
    assert aspect_groups(manifest, cfg, 2).tolist() == [0, 1, 0, 1, 0, 0, 0, 1, 1]
    assert aspect_groups(manifest, cfg, 5) is not None             # 5 // 5 + 4 // 5 = 1 step
    assert aspect_groups(manifest, cfg, 6) is None                  # 5 // 6 + 4 // 6 = 0: no grouping
    off = cfg.merged({"input": {"aspect_grouping": False}})
    assert aspect_groups(manifest, off, 2) is None
    older = {"shards": [manifest["shards"][0], {"rows": 6}]}         # prepared before they were kept
    assert aspect_groups(older, cfg, 2) is None


@pytest.mark.parametrize("world", [2, 4])
def test_workers_batches_add_up_to_one_process_batches(world):
    n, batch, steps = 50, 4, 40
    one, one_steps = plan_rows(n, batch, 1, 0, 0, steps)
    assert one_steps == [s for s in range(steps) for _ in range(batch)]
    b = batch // world
    ranks = [plan_rows(n, batch, world, r, 0, steps, steps_per_item=3)[0] for r in range(world)]
    for s in range(steps):
        assert one[batch * s:batch * (s + 1)] == sum((rows[b * s:b * (s + 1)] for rows in ranks), [])
    per_epoch = n // batch * batch      # 48 of 50 rows per epoch, each once
    for e in range(3):
        epoch = one[per_epoch * e:per_epoch * (e + 1)]
        assert len(set(epoch)) == len(epoch) and set(epoch) <= set(range(n))
    assert one[:per_epoch] != one[per_epoch:2 * per_epoch]      # a new order every epoch


def test_a_resumed_plan_is_the_rest_of_the_plan():
    whole, _ = plan_rows(50, 4, 2, 1, 0, 30)
    rest, steps = plan_rows(50, 4, 2, 1, 17, 30)
    assert rest == whole[2 * 17:] and steps[0] == 17 and steps[-1] == 29


def test_plans_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        next(plan_items(50, 4, 3, 0, 0, 10))
    with pytest.raises(ValueError, match="holds 3 images, fewer than one global batch of 4"):
        next(plan_items(3, 4, 1, 0, 0, 10))


def _batch(*image_ids):
    return {"image_ids": list(image_ids)}


def test_steps_without_rows_reuse_a_neighbouring_batch(caplog):
    steps = [(4, None), (5, _batch(1, 2)), (6, _batch(3)), (7, None), (8, _batch(4)), (9, None)]
    with caplog.at_level(logging.WARNING):
        got = [(s, b["image_ids"]) for s, b in fill_lost_steps(iter(steps))]
    assert got == [(4, [1, 2]), (5, [1, 2]), (6, [3]), (7, [3]), (8, [4]), (9, [4])]
    assert sum("could be decoded" in r.message for r in caplog.records) == 3
    with pytest.raises(ValueError, match="no image of steps 2..3 could be decoded"):
        list(fill_lost_steps(iter([(2, None), (3, None)])))


def _target(h, w, image_id, n=1):
    g = np.random.default_rng(image_id)
    return {"image": g.integers(0, 255, (3, h, w), dtype=np.uint8), "sem": g.integers(0, 255, (h, w), dtype=np.uint8),
            "seg": g.integers(-1, 9, (h, w)).astype(np.int16), "boxes": g.random((n, 4), dtype=np.float32) * 10,
            "classes": np.arange(n, dtype=np.int64), "image_id": image_id}


def test_numpy_batches_are_collate_batches():
    rows = [_target(40, 70, 1, n=2), _target(64, 33, 2, n=0)]
    got, want = to_torch(numpy_batch(rows)), collate(rows)
    assert got.keys() == want.keys()
    for key in ("images", "sem", "seg"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key])
    for key in ("boxes", "classes"):
        assert all(torch.equal(a, b) for a, b in zip(got[key], want[key]))
    assert got["image_sizes"] == want["image_sizes"] and got["image_ids"] == want["image_ids"] == [1, 2]
    assert numpy_batch([]) is None


def test_the_window_fits_the_free_cpus_and_the_object_store():
    cfg = Config()                # the paper's: 800 x 1333 at most: ~51 MB a step of 8 images
    assert data_window(cfg, 8, 1, free_cpus=12, object_store_bytes=2 * 2**30) == 10   # the store decides
    assert data_window(cfg, 8, 1, free_cpus=3, object_store_bytes=2 * 2**30) == 4     # the CPUs decide
    assert data_window(cfg, 8, 2, free_cpus=1, object_store_bytes=2**28) == 2         # never below 2


@pytest.fixture(scope="module")
def shards(synth_shards) -> str:
    return synth_shards


def test_local_batches_follow_the_plan(shards):
    manifest = read_manifest(shards)
    ids = [r["image_id"] for p in shard_paths(shards) for r in pq.read_table(p, columns=["image_id"]).to_pylist()]
    rows, _ = plan_rows(len(ids), 2, 1, 0, 2, 8, seed=5)
    got = list(zip(range(6), local_batches(shards, stream_config(2), start=2)))
    assert [s for _, (s, _) in got] == list(range(2, 8))
    assert sum((b["image_ids"] for _, (_, b) in got), []) == [ids[r] for r in rows]
    b = got[0][1][1]
    assert b["images"].dtype == torch.uint8 and b["images"].shape[2] % 32 == 0 and b["images"].shape[3] % 32 == 0
    for k, (h, w) in enumerate(b["image_sizes"]):
        assert (b["sem"][k, h:] == 255).all() and (b["seg"][k, :, w:] == -1).all()
    assert manifest["counts"]["images"] == len(ids) == 6


def test_one_shorter_side_per_step(shards):
    """Every image of a step gets the step's shorter side (no padding between sizes, equal work
    for data-parallel workers); the side still varies from step to step."""
    sides = []
    for _, (_, b) in zip(range(12), local_batches(shards, stream_config(4))):
        per_image = {min(h, w) for h, w in b["image_sizes"]}
        assert len(per_image) == 1
        sides.append(per_image.pop())
    assert set(sides) == {64, 96}


def test_ray_tasks_make_each_rank_its_part_of_the_plan(shards, ray_local):
    start, end = 1, 7
    local = dict(zip(range(start, end), (b for _, b in local_batches(shards, stream_config(4), start=start))))
    for rank in range(2):
        got = list(stream_batches(shards, stream_config(4), global_batch=4, world=2, rank=rank, start=start,
                                  end=end, window=3))
        assert [s for s, _ in got] == list(range(start, end))
        for step, batch in got:
            whole = local[step]
            assert batch["image_ids"] == whole["image_ids"][2 * rank:2 * rank + 2]
            for k in range(2):       # the same jitter and flips as in one process
                h, w = batch["image_sizes"][k]
                assert (h, w) == whole["image_sizes"][2 * rank + k]
                assert torch.equal(batch["images"][k, :, :h, :w], whole["images"][2 * rank + k, :, :h, :w])
                assert torch.equal(batch["seg"][k, :h, :w], whole["seg"][2 * rank + k, :h, :w])


def test_a_corrupt_image_is_skipped_and_named(shards, tmp_path, caplog):
    import shutil

    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    path = shard_paths(str(d))[0]
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = images[1][:40]                                   # a truncated JPEG
    bad = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(bad, path, row_group_size=16)
    bad_id = table.column("image_id")[1].as_py()

    targets = ShardTargets(str(d), read_manifest(str(d)), stream_config(2, seed=0))
    items = [{"step": [0, 0], "epoch": [0, 0], "row": [0, 1]}, {"step": [1, 1], "epoch": [0, 0], "row": [2, 3]}]
    with caplog.at_level(logging.WARNING):
        got = [(item["step"][0], numpy_batch(list(targets(item)))["image_ids"]) for item in items]
    ids = table.column("image_id").to_pylist()
    assert got == [(0, [ids[0]]), (1, [ids[2], ids[3]])]
    assert any(f"skipping image {bad_id}" in r.message and path in r.message for r in caplog.records)
