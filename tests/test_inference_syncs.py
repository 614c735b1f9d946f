"""Inference at the GPU's pace, counted on the CPU (``ciae.utils.opcount``): ``Predictor`` on the GPU
path (``kernel_backend = "triton"``, interpreted here) queues a batch's whole post-processing
without a host sync and takes its results in one copy, at most two host syncs per batch whatever
the number of images and instances; a batch of 8 issues at most 1.5 times the operations of a
batch of 1; the twins (``"torch"``) give the same outputs.

The planted model detects everywhere, with boxes narrow enough that 34-48 instances per image
survive NMS on inputs of 96 x 160 and smaller (fewer NMS candidates per level than the default,
which the interpreter would take minutes over; its time goes with the padded input size)."""

from __future__ import annotations

import numpy as np
import pytest
from test_device_discipline import planted_model, toy_batch

from ciae.engine.predictor import Predictor
from ciae.modeling.backbone import GroupNorm2d
from ciae.utils.opcount import OpCounter

pytest.importorskip("triton")

TEST_SIZES = [(96, 160), (80, 128), (96, 112), (88, 120), (96, 128), (72, 108), (96, 100), (75, 128)]
OUT_SIZES = [(96, 160), (100, 160), (48, 64), (88, 120), (150, 200), (72, 108), (50, 52), (75, 128)]


@pytest.fixture(scope="module")
def runs() -> dict:
    """{(backend, B): (results, counter of submit, counter of result)}: triton for B = 1 and 8,
    torch for B = 8, on the first B of 8 toy images (96 x 160, mixed test and output sizes)."""
    import torch

    model = planted_model()
    model.cfg.fcos.pre_nms_topk = 100
    with torch.no_grad():
        model.head.box_reg.bias.fill_(0.5)          # boxes a quarter as wide: more survive NMS
    predictor = Predictor(model)
    images = toy_batch(b=8, h=96, w=160)["images"]
    out = {}
    for backend, b in (("triton", 1), ("triton", 1), ("triton", 8), ("torch", 8)):   # 1st: warm-up
        model.kernel_backend = backend
        for m in model.modules():   # one network for both: the post-processing's twins are exact,
            if isinstance(m, GroupNorm2d):      # the GroupNorm kernel's sums differ in rounding
                m.backend = "torch"
        with OpCounter() as queued:
            pending = predictor.submit(images[:b], TEST_SIZES[:b], OUT_SIZES[:b])
        with OpCounter() as waited:
            results = pending.result()
        out[backend, b] = results, queued, waited
    return out


@pytest.mark.parametrize("b", [1, 8])
def test_a_batch_makes_at_most_two_host_syncs(runs, b):
    results, queued, waited = runs["triton", b]
    assert queued.num_syncs + waited.num_syncs <= 2, queued.report() + "\n" + waited.report()
    assert queued.num_syncs == 0, queued.report()          # submit queues, result waits
    instances = [sum(s["category_id"] in (1, 3) for s in r["segments_info"]) for r in results]
    assert len(results) == b and min(instances) >= 20


def test_eight_images_issue_at_most_one_and_a_half_times_the_operations_of_one(runs):
    one, eight = ((q.num_ops + w.num_ops) for _, q, w in (runs["triton", 1], runs["triton", 8]))
    assert eight <= 1.5 * one, (one, eight)


def test_the_twins_give_the_same_outputs(runs):
    triton, torch_ = runs["triton", 8][0], runs["torch", 8][0]
    for a, b, size in zip(triton, torch_, OUT_SIZES):
        assert a["panoptic"].shape == size and a["panoptic"].dtype == np.int32
        assert np.array_equal(a["panoptic"], b["panoptic"])
        assert a["segments_info"] == b["segments_info"] and a["quality"] == b["quality"]
        for s in a["segments_info"]:
            assert s["area"] == int((a["panoptic"] == s["id"]).sum()) > 0


def test_a_copy_from_pageable_memory_to_a_device_is_a_sync():
    """The host waits for the queued kernels before such a copy: counted on any device but the
    CPU (the meta device here); from page-locked memory (CUDA only) it is queued like a kernel."""
    import torch

    with OpCounter() as c:
        torch.ones(3).to("meta", non_blocking=True)
        torch.empty(3, device="meta").copy_(torch.ones(3))
        torch.ones(3).to("cpu", non_blocking=True).clone()
    assert c.num_syncs == 2 and {what for what, _ in c.syncs} == {"copy from pageable host memory"}
    if torch.cuda.is_available():
        with OpCounter() as c:
            torch.ones(3, pin_memory=True).to("cuda", non_blocking=True)
        assert c.num_syncs == 0, c.report()


def test_the_predictors_batch_is_page_locked_on_cuda_only():
    """``Predictor.collate`` pads the test-size images as ``Transform.batch`` does, into
    page-locked memory when the model is on CUDA, so that the labeling actor's next batch is
    copied behind the one in flight."""
    import torch

    from ciae.data.transform import Transform

    images = [np.random.default_rng(k).integers(0, 256, (3, 40 + k, 56), dtype=np.uint8) for k in range(3)]
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        predictor = Predictor(planted_model().to(device))
        batch, sizes = predictor.collate(images)
        expected, expected_sizes = Transform.batch(images)
        assert sizes == expected_sizes and torch.equal(batch, expected) and batch.device.type == "cpu"
        assert batch.is_pinned() == (device == "cuda")
        if device == "cuda":
            with OpCounter() as c:
                predictor.submit(batch, sizes, sizes)
            assert c.num_syncs == 0, c.report()
