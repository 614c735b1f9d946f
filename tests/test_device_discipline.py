"""The GPU path, proven on the CPU: device discipline and bfloat16 numerics.

Device discipline: under ``torch.set_default_device("meta")`` with CPU inputs, a factory call
that forgets ``device=`` makes a meta tensor, and mixing it with the CPU inputs fails as a host
tensor mixed with CUDA tensors fails on a GPU. Models and inputs are made before the default
changes; only the call under test runs under it.

bfloat16 numerics: CPU autocast applies CUDA's dtype rules to the operations used here (matrix
products in bfloat16), so what autocast would round on a GPU is rounded here too.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ciae.config import Config, InferenceConfig
from ciae.modeling.model import CIAEModel
from kernels import dispatch

BACKENDS = ("torch", "triton")


@contextlib.contextmanager
def meta_default():
    """Factory calls without ``device=`` make meta tensors inside."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_config() -> Config:
    return Config.small().merged({"backbone": {"width": 8}, "fpn": {"channels": 32},
                                  "embedding": {"dim": 8, "branch_channels": 16}})


def toy_batch(b=2, h=64, w=96, seed=0) -> dict:
    """Two stuff classes and two instances per image (``pipeline.feed.targets.collate``'s layout)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(b, h, w, dtype=torch.int64)
    seg[:, h // 2:] = 1
    boxes = []
    for i in range(b):
        seg[i, 8:30, 10:40] = 2
        seg[i, 20:50, 30:70] = 3                               # overlaps instance 0
        boxes.append(torch.tensor([[10.0, 8, 40, 20], [30.0, 20, 70, 50]]))
    sem = torch.where(seg >= 2, torch.full_like(seg, 2), seg)
    images = torch.randint(0, 255, (b, 3, h, w), dtype=torch.uint8, generator=g)
    return {"images": images, "sem": sem, "seg": seg, "boxes": boxes,
            "classes": [torch.tensor([0, 1])] * b, "image_sizes": [(h, w)] * b,
            "image_ids": list(range(b))}


def planted_model() -> CIAEModel:
    """An untrained tiny model whose head detects everywhere: every location scores ~1, each
    box 4 strides wide, so many overlapping detections pass every threshold."""
    torch.manual_seed(0)
    model = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3]).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(10.0)
        model.head.centerness.bias.fill_(10.0)
        model.head.box_reg.bias.fill_(2.0)
    return model


# ---- device discipline ----------------------------------------------------------------------

def test_predict_with_overlapping_detections_keeps_to_the_inputs_device():
    model = planted_model()
    batch = toy_batch()
    with meta_default():
        preds = model.predict(batch["images"], batch["image_sizes"], out_sizes=[(60, 90), (64, 96)])
    for pred, size in zip(preds, [(60, 90), (64, 96)]):
        ids = pred["panoptic"]
        assert ids.device.type == "cpu" and tuple(ids.shape) == size
        things = [s for s in pred["segments_info"] if s["category_id"] in (1, 3)]
        assert len(things) >= 2                                # several detections became instances
        for s in pred["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum())


def test_predictor_and_assemble_keep_to_the_inputs_device():
    from ciae.engine.predictor import Predictor
    from ciae.modeling.inference import assemble, select_instances

    predictor = Predictor(planted_model(), batch_size=2)
    images = [np.random.default_rng(k).integers(0, 255, (50 + 7 * k, 70, 3), dtype=np.uint8)
              for k in range(2)]
    resized = [predictor.transform.resize_for_test(im) for im in images]
    g = torch.Generator().manual_seed(0)
    emb4 = torch.randn(8, 12, 16, generator=g)
    stuff = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    queries = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    queries[1] = queries[0]                                    # a duplicate of query 0
    boxes = torch.tensor([[0.0, 0, 30, 30], [5, 5, 35, 35], [20, 10, 60, 40]])
    scores, classes = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 1])
    valid = torch.ones(1, 3, dtype=torch.bool)
    with meta_default():
        out = predictor.predict_resized(resized, [im.shape[:2] for im in images])
        keep = select_instances(queries[None], boxes[None], scores[None], valid, InferenceConfig())
        (ids,), table = assemble(emb4[None], [(45, 60)], stuff, queries[None], boxes[None],
                                 classes[None], scores[None], keep, InferenceConfig(stuff_area=0))
    assert [r["panoptic"].shape for r in out] == [im.shape[:2] for im in images]
    assert keep.tolist() == [[True, False, True]]
    assert ids.device.type == "cpu" and table.device.type == "cpu" and tuple(ids.shape) == (45, 60)


def test_predictor_batches_like_shapes_together_and_answers_in_order():
    """Images of both orientations, two per batch: the portrait ones go together, the landscape
    ones together, and each result is its own image's (as ``predict_resized`` of that batch)."""
    from ciae.engine.predictor import Predictor

    predictor = Predictor(planted_model(), batch_size=2)
    images = [np.random.default_rng(k).integers(0, 255, size, dtype=np.uint8)
              for k, size in enumerate([(60, 90, 3), (90, 60, 3), (64, 96, 3), (96, 66, 3)])]
    out = predictor(images)
    want = {}
    for group in ([1, 3], [0, 2]):
        preds = predictor.predict_resized([predictor.transform.resize_for_test(images[k]) for k in group],
                                          [images[k].shape[:2] for k in group])
        want.update(zip(group, preds))
    for k, im in enumerate(images):
        assert out[k]["panoptic"].shape == im.shape[:2] and np.array_equal(out[k]["panoptic"], want[k]["panoptic"])
        assert out[k]["segments_info"] == want[k]["segments_info"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_backends_forward_and_backward_keep_to_the_inputs_device(backend):
    from kernel_cases import make_case

    emb, queries, boxes, target, weight = make_case(0, d=8, h=6, w=16, q=5, dtype=torch.float32)
    emb.requires_grad_()
    queries.requires_grad_()
    labels = target[None].clamp_min(-1)
    with meta_default():
        loss, n = dispatch.embedding_loss(emb, queries, boxes, target, weight, 0.15, 3,
                                          chunk=32, backend=backend)
        loss.backward()
        sums, counts = dispatch.segment_sums(emb[None], labels, 5, backend=backend)
        sums.sum().backward()
    assert emb.grad.device.type == "cpu" and queries.grad.device.type == "cpu"
    assert torch.isfinite(emb.grad).all() and n.item() == (target >= 0).sum()
    assert sums.device.type == "cpu" and counts.sum() == (target >= 0).sum()


def test_two_training_steps_keep_to_the_inputs_device():
    from ciae.engine.train import Trainer

    torch.manual_seed(0)
    trainer = Trainer(CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3]))
    losses, batches = [], [toy_batch(seed=0), toy_batch(seed=1)]
    with meta_default():
        trainer.fit(batches, 2,
                    on_step=lambda step, stats: losses.append(stats["loss"]))
    assert trainer.step == 2 and all(np.isfinite(losses))


