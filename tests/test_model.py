"""The assembled model: head shapes, losses, inference output, training loop and checkpoints."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ciae import checkpoint
from ciae.config import Config
from ciae.engine.train import Trainer, lr_at, scale_schedule, to_device
from ciae.modeling.model import CIAEModel


def tiny_config(**embedding) -> Config:
    cfg = Config.small()
    return cfg.merged({"backbone": {"width": 8}, "fpn": {"channels": 32},
                       "embedding": {"dim": 8, "branch_channels": 16, **embedding}})


def toy_batch(b=2, h=64, w=96, c_st=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, c_st, (b, 1, 1)).expand(b, h, w).clone()
    seg[:, h // 2:] = (seg[:, h // 2:] + 1) % c_st
    boxes, classes = [], []
    for i in range(b):
        bx = []
        for j in range(2):
            y0, x0 = int(torch.randint(0, h - 24, (1,), generator=g)), int(torch.randint(0, w - 24, (1,), generator=g))
            seg[i, y0:y0 + 20, x0:x0 + 20] = c_st + j
            bx.append([x0, y0, x0 + 20, y0 + 20])
        boxes.append(torch.tensor(bx, dtype=torch.float32))
        classes.append(torch.tensor([0, 1]))
    # boxes of occluded instances must stay tight: recompute from the masks
    for i in range(b):
        for j in range(2):
            ys, xs = torch.nonzero(seg[i] == c_st + j, as_tuple=True)
            boxes[i][j] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    sem = torch.where(seg >= c_st, torch.full_like(seg, c_st), seg)
    images = torch.randint(0, 255, (b, 3, h, w), dtype=torch.uint8, generator=g)
    return {"images": images, "sem": sem, "seg": seg, "boxes": boxes, "classes": classes,
            "image_sizes": [(h, w)] * b, "image_ids": list(range(b))}


@pytest.fixture(scope="module")
def model() -> CIAEModel:
    torch.manual_seed(0)
    return CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3])


def test_head_and_branch_shapes(model):
    batch = toy_batch()
    head, locations, emb4 = model._forward_features(batch["images"])
    strides = model.cfg.fcos.strides
    for level, s in enumerate(strides):
        h, w = -(-64 // s), -(-96 // s)
        assert head["cls_logits"][level].shape == (2, 2, h, w)
        assert head["centerness"][level].shape == (2, 1, h, w)
        assert head["box_reg"][level].shape == (2, 4, h, w)
        assert head["box_embed"][level].shape == (2, 8, h, w)
        assert locations[level].shape == (h * w, 2)
    assert emb4.shape == (2, 8, 16, 24)
    assert model.memory().shape == (3, 8)  # 2 stuff + the merged thing class


@pytest.mark.parametrize("thing_mode,n_memory", [("merged", 3), ("specific", 4), ("none", 2)])
def test_losses_finite_and_reach_every_trained_parameter(thing_mode, n_memory):
    torch.manual_seed(0)
    m = CIAEModel(tiny_config(thing_mode=thing_mode), [184, 187], [1, 3])
    assert m.memory().shape[0] == n_memory
    batch = toy_batch()
    if thing_mode == "specific":
        batch["sem"] = torch.where(batch["seg"] >= 2, batch["seg"], batch["sem"]).clamp_max(3)
    if thing_mode == "none":
        batch["sem"] = torch.where(batch["seg"] >= 2, torch.full_like(batch["sem"], 255), batch["sem"])
    before = m.memory().clone()
    out = m(batch)
    assert torch.equal(m.memory(), before)                  # no memory_step: no update
    for k in ("loss_cls", "loss_box", "loss_ctr", "loss_cae", "loss_iae", "loss"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    m(batch, memory_step=(0, 10))
    moved = (m.memory() - before).norm(dim=1) > 0
    assert moved.any() and moved.sum() <= n_memory


def test_the_loss_takes_the_memory_updated_by_its_own_batch():
    """Eq. 13-14 then Eq. 12: a training step first moves the memory to M_t with this batch's
    category means, then computes L_CAE against M_t (not M_{t-1})."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.embedding.memory_momentum = 1.0     # lambda_0 = 0: M_1 is the batch's means
    cfg.solver = dataclasses.replace(cfg.solver, lr=0.0)   # the weights stay where they are
    trainer = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    batch = toy_batch()
    before = trainer.model.memory().clone()
    stats = trainer.train_step(batch)
    after = trainer.model.memory().clone()
    assert (after - before).abs().max() > 0.1
    with torch.no_grad():
        again = trainer.model(batch)                        # the same weights, memory M_1
    assert stats["loss_cae"] == pytest.approx(float(again["loss_cae"]), rel=1e-6)


