"""The labeling job's model stage without Ray: ``pipeline.label.stages.Labeler`` submits model
batch k+1 before it takes batch k's results, and labels as ``Predictor.predict_resized`` does
batch by batch; the job's input split so that each model actor gets some (``input_items``) and
the actors' call size (``actor_rows``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.label.stages import DECODE_BATCH, Labeler, actor_rows, input_items


def test_input_items_split_a_small_job_for_its_actors():
    """One item per task with images left; tasks are split (the largest share first, never into
    empty slices) only while there are fewer items than pieces asked for."""
    assert input_items({0: 1024, 1: 1024, 2: 7}, 2) == [{"task": t, "part": 0, "parts": 1} for t in (0, 1, 2)]
    assert input_items({0: 48}, 2) == [{"task": 0, "part": 0, "parts": 2}, {"task": 0, "part": 1, "parts": 2}]
    assert input_items({0: 0, 3: 10, 4: 30}, 4) == [{"task": 3, "part": 0, "parts": 1}] + \
        [{"task": 4, "part": j, "parts": 3} for j in range(3)]
    assert input_items({0: 2}, 5) == [{"task": 0, "part": 0, "parts": 2}, {"task": 0, "part": 1, "parts": 2}]
    assert input_items({0: 0}, 3) == [] and input_items({}, 2) == []


def test_chunks_of_a_split_task_cover_its_images_once(tmp_path):
    """The slices of a split task, each in chunks of at most DECODE_BATCH, are the task's images
    not yet labeled, each once, in plan order."""
    from PIL import Image

    from pipeline.label.sources import make_plan
    from pipeline.label.stages import chunks

    images = tmp_path / "images"
    images.mkdir()
    for k in range(300):
        Image.new("RGB", (8, 6)).save(images / f"{k:04d}.png")
    plan = make_plan(str(images), str(tmp_path / "_plan"), task_images=300)
    skip = {0: {f"{k:04d}" for k in range(0, 300, 7)}}
    items = input_items({0: 300 - len(skip[0])}, 2)
    assert len(items) == 2
    got = [c for item in items for c in chunks(item, plan.dir, skip)]
    assert all(0 < len(c["entries"]) <= DECODE_BATCH for c in got)
    keys = [e["key"] for c in got for e in c["entries"]]
    assert len(got) == 5 and keys == [f"{k:04d}" for k in range(300) if k % 7]


def test_actor_rows_are_whole_batches_within_each_actors_share():
    assert actor_rows(8, 100_000, 4, 1024) == 64 and actor_rows(16, 100_000, 1, 1024) == 64
    assert actor_rows(24, 100_000, 1, 1024) == 48 and actor_rows(100, 100_000, 2, 1024) == 100
    assert actor_rows(8, 48, 2, 1024) == 24 and actor_rows(3, 6, 2, 1024) == 3 and actor_rows(8, 5, 1, 1024) == 8
    assert actor_rows(2, 12, 1, 4) == 4 and actor_rows(8, 100_000, 1, 20) == 16 and actor_rows(8, 100, 1, 3) == 8


class _Recording:
    """A predictor that logs its ``collate``, ``submit`` and ``result`` calls in order."""

    def __init__(self, predictor, log: list):
        self.predictor, self.log, self.shapes = predictor, log, []

    def collate(self, images):
        self.log.append(("collate", sum(event == "collate" for event, _ in self.log)))
        return self.predictor.collate(images)

    def submit(self, images, *args, **kwargs):
        k = sum(event == "submit" for event, _ in self.log)
        self.log.append(("submit", k))
        self.shapes.append(tuple(images.shape[-2:]))
        pending, log = self.predictor.submit(images, *args, **kwargs), self.log

        class Pending:
            def result(self):
                log.append(("result", k))
                return pending.result()

        return Pending()


def test_labeler_submits_the_next_batch_before_it_takes_results_and_labels_as_predict(registered_untrained):
    """Five readable images and a rejected one in batches of 2: three model batches, by aspect
    ratio (the portrait image with the square one, the two wide ones together), each made by
    the predictor's ``collate`` (page-locked on CUDA), the second submitted before the first's
    results are taken; each image's id map, segments and quality are those of
    ``predict_resized`` on the same batch, and come back in the input's order."""
    from ciae.data.transform import Transform, padded_size
    from pipeline.data.synth import SynthSpec, render, select_categories

    with open(registered_untrained["checkpoint"], "rb") as f:
        labeler = Labeler(f.read(), "model.pt", threads=1, amp=True, compile=False, batch_size=2)
    head = labeler.predictor.model.head
    with torch.no_grad():                        # untrained: detect everywhere, for instances
        head.cls_logits.bias.fill_(10.0)
        head.centerness.bias.fill_(10.0)
        head.box_reg.bias.fill_(2.0)
    transform = Transform(labeler.predictor.model.cfg.input)
    sizes = [(70, 90), (96, 128), None, (64, 64), (96, 128), (80, 60)]
    images = [None if s is None else transform.resize_for_test(
        render(select_categories(), k, seed=5, spec=SynthSpec(height=s[0], width=s[1]))[0])
        for k, s in enumerate(sizes)]
    n = len(sizes)
    batch = {"key": np.array([f"k{k}" for k in range(n)]), "task": np.zeros(n, np.int64),
             "image": [np.zeros((3, 0, 0), np.uint8) if im is None else im for im in images],
             "height": np.array([s[0] if s else 0 for s in sizes], np.int32),
             "width": np.array([s[1] if s else 0 for s in sizes], np.int32),
             "status": np.array(["rejected" if s is None else "ok" for s in sizes]),
             "reason": np.array(["not an image" if s is None else "" for s in sizes])}
    log: list = []
    predictor = labeler.predictor
    labeler.predictor = recording = _Recording(predictor, log)
    out = labeler(batch)
    assert log == [("collate", 0), ("submit", 0), ("collate", 1), ("submit", 1), ("result", 0),
                   ("collate", 2), ("submit", 2), ("result", 1), ("result", 2)]
    assert "image" not in out and list(out["key"]) == list(batch["key"])
    assert out["ids"][2].shape == (0, 0) and out["segments"][2] == [] and out["quality"][2] == 0

    groups = [[5, 3], [0, 1], [4]]                # 0.75, 1, 1.29, 1.33, 1.33 wide per high
    assert recording.shapes == [padded_size([images[k].shape[1:] for k in g]) for g in groups]
    ok = [k for k, s in enumerate(sizes) if s]
    expected = {}
    for group in groups:
        preds = predictor.predict_resized([images[k] for k in group], [sizes[k] for k in group])
        expected.update(zip(group, preds))
    things = set(predictor.model.thing_ids)
    assert sum(s["category_id"] in things for k in ok for s in out["segments"][k]) > 0
    for k in ok:
        assert np.array_equal(out["ids"][k], expected[k]["panoptic"]) and out["ids"][k].shape == sizes[k]
        assert list(out["segments"][k]) == expected[k]["segments_info"]
        assert out["quality"][k] == pytest.approx(expected[k]["quality"], abs=0)
