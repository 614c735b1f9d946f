"""The proposal head: box ops against loops and formulas, target assignment on hand-made masks and
against a per-location reference, head shapes, losses (with and without positives), detection."""

from __future__ import annotations

import math

import pytest
import torch

import kernels.nms
from ciae.config import FCOSConfig
from ciae.modeling.backbone import group_count
from ciae.modeling.box_ops import (batched_nms, box_iou, clip_boxes, expand_boxes, giou_loss, iou_loss,
                                   sigmoid_focal_loss)
from ciae.modeling.fcos import (FCOSHead, compute_locations, fcos_detect, fcos_losses, fcos_normalisers,
                                fcos_targets)

INF = float("inf")


def random_boxes(n: int, gen: torch.Generator, clusters: int = 8, size: float = 100.0) -> torch.Tensor:
    """[n, 4] float64 xyxy boxes jittered around a few cluster centres (lots of overlap)."""
    centres = torch.rand(clusters, 2, generator=gen, dtype=torch.float64) * size
    jitter = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 4
    c = centres[torch.randint(clusters, (n,), generator=gen)] + jitter
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30 + 1
    return torch.cat([c - wh / 2, c + wh / 2], dim=1)


def iou_py(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_py(boxes, scores, classes, thresh) -> list[int]:
    keep = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or iou_py(boxes[k], boxes[i]) <= thresh for k in keep):
            keep.append(i)
    return keep


# ---------------------------------------------------------------- box ops


def test_box_iou_matches_loop():
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(40, gen), random_boxes(30, gen)
    b[0] = torch.tensor([5.0, 5.0, 5.0, 9.0], dtype=torch.float64)  # degenerate: IoU 0
    got = box_iou(a, b)
    want = torch.tensor([[iou_py(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    assert got.shape == (40, 30)
    torch.testing.assert_close(got, want)
    assert (got[:, 0] == 0).all()
    torch.testing.assert_close(box_iou(a[:3], a[:3]).diagonal(), torch.ones(3, dtype=torch.float64))
    # a batch: each image's pairs
    batched = box_iou(torch.stack([a, a.flip(0)]), torch.stack([b, b]))
    assert torch.equal(batched, torch.stack([got, got.flip(0)]))


@pytest.mark.parametrize("block", [64, 1024])       # the twin's boxes resolved together
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_batched_nms_matches_bruteforce(thresh, block, monkeypatch):
    monkeypatch.setattr(kernels.nms, "BLOCK", block)
    gen = torch.Generator().manual_seed(int(thresh * 10))
    n = 700  # several NMS blocks
    boxes = random_boxes(n, gen)
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    classes = torch.randint(3, (n,), generator=gen)
    keep = batched_nms(boxes, scores, classes, thresh)
    assert keep.dtype == torch.int64
    assert keep.tolist() == nms_py(boxes.tolist(), scores.tolist(), classes.tolist(), thresh)
    assert (scores[keep].diff() <= 0).all()
    assert 0 < len(keep) < n


@pytest.mark.parametrize("block", [64, 1024])
def test_batched_nms_long_chain_and_edge_cases(block, monkeypatch):
    monkeypatch.setattr(kernels.nms, "BLOCK", block)
    # Each box overlaps only its neighbours (IoU 1/3): greedy keeps every other one, the worst
    # case for the in-block fixed point.
    n = 300
    x = torch.arange(n, dtype=torch.float32) * 5
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1, 0, n)
    classes = torch.zeros(n, dtype=torch.int64)
    assert batched_nms(boxes, scores, classes, 0.3).tolist() == list(range(0, n, 2))
    assert batched_nms(boxes, scores, classes, 0.4).tolist() == list(range(n))
    # the same boxes in other classes never suppress each other
    assert len(batched_nms(boxes, scores, torch.arange(n), 0.3)) == n
    assert batched_nms(boxes[:0], scores[:0], classes[:0], 0.5).tolist() == []


def test_batched_nms_on_thousands_of_boxes():
    gen = torch.Generator().manual_seed(3)
    n = 4000
    boxes = random_boxes(n, gen, clusters=60, size=800).float()
    scores = torch.rand(n, generator=gen)
    classes = torch.randint(20, (n,), generator=gen)
    keep = batched_nms(boxes, scores, classes, 0.6)
    for c in range(20):  # no two kept boxes of one class overlap above the threshold
        kept = boxes[keep[classes[keep] == c]]
        assert not (box_iou(kept, kept) > 0.6).triu(1).any()


def test_sigmoid_focal_loss_matches_formula():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 7, generator=gen, dtype=torch.float64) * 3
    targets = (torch.rand(50, 7, generator=gen) < 0.2).double()
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(logits)
    want = torch.where(targets == 1, -alpha * (1 - p) ** gamma * torch.log(p),
                       -(1 - alpha) * p ** gamma * torch.log(1 - p))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, "none"), want)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), want.sum())
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, "mean"), want.mean())
    # gamma 0, no alpha: plain BCE
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, -1, 0.0), bce)