def test_every_convolution_of_a_channels_last_step_takes_its_input_as_it_is():
    """cudnn runs a convolution in one layout: an NCHW input to channels-last weights is copied
    first (and its gradient back), a pass a CPU run does not show as time. Every convolution of
    a channels-last training step gets a channels-last input (CoordConv's concatenation
    included)."""
    torch.manual_seed(0)
    model = CIAEModel(tiny_config().merged({"backbone": {"width": 16}}), stuff_ids=[184, 187],
                      thing_ids=[1, 3])
    trainer = Trainer(model)
    assert trainer.model.cfg.solver.channels_last
    inputs = []

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.convolution:
                x = args[0]
                inputs.append((x.is_contiguous(memory_format=torch.channels_last), x.shape))
            return func(*args, **(kwargs or {}))

    with Convolutions():
        trainer.train_step(toy_batch())
    assert len(inputs) > 50
    assert not [shape for channels_last, shape in inputs if not channels_last]


def test_predict_returns_consistent_coco_panoptic(model):
    batch = toy_batch()
    model.cfg.fcos.score_thresh = 0.0  # an untrained head: keep every candidate
    try:
        preds = model.predict(batch["images"], [(60, 90), (64, 96)], return_embeddings=True)
    finally:
        model.cfg.fcos.score_thresh = 0.05
    for pred, (h, w) in zip(preds, [(60, 90), (64, 96)]):
        ids, segs = pred["panoptic"], pred["segments_info"]
        assert ids.shape == (h, w)
        assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(s["id"] for s in segs)
        assert segs
        for s in segs:
            assert s["category_id"] in (184, 187, 1, 3) and s["area"] == int((ids == s["id"]).sum())
        assert pred["embedding"].shape[0] == 8
    oracle = model.predict(batch["images"], batch["image_sizes"], oracle=batch)
    cats = sorted(s["category_id"] for s in oracle[0]["segments_info"])
    assert cats.count(1) <= 1 and cats.count(3) <= 1


def test_schedule_scaled_to_the_run():
    s = scale_schedule(Config().solver, 900)
    assert s.steps == (600, 800) and s.iterations == 900 and s.warmup_iters == 90
    assert lr_at(0, s) == pytest.approx(0.01 * 1e-3)
    assert lr_at(90, s) == pytest.approx(0.01)
    assert lr_at(600, s) == pytest.approx(0.001)
    assert lr_at(899, s) == pytest.approx(0.0001)


