"""Training targets: source -> shards -> targets equals a direct computation from PNG and JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ciae.config import InputConfig
from pipeline.data.shards import read_manifest, read_table, shard_paths
from pipeline.feed.targets import TargetMaker


def direct_targets(src: dict, image_id: int, thing_mode: str = "merged") -> dict:
    """sem, seg, boxes, classes straight from the panoptic PNG and JSON, one mask per segment."""
    doc = json.load(open(src["panoptic_json"]))
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    stuff = [c["id"] for c in cats if not c["isthing"]]
    things = [c["id"] for c in cats if c["isthing"]]
    ann = next(a for a in doc["annotations"] if a["image_id"] == image_id)
    rgb = np.asarray(Image.open(os.path.join(src["panoptic_dir"], ann["file_name"])), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    sem = np.full(ids.shape, 255)
    seg = np.full(ids.shape, -1)
    boxes, classes = [], []
    for s in ann["segments_info"]:
        mask = ids == s["id"]
        if s["category_id"] in stuff:
            sem[mask] = seg[mask] = stuff.index(s["category_id"])
            continue
        t = things.index(s["category_id"])
        sem[mask] = {"merged": len(stuff), "specific": len(stuff) + t, "none": 255}[thing_mode]
        if not s["iscrowd"]:
            seg[mask] = len(stuff) + len(boxes)
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(t)
    return {"sem": sem, "seg": seg, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "classes": np.array(classes)}


@pytest.fixture(scope="module")
def shards(synth_small, coco_sample, make_shards) -> dict:
    return {name: (src, make_shards(src)) for name, src in (("synth", synth_small), ("coco", coco_sample))}


@pytest.mark.parametrize("name", ["synth", "coco"])
@pytest.mark.parametrize("thing_mode", ["merged", "specific", "none"])
def test_targets_equal_direct_computation(shards, name, thing_mode):
    src, d = shards[name]
    manifest = read_manifest(d)
    rows = read_table(d).to_pylist()
    for row in rows:
        # identity resize: the shorter side stays as it is, no flip
        cfg = InputConfig(shorter_sides=(min(row["height"], row["width"]),), flip_prob=0.0)
        t = TargetMaker.from_manifest(manifest, input=cfg, thing_mode=thing_mode)(row)
        ref = direct_targets(src, row["image_id"], thing_mode)
        assert np.array_equal(t["sem"], ref["sem"])
        assert np.array_equal(t["seg"], ref["seg"])
        assert np.array_equal(t["boxes"], ref["boxes"])
        assert np.array_equal(t["classes"], ref["classes"])
        image = np.asarray(Image.open(os.path.join(src["images"], row["file_name"])).convert("RGB"))
        assert np.array_equal(t["image"], image.transpose(2, 0, 1))


def test_crowd_is_ignored_by_instances_but_keeps_its_class(shards):
    src, d = shards["synth"]
    manifest = read_manifest(d)
    rows = [r for r in read_table(d).to_pylist() if any(s["iscrowd"] for s in r["segments"])]
    assert rows, "the synthetic set should hold a crowd segment"
    maker = TargetMaker.from_manifest(manifest, input=InputConfig(shorter_sides=(96,), flip_prob=0))
    for row in rows:
        t = maker(row)
        n_inst = sum(1 for s in row["segments"] if not s["iscrowd"]
                     and str(s["category_id"]) in manifest["thing_index"])
        assert len(t["boxes"]) == n_inst
        crowd = (t["sem"] == len(manifest["stuff_index"])) & (t["seg"] == -1)
        assert crowd.any()


def test_flip_mirrors_everything(shards):
    _, d = shards["coco"]
    manifest = read_manifest(d)
    row = read_table(d).to_pylist()[0]
    side = min(row["height"], row["width"])
    plain = TargetMaker.from_manifest(manifest, input=InputConfig((side,), flip_prob=0.0))(row)
    flip = TargetMaker.from_manifest(manifest, input=InputConfig((side,), flip_prob=1.0))(row)
    assert flip["flipped"] and not plain["flipped"]
    for k in ("image", "sem", "seg"):
        assert np.array_equal(flip[k], plain[k][..., ::-1])
    w = row["width"]
    mirrored = plain["boxes"][:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array([w, 0, w, 0])
    assert np.array_equal(flip["boxes"], mirrored)


def test_resize_and_scale_jitter(shards):
    _, d = shards["coco"]
    manifest = read_manifest(d)
    row = read_table(d).to_pylist()[0]  # 427x640
    cfg = InputConfig(shorter_sides=(200, 300), max_size=400, flip_prob=0.0)
    sizes = {TargetMaker.from_manifest(manifest, input=cfg, epoch=e)(row)["sem"].shape for e in range(8)}
    assert sizes == {(200, 300), (267, 400)}  # 300 is capped by the longer side
    t = TargetMaker.from_manifest(manifest, input=InputConfig((200,), flip_prob=0.0))(row)
    full = TargetMaker.from_manifest(manifest, input=InputConfig((427,), flip_prob=0.0))(row)
    ref = F.interpolate(torch.from_numpy(full["sem"])[None, None].float(), size=(200, 300),
                        mode="nearest-exact")[0, 0].long().numpy()
    assert np.array_equal(t["sem"], ref)
    assert t["image"].shape == (3, 200, 300)
    # boxes are tight around each resized instance
    for j, box in enumerate(t["boxes"]):
        ys, xs = np.nonzero(t["seg"] == len(manifest["stuff_index"]) + j)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # the same (seed, epoch, image) gives the same targets anywhere
    a = TargetMaker.from_manifest(manifest, input=cfg, seed=3)(row)
    b = TargetMaker.from_manifest(manifest, input=cfg, seed=3)(row)
    assert a["sem"].shape == b["sem"].shape and a["flipped"] == b["flipped"]


def test_ray_data_map(shards):
    import ray.data

    _, d = shards["synth"]
    manifest = read_manifest(d)
    maker = TargetMaker.from_manifest(manifest, input=InputConfig((64,), flip_prob=0.5))
    got = {r["image_id"]: r for r in ray.data.read_parquet(shard_paths(d)).map(maker).iter_rows()}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for row in read_table(d).to_pylist():
        local = maker(row)
        assert np.array_equal(np.asarray(got[row["image_id"]]["seg"]), local["seg"])