# ---- bfloat16 numerics ----------------------------------------------------------------------

def test_sample_at_keeps_full_precision_coordinates_under_bf16():
    from ciae.modeling.embedding import sample_at

    g = torch.Generator().manual_seed(0)
    emb4 = torch.randn(8, 200, 334, generator=g).bfloat16()      # a 800x1336 input at stride 4
    xy = torch.stack([torch.randint(1024, 1336, (64,), generator=g),
                      torch.randint(0, 800, (64,), generator=g)], 1)
    ref = sample_at(emb4.float()[None], xy[None])
    with bf16_autocast():
        out = sample_at(emb4[None], xy[None])
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_loss_filter_boxes_are_not_rounded_under_bf16(monkeypatch):
    from ciae.modeling.loss import ciae_loss

    seen = []
    twin = dispatch.embedding_loss

    def spy(emb, queries, boxes, *args, **kw):
        seen.append(boxes.clone())
        return twin(emb, queries, boxes, *args, **kw)

    monkeypatch.setattr(dispatch, "embedding_loss", spy)
    h, w = 40, 1336
    seg = torch.zeros(1, h, w, dtype=torch.int64)
    seg[0, 10:20, 1201:1207] = 2
    sem = torch.where(seg >= 2, torch.full_like(seg, 2), seg)
    boxes = [torch.tensor([[1201.0, 10.0, 1207.0, 20.0]])]
    memory = F.normalize(torch.randn(3, 8), dim=1)
    emb = torch.randn(1, 8, h, w)
    cfg = tiny_config().embedding
    ciae_loss(emb, sem, seg, boxes, memory, 2, cfg, backend="torch")
    ref = [b for b in seen]
    seen.clear()
    with bf16_autocast():
        ciae_loss(emb.bfloat16(), sem, seg, boxes, memory, 2, cfg, backend="torch")
    assert len(seen) == len(ref) == 2
    for out, want in zip(seen, ref):
        assert out.dtype == torch.float32 and torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 48])
def test_loss_under_bf16_autocast_agrees_with_fp32(backend, chunk):
    """One chunk (the forward's buffers kept) and several (recomputed in the backward): the
    forward and the backward both run in float32 whatever the caller's autocast, so a float32
    embedding gives exactly the float32 loss and gradients, and a bfloat16 one agrees within
    bfloat16's precision."""
    from kernel_cases import make_case

    emb, queries, boxes, target, weight = make_case(1, d=16, h=8, w=24, q=6, dtype=torch.float32)

    def run(autocast: bool):
        e, q = emb.clone().requires_grad_(), queries.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = dispatch.embedding_loss(e, q, boxes, target, weight, 0.15, 3, chunk=chunk,
                                              backend=backend)
        loss.backward()
        return loss.detach(), e.grad, q.grad

    ref = run(False)
    for out, want in zip(run(True), ref):
        assert torch.equal(out, want)
    # a bfloat16 embedding under autocast, as the model's convolutions make it
    e = emb.bfloat16().requires_grad_()
    with bf16_autocast():
        loss, _ = dispatch.embedding_loss(e, queries, boxes, target, weight, 0.15, 3, chunk=chunk,
                                          backend=backend)
    loss.backward()
    assert e.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=2e-2, atol=1e-3)
    assert F.cosine_similarity(e.grad.float().flatten(), ref[1].flatten(), dim=0) > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_assignment_under_bf16_autocast_equals_fp32(backend):
    from kernel_cases import make_case

    emb, queries, boxes, _, _ = make_case(2, d=16, h=8, w=24, q=6, dtype=torch.float32)
    ref = dispatch.assign_upsampled(emb, (32, 96), queries, boxes, backend=backend)
    with bf16_autocast():
        out = dispatch.assign_upsampled(emb, (32, 96), queries, boxes, backend=backend)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