def test_iou_and_giou_losses_on_known_pairs():
    pred = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1.5, 1.5, 0.5, 0.5], [3, 2, 1, 4]])
    target = torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2], [0.5, 0.5, 1.5, 1.5], [3, 2, 1, 4]])
    # IoU: 1; 4/16; A=[0,2]^2, B=[1,3]^2 about (1.5, 1.5): 1/7 with enclosing 9; 1
    iou = torch.tensor([1.0, 0.25, 1 / 7, 1.0])
    giou = torch.tensor([1.0, 0.25, 1 / 7 - 2 / 9, 1.0])
    torch.testing.assert_close(iou_loss(pred, target, eps=0), -torch.log(iou))
    torch.testing.assert_close(giou_loss(pred, target, eps=0), 1 - giou)
    # a collapsed prediction: finite loss (FCOS's smoothing)
    zero = torch.zeros(1, 4, requires_grad=True)
    loss = iou_loss(zero, torch.tensor([[2.0, 2, 2, 2]])) + giou_loss(zero, torch.tensor([[2.0, 2, 2, 2]]))
    assert torch.isfinite(loss).all()
    # against box_iou on the decoded boxes
    gen = torch.Generator().manual_seed(2)
    p, t = torch.rand(20, 4, generator=gen) * 10 + 0.1, torch.rand(20, 4, generator=gen) * 10 + 0.1
    xy = torch.rand(20, 2, generator=gen) * 50

    def decode(ltrb):
        return torch.cat([xy - ltrb[:, :2], xy + ltrb[:, 2:]], dim=1)

    torch.testing.assert_close(iou_loss(p, t, eps=0), -torch.log(box_iou(decode(p), decode(t)).diagonal()))


def test_expand_and_clip_boxes():
    boxes = torch.tensor([[10.0, 20, 30, 60], [0, 0, 4, 4]])
    torch.testing.assert_close(expand_boxes(boxes, 1.5), torch.tensor([[5.0, 10, 35, 70], [-1, -1, 5, 5]]))
    torch.testing.assert_close(expand_boxes(boxes, 1.5, (64, 32)), torch.tensor([[5.0, 10, 32, 64], [0, 0, 5, 5]]))
    torch.testing.assert_close(clip_boxes(torch.tensor([[-3.0, 2, 50, 90]]), (40, 30)),
                               torch.tensor([[0.0, 2, 30, 40]]))


# ---------------------------------------------------------------- head


