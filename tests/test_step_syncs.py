"""A training step at the GPU's pace: at most one host sync per step (the loss values' copy to the
host, read once the step is queued), counted on the CPU with ``ciae.utils.opcount.OpCounter``, with
the PyTorch twins and with the Triton kernels (interpreted here, the path a GPU runs); and the
FCOS losses without boolean masks equal the masked formulation's (kept below as the reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_device_discipline import tiny_config, toy_batch

from ciae.engine.train import Trainer
from ciae.modeling.box_ops import giou_loss, iou_loss, sigmoid_focal_loss
from ciae.modeling.fcos import compute_locations, fcos_losses, fcos_normalisers, fcos_targets
from ciae.modeling.model import CIAEModel
from ciae.utils.opcount import OpCounter
from kernels import dispatch

STEP_CASES = [("torch", (1, 128, 192)),    # batch 1: P7 must not be 1x1 under GroupNorm
              ("triton", (2, 64, 96))]     # interpreted: small images keep it fast


@pytest.mark.parametrize("backend,shape", STEP_CASES, ids=[b for b, _ in STEP_CASES])
def test_a_training_step_makes_at_most_one_host_sync(backend, shape):
    if backend not in dispatch.BACKENDS:
        pytest.skip(f"no {backend} backend here")
    torch.manual_seed(0)
    model = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3])
    model.kernel_backend = backend
    trainer = Trainer(model)
    b, h, w = shape
    for seed in range(2):                   # the first step (caches, optimiser state) and a later one
        batch = toy_batch(b, h, w, seed=seed)
        with OpCounter() as c:
            stats = trainer.train_step(batch)
        assert c.num_syncs <= 1, c.report()
        # a Python scalar written to one element (``t[0] = x``; ``t[:1] = x`` or ``t[0].fill_(x)``
        # are fills) copies a host scalar: on CUDA a blocking copy that ``syncs`` does not list
        assert c.ops["lift_fresh"] == 0, "a host scalar copied into a device tensor (t[i] = x?)"
        assert all(math.isfinite(stats[k]) for k in ("loss", "loss_box", "loss_cae"))
    assert trainer.step == 2


# ---- the boolean-mask formulation the losses had, as the reference ----------------------------

def masked_normalisers(targets):
    pos = targets["labels"] >= 0
    return torch.stack([pos.sum().float(), targets["centerness"][pos].float().sum()])


def masked_fcos_losses(cls, ctr, reg, targets, cfg, normalisers):
    """cls [B, L, C], ctr [B, L], reg [B, L, 4] (float32, flattened levels)."""
    labels = targets["labels"]
    pos = labels >= 0
    num_pos = normalisers[0].clamp_min(1)
    onehot = torch.zeros_like(cls)
    onehot[pos] = F.one_hot(labels[pos], cls.shape[-1]).float()
    loss_cls = sigmoid_focal_loss(cls, onehot, cfg.focal_alpha, cfg.focal_gamma, "sum") / num_pos
    ctr_t = targets["centerness"][pos].float()
    box_fn = giou_loss if cfg.box_loss == "giou" else iou_loss
    box = box_fn(reg[pos], targets["reg"][pos].float())
    loss_box = (box * ctr_t).sum() / normalisers[1].clamp_min(torch.finfo(ctr_t.dtype).eps)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos
    return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}


def head_and_targets(batch, seed, box_loss):
    """Random head outputs for the batch's level layout, and the batch's FCOS targets."""
    cfg = tiny_config().fcos
    cfg.box_loss = box_loss
    h, w = batch["seg"].shape[-2:]
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in cfg.strides]
    locations = compute_locations(sizes, cfg.strides)
    targets = fcos_targets(locations, cfg.strides, cfg.size_ranges, batch["seg"], batch["boxes"],
                           batch["classes"], 2, cfg.center_sample_radius)
    g = torch.Generator().manual_seed(seed)
    b = batch["seg"].shape[0]
    head = {"cls_logits": [torch.randn(b, 2, *hw, generator=g) - 2 for hw in sizes],
            "centerness": [torch.randn(b, 1, *hw, generator=g) for hw in sizes],
            "box_reg": [torch.rand(b, 4, *hw, generator=g) * 4 * s for hw, s in zip(sizes, cfg.strides)]}
    for maps in head.values():
        for m in maps:
            m.requires_grad_()
    return head, locations, targets, cfg


def flat(maps):
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def without_instances(batch, images):
    batch = {**batch, "seg": batch["seg"].clone(), "boxes": list(batch["boxes"]),
             "classes": list(batch["classes"])}
    for i in images:
        batch["seg"][i][batch["seg"][i] >= 2] = 0
        batch["boxes"][i] = torch.zeros(0, 4)
        batch["classes"][i] = torch.zeros(0, dtype=torch.int64)
    return batch


BATCHES = {"positives": lambda: toy_batch(2, 128, 192, seed=3),
           "one image without instances": lambda: without_instances(toy_batch(2, 128, 192, seed=4), [1]),
           "no instance at all": lambda: without_instances(toy_batch(2, 64, 96, seed=5), [0, 1])}


@pytest.mark.parametrize("box_loss", ["iou", "giou"])
@pytest.mark.parametrize("case", list(BATCHES))
def test_fcos_losses_and_gradients_equal_the_masked_formulation(case, box_loss):
    batch = BATCHES[case]()
    head, locations, targets, cfg = head_and_targets(batch, 0, box_loss)
    pos = targets["labels"] >= 0
    assert bool(pos.any()) == (case != "no instance at all")

    norm = fcos_normalisers(targets)
    ref_norm = masked_normalisers(targets)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)

    # the same normalisers on both sides: losses equal up to the order of the sums, gradients
    # (elementwise, scaled by the same normalisers) equal
    got = fcos_losses(head, locations, targets, cfg, normalisers=ref_norm)
    grads = torch.autograd.grad(sum(got.values()), [m for v in head.values() for m in v])
    ref = masked_fcos_losses(flat(head["cls_logits"]), flat(head["centerness"])[..., 0],
                             flat(head["box_reg"]), targets, cfg, ref_norm)
    ref_grads = torch.autograd.grad(sum(ref.values()), [m for v in head.values() for m in v])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
    if case == "no instance at all":
        assert got["loss_box"] == 0 and got["loss_ctr"] == 0

    # and with its own normalisers (the default)
    own = fcos_losses(head, locations, targets, cfg)
    for k in ref:
        torch.testing.assert_close(own[k], ref[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("box_loss", ["iou", "giou"])
def test_background_boxes_cannot_make_the_loss_or_its_gradient_non_finite(box_loss):
    """Every location's box loss is computed: a background prediction that the IoU cannot take
    (inf, nan) must neither reach the loss nor put a nan into the gradient."""
    batch = without_instances(toy_batch(2, 64, 96, seed=6), [1])
    head, locations, targets, cfg = head_and_targets(batch, 1, box_loss)
    background = (targets["labels"] < 0)
    sizes = [m.shape[-2:] for m in head["box_reg"]]
    bad = []
    start = 0
    for m, (h, w) in zip(head["box_reg"], sizes):
        bg = background[:, start:start + h * w].view(-1, 1, h, w)
        start += h * w
        junk = torch.full_like(m, float("inf"))
        junk[:, 1] = float("nan")
        bad.append(torch.where(bg, junk, m.detach()).requires_grad_())
    head = {**head, "box_reg": bad}
    ref_norm = masked_normalisers(targets)
    got = fcos_losses(head, locations, targets, cfg, normalisers=ref_norm)
    ref = masked_fcos_losses(flat(head["cls_logits"]), flat(head["centerness"])[..., 0],
                             flat(bad), targets, cfg, ref_norm)
    torch.testing.assert_close(got["loss_box"], ref["loss_box"], rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad(got["loss_box"], bad)
    ref_grads = torch.autograd.grad(ref["loss_box"], bad)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


def test_a_non_finite_loss_still_names_step_term_and_lr():
    torch.manual_seed(0)
    trainer = Trainer(CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3]))
    trainer.step = 3
    batch = toy_batch(2, 64, 96)
    batch["images"] = batch["images"].float() * float("nan")
    with OpCounter() as c, pytest.raises(FloatingPointError,
                                         match=r"non-finite loss at step 3: loss_\w+ = nan \(lr "):
        trainer.train_step(batch)
    assert c.num_syncs <= 1, c.report()
    assert trainer.step == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_nan_in_the_embedding_branch_stops_training_on_either_path(backend):
    """A NaN weight in the embedding branch (only there: the detector's losses stay finite) stops
    the step with the non-finite loss error on the kernels' path as on the twins': the GroupNorm
    kernel's ReLU and the loss kernel's hinge keep NaN as PyTorch's (they dropped it: the step
    went on, finite, with a dead branch)."""
    if backend not in dispatch.BACKENDS:
        pytest.skip(f"no {backend} backend here")
    torch.manual_seed(0)
    model = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3])
    model.kernel_backend = backend
    name, weight = next((n, p) for n, p in model.named_parameters()
                        if n.startswith("embedding.") and p.dim() == 4)
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0: loss_(cae|iae|ciae) = nan"):
        Trainer(model).train_step(toy_batch(2, 64, 96))


def test_traffic_counts_the_kernels_launches_and_not_the_interpreters_ops():
    """``benchmarks/train/traffic.py --backend triton`` on a step of the paper's config (frozen
    BatchNorm): every Triton launch counted once with its tensors' bytes, at a line of ours (not
    the launch wrapper's), none of the interpreter's own ATen ops, so it dispatches exactly the
    ops and launches ``OpCounter`` sees in the same step; no allocation counted as traffic."""
    pytest.importorskip("triton")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "train"))
    import traffic

    from benchmarks.syncs.run import batch_of
    from ciae.config import PRESETS

    torch.manual_seed(0)
    model = CIAEModel(PRESETS["paper"]().merged({"backbone": {"width": 8}, "fpn": {"channels": 32}}),
                      stuff_ids=[184, 187], thing_ids=[1, 3])
    model.kernel_backend = "triton"
    trainer = Trainer(model)
    batch = batch_of(2, 64, 96)
    trainer.train_step(batch)
    counted = traffic.Traffic()
    with counted:
        trainer.train_step(batch)
    with OpCounter() as c:
        trainer.train_step(batch)
    assert counted.ops == c.num_ops
    launches = {k: v for k, v in counted.by_op.items() if k.startswith("triton:")}
    assert set(launches) == {k for k in c.ops if k.startswith("triton:")} and all(launches.values())
    assert launches["triton:_forward_kernel"] and launches["triton:_backward_kernel"]
    assert not any("opcount" in site for site in counted.by_site)
    assert "empty_like" not in counted.by_op and counted.by_op["convolution"] > 0
