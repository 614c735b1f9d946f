"""The synthetic dataset: exact COCO panoptic format, real categories, deterministic by seed."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.data.synth import (DEFAULT_CATEGORIES, SynthSpec, coco_categories, select_categories,
                                 write_dataset)


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for sub in ("images", "panoptic"):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            h.update(name.encode() + open(os.path.join(root, sub, name), "rb").read())
    h.update(open(os.path.join(root, "panoptic.json"), "rb").read())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
    spec = SynthSpec(height=64, width=80)
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_dataset(str(tmp_path / d), 3, seed=seed, spec=spec)
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))
    assert _digest(str(tmp_path / "a")) != _digest(str(tmp_path / "c"))


def test_exact_coco_panoptic_format(synth_small):
    doc = json.load(open(synth_small["panoptic_json"]))
    coco = {c.id: c for c in coco_categories().categories}
    for c in doc["categories"]:  # real COCO panoptic ids and names
        assert coco[c["id"]].name == c["name"] and bool(coco[c["id"]].isthing) == bool(c["isthing"])
    assert {c["name"] for c in doc["categories"]} == set(DEFAULT_CATEGORIES)
    assert len(doc["images"]) == len(doc["annotations"]) == 6
    images = {im["id"]: im for im in doc["images"]}
    seen_crowd = seen_void = False
    for ann in doc["annotations"]:
        im = images[ann["image_id"]]
        assert Image.open(os.path.join(synth_small["images"], im["file_name"])).size == (im["width"], im["height"])
        rgb = np.asarray(Image.open(os.path.join(synth_small["panoptic_dir"], ann["file_name"])), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert sorted(set(np.unique(ids)) - {0}) == sorted(s["id"] for s in ann["segments_info"])
        seen_void |= bool((ids == 0).any())
        for s in ann["segments_info"]:
            ys, xs = np.nonzero(ids == s["id"])
            assert s["area"] == len(ys)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            seen_crowd |= bool(s["iscrowd"])
            if s["iscrowd"]:
                assert coco[s["category_id"]].isthing
    assert seen_crowd and seen_void


def test_things_overlap_and_vary(tmp_path):
    """Several instances per image, of several classes, with varied sizes."""
    doc = write_dataset(str(tmp_path), 12, seed=1, spec=SynthSpec(height=96, width=96))
    things = {c["id"] for c in doc["categories"] if c["isthing"]}
    inst = [s for a in doc["annotations"] for s in a["segments_info"] if s["category_id"] in things]
    assert len(inst) >= 12 * 2
    assert {s["category_id"] for s in inst} == things
    areas = [s["area"] for s in inst]
    assert max(areas) > 4 * min(areas)
    # occlusion: some box pairs in one image intersect
    overlaps = 0
    for a in doc["annotations"]:
        bs = [s["bbox"] for s in a["segments_info"] if s["category_id"] in things]
        for i in range(len(bs)):
            for j in range(i):
                (x0, y0, w0, h0), (x1, y1, w1, h1) = bs[i], bs[j]
                overlaps += x0 < x1 + w1 and x1 < x0 + w0 and y0 < y1 + h1 and y1 < y0 + h0
    assert overlaps > 0


def test_category_subsets():
    t = select_categories(["sea", "155", "boat", "person"])  # by name or id, once each
    assert [c.name for c in t.categories] == ["person", "boat", "sea"]
    with pytest.raises(ValueError, match="unknown COCO panoptic categories"):
        select_categories(["sky-other-merged", "unicorn"])
    with pytest.raises(ValueError, match="at least one stuff and one thing"):
        select_categories(["person", "car"])


def test_cli_synth(tmp_path, capsys):
    from workflows.cli import main

    out = str(tmp_path / "s")
    assert main(["synth", out, "--images", "2", "--seed", "1", "--height", "48", "--width", "64",
                 "--categories", "sea,boat"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    doc = json.load(open(os.path.join(out, "panoptic.json")))
    assert {c["name"] for c in doc["categories"]} == {"sea", "boat"}
    assert doc["images"][0]["height"] == 48 and doc["images"][0]["width"] == 64