@pytest.mark.parametrize("batch,strides", [(1, (8, 16, 32, 64, 128)), (2, (8, 16, 32)), (3, (16,))])
def test_head_output_shapes(batch, strides):
    cfg = FCOSConfig(strides=strides, size_ranges=((0, INF),) * len(strides), num_convs=2)
    head = FCOSHead(in_channels=48, num_classes=5, embed_dim=8, cfg=cfg)
    sizes = [(-(-96 // s), -(-128 // s)) for s in strides]
    out = head([torch.randn(batch, 48, h, w) for h, w in sizes])
    assert set(out) == {"cls_logits", "centerness", "box_reg", "box_embed"}
    for key, c in [("cls_logits", 5), ("centerness", 1), ("box_reg", 4), ("box_embed", 8)]:
        assert [tuple(t.shape) for t in out[key]] == [(batch, c, h, w) for h, w in sizes]
    assert all((r >= 0).all() for r in out["box_reg"])
    # without box embeddings (Table III's ablation) the head has no parameter the loss misses
    plain = FCOSHead(in_channels=48, num_classes=5, embed_dim=None, cfg=cfg)
    assert set(plain([torch.randn(batch, 48, h, w) for h, w in sizes])) == {"cls_logits", "centerness", "box_reg"}
    assert not any("box_embed" in name for name, _ in plain.named_parameters())
    prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((5,), prior))
    assert head.scales.shape == (len(strides),)
    norms = [m.num_groups for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and set(norms) == {group_count(48)} == {24}
    with pytest.raises(ValueError):
        head([torch.randn(batch, 48, 4, 4)] * (len(strides) + 1))


def test_compute_locations():
    locs = compute_locations([(2, 3), (1, 2)], (8, 16), "cpu")
    assert locs[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert locs[1].tolist() == [[8, 8], [24, 8]]


# ---------------------------------------------------------------- targets

NUM_STUFF = 2


def one_level(stride=8, size=64, rng=(0, INF)):
    return compute_locations([(size // stride, size // stride)], (stride,), "cpu"), (stride,), (rng,)


def at(x, y, stride=8, size=64):
    """Index of the location at pixel (x, y) in a single level."""
    return (y // stride) * (size // stride) + x // stride


def test_targets_mask_not_box_decides():
    # instance 0: box [8, 40) x [8, 40), mask only its left half; a stuff pixel band elsewhere
    seg = torch.full((1, 64, 64), 1, dtype=torch.int64)
    seg[0, 8:40, 8:24] = NUM_STUFF + 0
    boxes, classes = [torch.tensor([[8.0, 8, 40, 40]])], [torch.tensor([3])]
    locs, strides, ranges = one_level()
    t = fcos_targets(locs, strides, ranges, seg, boxes, classes, NUM_STUFF, center_sample_radius=0)
    assert t["labels"].shape == (1, 64) and t["reg"].shape == (1, 64, 4)
    pos = t["labels"][0] >= 0
    want = {at(x, y) for x in (12, 20) for y in (12, 20, 28, 36)}
    assert set(pos.nonzero()[:, 0].tolist()) == want
    assert t["labels"][0, at(28, 20)] == -1  # inside the box, outside the mask
    assert t["labels"][0, at(12, 20)] == 3 and t["instance"][0, at(12, 20)] == 0
    assert t["reg"][0, at(12, 20)].tolist() == [4, 12, 28, 20]
    want_ctr = math.sqrt(4 / 28 * 12 / 20)
    assert t["centerness"][0, at(12, 20)].item() == pytest.approx(want_ctr)
    assert (t["reg"][0, ~pos] == 0).all() and (t["centerness"][0, ~pos] == 0).all()
    assert (t["instance"][0, ~pos] == -1).all()


def test_targets_ignored_and_crowd_pixels_are_negative():
    seg = torch.full((2, 64, 64), 0, dtype=torch.int64)
    seg[0, 8:40, 8:40] = NUM_STUFF + 0
    seg[0, 8:24, 8:40] = -1          # crowd / void over part of the instance
    seg[1] = -1                      # an image that is all void, with no instance
    boxes = [torch.tensor([[8.0, 8, 40, 40]]), torch.zeros(0, 4)]
    classes = [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    locs, strides, ranges = one_level()
    t = fcos_targets(locs, strides, ranges, seg, boxes, classes, NUM_STUFF, center_sample_radius=0)
    ys = {locs[0][i, 1].item() for i in (t["labels"][0] >= 0).nonzero()[:, 0].tolist()}
    assert ys == {28, 36}
    assert (t["labels"][1] == -1).all()


def test_targets_center_sampling():
    seg = torch.zeros(1, 64, 64, dtype=torch.int64)
    seg[0, 0:64, 0:64] = NUM_STUFF  # one instance filling the image, centre (32, 32)
    boxes, classes = [torch.tensor([[0.0, 0, 64, 64]])], [torch.tensor([0])]
    locs, strides, ranges = one_level()
    for radius, span in [(1.5, {28, 36}), (2.0, {20, 28, 36, 44}), (0, set(range(4, 64, 8)))]:
        t = fcos_targets(locs, strides, ranges, seg, boxes, classes, NUM_STUFF, center_sample_radius=radius)
        xy = locs[0][t["labels"][0] >= 0]
        assert set(xy[:, 0].tolist()) == span and set(xy[:, 1].tolist()) == span, radius


def test_targets_size_ranges_per_level():
    # small instance (max ltrb <= 16) goes to stride 8, the big one (max ltrb > 16) to stride 16
    seg = torch.zeros(1, 64, 64, dtype=torch.int64)
    seg[0, 0:16, 0:16] = NUM_STUFF + 0
    seg[0, 24:64, 24:64] = NUM_STUFF + 1
    boxes = [torch.tensor([[0.0, 0, 16, 16], [24, 24, 64, 64]])]
    classes = [torch.tensor([0, 1])]
    strides = (8, 16)
    locs = compute_locations([(8, 8), (4, 4)], strides, "cpu")
    t = fcos_targets(locs, strides, ((0, 16), (16, INF)), seg, boxes, classes, NUM_STUFF, 0)
    lab0, lab1 = t["labels"][0, :64], t["labels"][0, 64:]
    assert set(lab0[lab0 >= 0].tolist()) == {0} and (lab0 == 0).sum() == 4
    assert set(lab1[lab1 >= 0].tolist()) == {1} and (lab1 == 1).sum() == 9  # x, y in {24, 40, 56}
    assert (t["reg"][0, 64:][lab1 >= 0].max(1).values > 16).all()


def reference_targets(locations, strides, ranges, seg, boxes, classes, num_stuff, radius):
    """Per-location loop: labels [B, L] and reg [B, L, 4] as plain lists."""
    labels, regs = [], []
    _, h, w = seg.shape
    for b in range(seg.shape[0]):
        lab, reg = [], []
        for loc, s, (lo, hi) in zip(locations, strides, ranges):
            for x, y in loc.tolist():
                v = int(seg[b, min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]) - num_stuff
                ok = 0 <= v < len(boxes[b])
                if ok:
                    x1, y1, x2, y2 = boxes[b][v].tolist()
                    ltrb = [x - x1, y - y1, x2 - x, y2 - y]
                    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                    ok = abs(x - cx) < radius * s and abs(y - cy) < radius * s and lo <= max(ltrb) <= hi
                lab.append(int(classes[b][v]) if ok else -1)
                reg.append(ltrb if ok else [0.0] * 4)
        labels.append(lab)
        regs.append(reg)
    return labels, regs


def test_targets_match_reference_on_random_masks():
    gen = torch.Generator().manual_seed(5)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    b, h, w, n = 2, 96, 80, 6  # P5..P7 locations fall outside the image: clamped
    seg = torch.randint(0, NUM_STUFF, (b, h, w), generator=gen)
    boxes, classes = [], []
    for i in range(b):
        drawn = []
        for j in range(n):  # later rectangles occlude earlier ones: masks are not boxes
            x1, y1 = randint(0, w - 8), randint(0, h - 8)
            x2, y2 = randint(x1 + 8, w + 1), randint(y1 + 8, h + 1)
            seg[i, y1:y2, x1:x2] = NUM_STUFF + j
            drawn.append((x1, y1, x2, y2))
        seg[i, :10, :10] = -1
        tight = []  # boxes of the visible masks; a hidden instance keeps its drawn box
        for j in range(n):
            ys, xs = (seg[i] == NUM_STUFF + j).nonzero(as_tuple=True)
            tight.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                         if len(xs) else drawn[j])
        boxes.append(torch.tensor(tight, dtype=torch.float32))
        classes.append(torch.randint(0, 4, (n,), generator=gen))
    strides = (8, 16, 32, 64, 128)
    ranges = ((0, 24), (24, 48), (48, 96), (96, 192), (192, INF))
    locs = compute_locations([(-(-h // s), -(-w // s)) for s in strides], strides, "cpu")
    t = fcos_targets(locs, strides, ranges, seg, boxes, classes, NUM_STUFF, 1.5)
    want_labels, want_reg = reference_targets(locs, strides, ranges, seg, boxes, classes, NUM_STUFF, 1.5)
    assert t["labels"].tolist() == want_labels
    torch.testing.assert_close(t["reg"], torch.tensor(want_reg))
    assert (t["labels"] >= 0).sum() > 10


# ---------------------------------------------------------------- losses


def small_setup(batch=2, num_classes=3):
    cfg = FCOSConfig(strides=(8, 16), size_ranges=((0, 24), (24, INF)), num_convs=1)
    torch.manual_seed(0)
    head = FCOSHead(16, num_classes, 4, cfg)
    feats = [torch.randn(batch, 16, 8, 8), torch.randn(batch, 16, 4, 4)]
    locs = compute_locations([(8, 8), (4, 4)], cfg.strides, "cpu")
    return cfg, head, feats, locs


def test_losses_with_no_positive_are_finite_and_differentiable():
    cfg, head, feats, locs = small_setup()
    seg = torch.zeros(2, 64, 64, dtype=torch.int64)
    empty = [torch.zeros(0, 4)] * 2
    t = fcos_targets(locs, cfg.strides, cfg.size_ranges, seg, empty, [torch.zeros(0, dtype=torch.int64)] * 2,
                     NUM_STUFF, cfg.center_sample_radius)
    losses = fcos_losses(head(feats), locs, t, cfg)
    assert losses["loss_box"].item() == 0 and losses["loss_ctr"].item() == 0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    for module in (head.cls_logits, head.box_reg, head.centerness):
        assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
    assert head.scales.grad is not None


def test_losses_with_positives_train_the_head():
    cfg, head, feats, locs = small_setup()
    seg = torch.zeros(2, 64, 64, dtype=torch.int64)
    seg[0, 4:20, 4:28] = NUM_STUFF
    seg[1, 16:60, 8:56] = NUM_STUFF
    boxes = [torch.tensor([[4.0, 4, 28, 20]]), torch.tensor([[8.0, 16, 56, 60]])]
    classes = [torch.tensor([2]), torch.tensor([0])]
    t = fcos_targets(locs, cfg.strides, cfg.size_ranges, seg, boxes, classes, NUM_STUFF, cfg.center_sample_radius)
    assert (t["labels"] >= 0).sum() >= 2
    for box_loss in ("iou", "giou"):
        cfg.box_loss = box_loss
        losses = fcos_losses(head(feats), locs, t, cfg)
        assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(15):
        total = sum(fcos_losses(head(feats), locs, t, cfg).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < 0.6 * totals[0]
    # the normalisers (their means over workers, in training): doubling num_pos halves the
    # classification loss; by default they are the batch's own
    out = head(feats)
    base = fcos_losses(out, locs, t, cfg)
    own = fcos_normalisers(t)
    assert own[0] == (t["labels"] >= 0).sum() and own[0] > 0
    doubled = fcos_losses(out, locs, t, cfg, normalisers=own * torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(doubled["loss_cls"], base["loss_cls"] / 2)
    torch.testing.assert_close(doubled["loss_box"], base["loss_box"])


# ---------------------------------------------------------------- detection


def handmade_output(batch=1, num_classes=3):
    """Two levels (strides 8, 16) of a 64 x 96 image: every logit very negative."""
    sizes = [(8, 12), (4, 6)]
    out = {"cls_logits": [torch.full((batch, num_classes, h, w), -10.0) for h, w in sizes],
           "centerness": [torch.full((batch, 1, h, w), -10.0) for h, w in sizes],
           "box_reg": [torch.ones(batch, 4, h, w) for h, w in sizes],
           "box_embed": [torch.zeros(batch, 2, h, w) for h, w in sizes]}
    return out, compute_locations(sizes, (8, 16), "cpu")


def put(out, level, i, j, cls, ltrb, logit=10.0, b=0):
    out["cls_logits"][level][b, cls, i, j] = logit
    out["centerness"][level][b, 0, i, j] = logit
    out["box_reg"][level][b, :, i, j] = torch.tensor(ltrb)


def detect(out, locs, sizes, cfg, backend="torch") -> list[dict]:
    """``fcos_detect``'s slots, checked (each image's detections first, empty slots zero)
    -> per image its detections."""
    dets = fcos_detect(out, locs, sizes, cfg, backend=backend)
    valid = dets.pop("valid")
    assert valid.shape == dets["scores"].shape == (len(sizes), min(cfg.max_detections, 3 * (96 + 24)))
    assert (valid.int().diff(dim=1) <= 0).all()
    assert all((v[~valid] == 0).all() for v in dets.values())
    return [{k: v[i][valid[i]] for k, v in dets.items()} for i in range(len(sizes))]


def test_detect_single_confident_location():
    out, locs = handmade_output()
    put(out, 1, 2, 3, cls=1, ltrb=(10.0, 5.0, 20.0, 15.0))  # location (56, 40)
    cfg = FCOSConfig(strides=(8, 16), size_ranges=((0, 64), (64, INF)))
    (det,) = detect(out, locs, [(64, 96)], cfg)
    assert det["boxes"].tolist() == [[46.0, 35.0, 76.0, 55.0]]
    assert det["classes"].tolist() == [1] and det["classes"].dtype == torch.int64
    assert det["locations"].tolist() == [[56, 40]] and det["levels"].tolist() == [1]
    assert det["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_detect_nms_clipping_and_batch(backend):
    out, locs = handmade_output(batch=2)
    put(out, 0, 4, 6, cls=0, ltrb=(12.0, 12.0, 12.0, 12.0))              # (52, 36): box [40, 24, 64, 48]
    put(out, 0, 4, 7, cls=0, ltrb=(20.0, 12.0, 4.0, 12.0), logit=5.0)    # (60, 36): same box, weaker -> suppressed
    put(out, 0, 4, 7, cls=2, ltrb=(20.0, 12.0, 4.0, 12.0), logit=5.0)    # same box, other class: kept
    put(out, 1, 3, 5, cls=1, ltrb=(8.0, 8.0, 50.0, 50.0), logit=4.0)     # (88, 56): clipped to the image
    put(out, 0, 0, 0, cls=2, ltrb=(3.0, 3.0, 3.0, 3.0), b=1)              # image 1: only this one
    cfg = FCOSConfig(strides=(8, 16), size_ranges=((0, 64), (64, INF)))
    det0, det1 = detect(out, locs, [(64, 96), (40, 40)], cfg, backend)
    assert det0["classes"].tolist() == [0, 2, 1]
    assert det0["locations"].tolist() == [[52, 36], [60, 36], [88, 56]]
    assert det0["boxes"][2].tolist() == [80.0, 48.0, 96.0, 64.0]
    assert (det0["scores"].diff() <= 0).all()
    assert det1["boxes"].tolist() == [[1.0, 1.0, 7.0, 7.0]] and det1["classes"].tolist() == [2]
    capped = detect(out, locs, [(64, 96), (40, 40)], FCOSConfig(max_detections=1, score_thresh=0.5),
                    backend)
    assert [len(d["scores"]) for d in capped] == [1, 1]
    nothing = detect(out, locs, [(64, 96), (40, 40)], FCOSConfig(score_thresh=0.99999), backend)
    assert all(len(d["boxes"]) == 0 and d["boxes"].shape == (0, 4) for d in nothing)