def test_checkpoint_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.solver = scale_schedule(cfg.solver, 4)
    batches = [toy_batch(seed=s) for s in range(4)]

    straight = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    init = {k: v.clone() for k, v in straight.model.state_dict().items()}
    for b in batches:
        straight.train_step(b)

    first = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    first.model.load_state_dict(init)
    for b in batches[:2]:
        first.train_step(b)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(checkpoint.to_bytes(first.checkpoint()))
    resumed = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    resumed.restore(checkpoint.load(str(path), "ckpt.pt"))
    assert resumed.step == 2
    assert torch.equal(resumed.model.memory.memory, first.model.memory.memory)
    for b in batches[2:]:
        resumed.train_step(b)
    for k, v in straight.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k
    assert not torch.equal(init["memory.memory"], straight.model.memory.memory)  # the memory moved

    rebuilt = CIAEModel.from_checkpoint(checkpoint.load(path.read_bytes(), "ckpt.pt"))
    assert rebuilt.stuff_ids == [184, 187] and rebuilt.cfg == first.model.cfg and not rebuilt.training
    with pytest.raises(ValueError, match="not a ciae checkpoint: it lacks config, thing_ids"):
        CIAEModel.from_checkpoint({"model": {}, "stuff_ids": []})
    with pytest.raises(ValueError, match="without optimizer, step"):
        resumed.restore({k: v for k, v in checkpoint.make(rebuilt).items() if k != "step"})


def test_fit_calls_on_checkpoint_at_every_checkpoint_step_and_the_last():
    cfg = tiny_config()
    cfg.solver = dataclasses.replace(scale_schedule(cfg.solver, 5), checkpoint_every=2)
    trainer = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    steps = []
    trainer.fit([toy_batch(seed=s) for s in range(5)], 5, on_checkpoint=steps.append)
    assert steps == [2, 4, 5]


def test_fit_reports_a_stream_that_runs_out(tmp_path):
    cfg = tiny_config()
    trainer = Trainer(CIAEModel(cfg, [184, 187], [1, 3]))
    with pytest.raises(ValueError, match="the batches ran out at step 1, before step 3"):
        trainer.fit([toy_batch()], 3)


def test_non_finite_loss_names_step_and_term(model):
    trainer = Trainer(model)
    trainer.step = 7
    batch = toy_batch()
    batch["images"] = batch["images"].float() * float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7: loss_\w+ = nan"):
        trainer.train_step(batch)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_never_execute_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="evil.pt: not a loadable checkpoint or state dict"):
        checkpoint.load(str(path), "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: not a loadable checkpoint"):
        checkpoint.load(path.read_bytes(), "evil.pt")
    with pytest.raises(FileNotFoundError, match="gone.pt: no such file"):
        checkpoint.load(str(tmp_path / "gone.pt"), "gone.pt")


def test_to_device_moves_lists():
    """Every tensor, alone or in a list, goes to the device (meta: a device other than the
    CPU that every machine has); other values stay as they are."""
    batch = toy_batch()
    moved = to_device(batch, torch.device("meta"))
    assert moved.keys() == batch.keys()
    for key, value in batch.items():
        got = moved[key]
        if torch.is_tensor(value):
            assert got.device.type == "meta" and got.shape == value.shape and got.dtype == value.dtype, key
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            assert [(t.device.type, t.shape, t.dtype) for t in got] == \
                [("meta", t.shape, t.dtype) for t in value], key
        else:
            assert got == value, key
    assert moved["image_ids"] == [0, 1] and batch["images"].device.type == "cpu"


def test_prefetch_keeps_the_order_and_raises_the_producers_error():
    from ciae.engine.train import prefetch

    cpu = torch.device("cpu")
    batches = [{"images": torch.full((1,), k), "boxes": [torch.zeros(1, 4)], "image_ids": [k]}
               for k in range(7)]
    got = list(prefetch(iter(batches), cpu))
    assert [int(b["images"]) for b in got] == list(range(7)) and got[3]["image_ids"] == [3]
    assert list(prefetch(iter([]), cpu)) == []

    drawn = []

    def failing():
        for k in range(2):
            drawn.append(k)
            yield batches[k]
        raise ValueError("image 5 (x.jpg): truncated")

    it = prefetch(failing(), cpu)
    assert int(next(it)["images"]) == 0 and drawn == [0]     # drawn when asked for: no thread
    assert int(next(it)["images"]) == 1
    with pytest.raises(ValueError, match="image 5"):
        next(it)