# ---- device discipline of the labeling actor and of fine-tuning's weight surgery --------------

def test_labeling_actors_batch_function_keeps_to_the_inputs_device(registered_untrained):
    """``pipeline.label.stages.Labeler.__call__`` on a decoded batch (one rejected row), with the
    registered model's checkpoint (its bytes, as the actors get them) and its head planted to
    detect everywhere."""
    from ciae.data.transform import Transform
    from pipeline.data.synth import SynthSpec, render, select_categories
    from pipeline.label.stages import Labeler

    with open(registered_untrained["checkpoint"], "rb") as f:
        labeler = Labeler(f.read(), "model.pt", threads=1, amp=True, compile=False)
    head = labeler.predictor.model.head
    with torch.no_grad():
        head.cls_logits.bias.fill_(10.0)
        head.centerness.bias.fill_(10.0)
        head.box_reg.bias.fill_(2.0)
    transform = Transform(labeler.predictor.model.cfg.input)
    images = [render(select_categories(), i, seed=3, spec=SynthSpec(height=h, width=w))[0]
              for i, (h, w) in enumerate([(70, 90), (96, 128)])]
    batch = {"key": np.array(["a", "bad", "b"]), "task": np.zeros(3, np.int64),
             "image": [transform.resize_for_test(images[0]), np.zeros((3, 0, 0), np.uint8),
                       transform.resize_for_test(images[1])],
             "height": np.array([70, 0, 96], np.int32), "width": np.array([90, 0, 128], np.int32),
             "status": np.array(["ok", "rejected", "ok"]), "reason": np.array(["", "not an image", ""])}
    with meta_default():
        out = labeler(batch)
    assert "image" not in out and list(out["key"]) == ["a", "bad", "b"]
    assert out["ids"][1].shape == (0, 0) and out["segments"][1] == []
    things = set(labeler.predictor.model.thing_ids)
    for k, (h, w) in ((0, (70, 90)), (2, (96, 128))):
        ids, segments = out["ids"][k], out["segments"][k]
        assert isinstance(ids, np.ndarray) and ids.shape == (h, w)
        assert sum(s["category_id"] in things for s in segments) >= 2   # detections became instances
        for s in segments:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
        assert 0 <= out["quality"][k] <= 1


def test_fine_tunings_weight_surgery_keeps_to_the_inputs_device():
    """``ciae.engine.finetune.transfer`` from a ciae checkpoint with other categories (rows carried by
    category) and from a torchvision ResNet."""
    from ciae.checkpoint import read_source
    from ciae.engine.finetune import transfer
    from ciae.engine.train import Trainer
    from ciae.modeling.backbone import ResNet

    torch.manual_seed(0)
    names = {184: "sky-other-merged", 187: "grass-merged", 190: "road", 1: "person", 3: "car", 5: "airplane"}
    source = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3], category_names=names)
    checkpoint = read_source(Trainer(source).checkpoint(), "source.pt")
    model = CIAEModel(tiny_config(), stuff_ids=[184, 190], thing_ids=[1, 5], category_names=names)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with meta_default():
        report = transfer(model, checkpoint)
    state, src = model.state_dict(), checkpoint.state
    assert all(v.device.type == "cpu" for v in state.values())
    assert report["shared_categories"] == [1, 184]
    for key in ("head.cls_logits.weight", "head.cls_logits.bias"):     # things: 1 shared, 5 new
        assert torch.equal(state[key][0], src[key][0]) and torch.equal(state[key][1], fresh[key][1])
    memory = state["memory.memory"]                                    # stuff 184, 190, merged things
    assert torch.equal(memory[0], src["memory.memory"][0]) and torch.equal(memory[1], fresh["memory.memory"][1])
    assert torch.equal(memory[2], src["memory.memory"][2])
    assert torch.equal(state["backbone.conv1.weight"], src["backbone.conv1.weight"])

    bn = CIAEModel(tiny_config().merged({"backbone": {"norm": "bn"}}), stuff_ids=[184], thing_ids=[1])
    resnet = ResNet(18, width=8, norm="bn").state_dict()
    with meta_default():
        report = transfer(bn, read_source(resnet, "resnet18.pth"))
    assert report["kind"] == "torchvision"
    for k, v in bn.backbone.state_dict().items():
        assert v.device.type == "cpu" and (k.endswith("num_batches_tracked") or torch.equal(v, resnet[k])), k
