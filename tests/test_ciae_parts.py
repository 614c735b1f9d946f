"""The method's own parts: config, memory, embedding branch, the composed CIAE loss, assembly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ciae.config import Config, EmbeddingConfig
from ciae.modeling.embedding import EmbeddingBranch, full_resolution, sample_at
from ciae.modeling.inference import assemble, oracle_queries, segments_info
from ciae.modeling.loss import category_sums, ciae_loss
from ciae.modeling.memory import CategoryMemory


def test_config_defaults_are_the_papers():
    c = Config()
    e = c.embedding
    assert (e.dim, e.margin, e.top_k, e.alpha, e.thing_weight, e.box_expand) == (32, 0.15, 5, 2.0, 5.0, 1.5)
    assert (e.coordconv, e.box_embedding, e.thing_mode, e.memory_momentum) == (True, True, "merged", 1e-4)
    f = c.fcos
    assert (f.score_thresh, f.pre_nms_topk, f.nms_thresh, f.max_detections) == (0.05, 1000, 0.6, 100)
    assert (f.focal_alpha, f.focal_gamma, f.strides) == (0.25, 2.0, (8, 16, 32, 64, 128))
    s = c.solver
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size, s.iterations, s.steps) == (
        0.01, 0.9, 1e-4, 16, 90_000, (60_000, 80_000))
    assert c.inference.stuff_area == 4096 and c.input.shorter_sides == (800,)
    assert c.backbone.name == "resnet50"


def test_config_round_trip_and_errors():
    small = Config.small()
    assert Config.from_dict(small.to_dict()) == small
    assert small.merged({"embedding": {"top_k": 3}}).embedding.top_k == 3
    with pytest.raises(ValueError, match="unknown config keys in embedding"):
        Config.from_dict({"embedding": {"topk": 3}})
    with pytest.raises(ValueError, match="thing_mode must be one of"):
        small.merged({"embedding": {"thing_mode": "split"}})
    with pytest.raises(ValueError, match="need embedding.thing_mode 'specific'"):
        small.merged({"inference": {"instance_class_from": "embedding"}})


def test_memory_update_follows_eq_13_14():
    mem = CategoryMemory(4, 3, momentum=0.5)
    before = mem.memory.clone()
    sums = torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 0, 3.0], [1.0, 1.0, 0]])
    counts = torch.tensor([5.0, 0.0, 2.0, 1.0])
    mem.update(sums, counts, step=25, total_steps=100)
    lam = 1 - 0.5 * (1 - 0.25) ** 3
    assert mem.momentum_at(25, 100) == pytest.approx(lam)
    for k in (0, 2, 3):
        mean = sums[k] / sums[k].norm()
        expect = lam * before[k] + (1 - lam) * mean
        assert torch.allclose(mem.memory[k], expect / expect.norm(), atol=1e-6)
    assert torch.equal(mem.memory[1], before[1])  # absent class untouched
    assert torch.allclose(mem.memory.norm(dim=1), torch.ones(4))
    assert mem.momentum_at(100, 100) == 1.0


def test_every_group_norm_uses_one_rule():
    """Backbone, FCOS towers and the embedding branch group 48 channels alike."""
    from ciae.modeling.backbone import make_norm

    branch = EmbeddingBranch(48, 48, 8)
    groups = {m.num_groups for m in branch.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {make_norm("gn", 48).num_groups} == {24}


@pytest.mark.parametrize("coordconv,box", [(True, True), (False, False)])
def test_embedding_branch_shapes(coordconv, box):
    torch.manual_seed(0)
    br = EmbeddingBranch(16, 8, 6, coordconv=coordconv, box_embedding=box)
    feats = [torch.randn(2, 16, 72 // s, 88 // s) for s in (4, 8, 16, 32)]  # 72x88: not /32
    boxes = [torch.randn(2, 6, -(-72 // s), -(-88 // s)) for s in (8, 16, 32, 64, 128)] if box else None
    out = br(feats, boxes)
    assert out.shape == (2, 6, 18, 22)
    out.sum().backward()
    assert all(p.grad is not None for p in br.parameters())


def test_sample_at_equals_full_resolution():
    torch.manual_seed(1)
    emb4 = torch.randn(2, 5, 6, 7)
    full = full_resolution(emb4)
    xy = torch.tensor([[[0, 0], [27, 23], [13, 5], [4, 22]], [[3, 1], [0, 23], [27, 0], [9, 9]]])
    got = sample_at(emb4, xy)
    want = torch.stack([full[i][:, xy[i, :, 1], xy[i, :, 0]].t() for i in range(2)])
    assert got.shape == (2, 4, 5) and torch.allclose(got, want, atol=1e-5)


def _loop_ciae(emb, sem, seg, boxes, memory, num_stuff, cfg):
    """The CIAE loss pixel by pixel, straight from Eq. 2-12."""
    b, d, h, w = emb.shape
    cae = iae = 0.0
    n_cae = n_iae = 0

    def pixel_loss(p, queries, inside, t, weight):
        s = [float(p @ q) if ok else 0.0 for q, ok in zip(queries, inside)]
        dist = [1 - x for x in s]
        ls = []
        for k in range(len(queries)):
            d_neg = 0.0 if k == t else dist[k]
            lp = max(dist[t] - d_neg + cfg.margin, 0.0)
            ls.append(-math.log(1 - lp / (2 + cfg.margin)))
        return weight * sum(sorted(ls, reverse=True)[:cfg.top_k])

    for i in range(b):
        n_inst = len(boxes[i])
        means = []
        for j in range(n_inst):
            m = emb[i][:, seg[i] == num_stuff + j].sum(1)
            means.append(m / m.norm())
        exp = []
        for x0, y0, x1, y1 in boxes[i].tolist():
            cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * cfg.box_expand, (y1 - y0) * cfg.box_expand
            exp.append((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2))
        for y in range(h):
            for x in range(w):
                p = emb[i][:, y, x] / emb[i][:, y, x].norm()
                if sem[i, y, x] != 255:
                    cae += pixel_loss(p, list(memory), [True] * len(memory), int(sem[i, y, x]), 1.0)
                    n_cae += 1
                if seg[i, y, x] >= 0:
                    inside = [True] * num_stuff + [bx0 <= x < bx1 and by0 <= y < by1 for bx0, by0, bx1, by1 in exp]
                    t = int(seg[i, y, x])
                    wgt = cfg.thing_weight if t >= num_stuff else 1.0
                    iae += pixel_loss(p, list(memory[:num_stuff]) + means, inside, t, wgt)
                    n_iae += 1
    return cae / n_cae, iae / n_iae


def _toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, w, c_st = 2, 7, 9, 2
    seg = torch.randint(0, c_st, (b, h, w), generator=g)
    seg[0, 1:4, 2:5] = c_st          # instance 0 of image 0
    seg[0, 4:6, 6:9] = c_st + 1      # instance 1 of image 0
    seg[1, 2:6, 1:3] = c_st          # instance 0 of image 1
    seg[1, 0, :] = -1                # void
    seg[0, 6, 0:2] = -1              # crowd: ignored by the IAE, a thing for the CAE
    sem = torch.where(seg >= c_st, torch.full_like(seg, c_st), seg)
    sem[1, 0, :] = 255
    sem[0, 6, 0:2] = c_st
    boxes = [torch.tensor([[2.0, 1, 5, 4], [6, 4, 9, 6]]), torch.tensor([[1.0, 2, 3, 6]])]
    emb = torch.randn(b, 4, h, w, generator=g, dtype=torch.float64)
    memory = torch.randn(c_st + 1, 4, generator=g, dtype=torch.float64)
    memory = memory / memory.norm(dim=1, keepdim=True)
    return emb, sem, seg, boxes, memory, c_st


@pytest.mark.parametrize("top_k", [1, 5])
def test_ciae_loss_equals_per_pixel_loop(top_k):
    emb, sem, seg, boxes, memory, c_st = _toy_batch()
    cfg = EmbeddingConfig(top_k=top_k, pixel_chunk=16)
    out = ciae_loss(emb, sem, seg, [b.double() for b in boxes], memory, c_st, cfg)
    cae, iae = _loop_ciae(emb, sem, seg, boxes, memory, c_st, cfg)
    assert float(out["loss_cae"]) == pytest.approx(cae, rel=1e-9)
    assert float(out["loss_iae"]) == pytest.approx(iae, rel=1e-9)
    assert float(out["loss_ciae"]) == pytest.approx(cae + 2 * iae, rel=1e-9)
    # category sums for the memory: sums of the pre-normalisation embeddings per category
    sums, counts = category_sums(emb, sem, c_st + 1)
    for k in range(c_st + 1):
        m = (sem == k)
        assert m.any() and torch.allclose(sums[k], emb.permute(1, 0, 2, 3)[:, m].sum(1))
        assert float(counts[k]) == float(m.sum())


def test_ciae_loss_gradient_reaches_segment_means(monkeypatch):
    emb, sem, seg, boxes, memory, c_st = _toy_batch(1)
    cfg = EmbeddingConfig(pixel_chunk=32)
    emb.requires_grad_(True)
    ciae_loss(emb, sem, seg, boxes, memory, c_st, cfg)["loss_iae"].backward()
    # the same loss with the instance means detached: the gradient differs on instance pixels only
    from kernels import dispatch

    sums = dispatch.segment_sums
    monkeypatch.setattr(dispatch, "segment_sums", lambda e, *a, **k: sums(e.detach(), *a, **k))
    emb2 = emb.detach().clone().requires_grad_(True)
    ciae_loss(emb2, sem, seg, boxes, memory, c_st, cfg)["loss_iae"].backward()
    diff = (emb.grad - emb2.grad).abs().sum(1)
    assert diff[seg >= c_st].min() > 0
    assert diff[seg < c_st].max() < 1e-12


def test_ciae_loss_gradient_keeps_the_embedding_layout(monkeypatch):
    """A channels-last batch gets a channels-last gradient, equal to plain autograd's."""
    import ciae.modeling.loss as module

    emb, sem, seg, boxes, memory, c_st = _toy_batch(2)
    cfg = EmbeddingConfig(pixel_chunk=32)

    def gradient():
        x = emb.clone().requires_grad_(True)
        y = x.contiguous(memory_format=torch.channels_last)   # as the model's, not a leaf
        grads = []
        y.register_hook(grads.append)
        ciae_loss(y, sem, seg, boxes, memory, c_st, cfg)["loss_ciae"].backward()
        return grads[0]

    ours = gradient()
    monkeypatch.setattr(module._Unbind, "apply", lambda t: t.unbind(0))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, gradient())
    # a part that the loss does not reach gets zeros
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    module._Unbind.apply(x)[1].sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x).index_fill_(0, torch.tensor([1]), 1.0))


def test_oracle_on_perfect_embeddings_reproduces_ground_truth():
    """Table IV's oracle on embeddings that are one unit vector per segment: exact output."""
    from ciae.config import InferenceConfig

    h, w, c_st = 24, 32, 2
    seg = torch.zeros(h, w, dtype=torch.int64)
    seg[:, 13:] = 1
    seg[3:11, 4:12] = c_st          # instance 0, crossing the stuff boundary
    seg[9:20, 10:27] = c_st + 1     # instance 1, occluding instance 0
    basis = torch.eye(6, dtype=torch.float64)[: c_st + 2] * 3.0  # pre-normalisation: any length
    emb = basis[seg].permute(2, 0, 1).contiguous()
    boxes = torch.tensor([[4.0, 3, 12, 11], [10, 9, 27, 20]], dtype=torch.float64)
    classes = torch.tensor([1, 0])
    queries = oracle_queries(emb, seg, c_st, 2, stride=1)
    (ids,), table = assemble(emb[None], [(h, w)], basis[:c_st], queries[None], boxes[None],
                             classes[None], torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                             cfg=InferenceConfig(stuff_area=0), stride=1)
    segments = segments_info(table[0].numpy(), stuff_ids=[100, 101], thing_ids=[1, 2])
    ids = ids.numpy()
    by_cat = {s["category_id"]: s for s in segments}
    assert sorted(by_cat) == [1, 2, 100, 101]
    assert all(s["score"] == 1.0 for s in segments)      # every pixel chose clearly: margin 1
    for cat, label in ((100, 0), (101, 1), (2, c_st), (1, c_st + 1)):
        mask = (seg == label).numpy()
        s = by_cat[cat]
        assert np.array_equal(ids == s["id"], mask)
        ys, xs = np.nonzero(mask)
        assert s["area"] == mask.sum()
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # and through the PQ evaluator: 1.0
    from ciae.data.panoptic import CategoryTable
    from pipeline.evaluation.pq import PQAccumulator

    table = CategoryTable.from_json([{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
                                     {"id": 100, "name": "c", "isthing": 0}, {"id": 101, "name": "d", "isthing": 0}])
    gt_segments = [{"id": k + 1, "category_id": c, "iscrowd": 0} for k, c in enumerate((100, 101, 2, 1))]
    acc = PQAccumulator(table)
    acc.add_indexed((seg + 1).numpy(), gt_segments, ids, segments)
    assert acc.summary()["All"]["pq"] == 1.0


def test_post_processing_on_the_device_equals_the_numpy_reference():
    """``assemble`` measures a batch on the assignment's device (torch); on the CPU each image's
    ids and segments are those of the numpy post-processing it replaced (bincount, id table,
    resize, row-run measures) on its own queries: the padding slots, queries that would take
    pixels, take none."""
    from ciae.config import InferenceConfig
    from ciae.data.panoptic import measure_segments
    from ciae.data.transform import resize_nearest
    from ciae.modeling.embedding import full_resolution
    from ciae.modeling.inference import stuff_area_threshold
    from kernels import dispatch

    g = torch.Generator().manual_seed(3)
    b, k, pad = 5, 4, 2
    emb4 = torch.randn(b, 8, 12, 15, generator=g)
    stuff = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    queries = F.normalize(torch.randn(b, k + pad, 8, generator=g), dim=2)
    xy = torch.rand(b, k + pad, 2, generator=g) * torch.tensor([60.0, 48.0])
    boxes = torch.cat([xy, xy + torch.rand(b, k + pad, 2, generator=g) * 30], 2)
    classes, scores = torch.randint(2, (b, k + pad), generator=g), torch.rand(b, k + pad, generator=g)
    valid = torch.arange(k + pad) < k
    # the padding: each image's mean direction, over the whole map
    queries[:, k:] = F.normalize(full_resolution(emb4).mean((2, 3)), dim=1)[:, None]
    boxes[:, k:] = torch.tensor([0.0, 0, 60, 48])
    sizes = [(45, 57), (48, 60), (30, 41), (45, 57), (20, 60)]
    out_sizes = [(45, 57), (31, 77), (60, 80), (45, 20), (20, 60)]
    cfg = InferenceConfig(stuff_area=2000, min_instance_area=5)
    ids, table = assemble(emb4, sizes, stuff, queries, boxes, classes, scores, valid.expand(b, -1),
                          cfg, out_sizes=out_sizes)
    assert table.shape == (b, 3 + k + pad, 9)
    for i, (size, out) in enumerate(zip(sizes, out_sizes)):
        segments = segments_info(table[i].numpy(), [7, 9, 11], [1, 3])
        # the numpy reference, on the image's own queries
        all_q = torch.cat([stuff, queries[i, :k]])
        all_b = torch.cat([torch.tensor([[0.0, 0, 60, 48]]).expand(3, 4), boxes[i, :k]])
        labels = dispatch.assign_upsampled(emb4[i], (48, 60), all_q, all_b)[0][:size[0], :size[1]].numpy()
        padded = dispatch.assign_upsampled(emb4[i], (48, 60), queries[i], boxes[i])[0]
        assert (padded >= k).any()                      # the padding would take pixels
        areas = np.bincount(labels.ravel(), minlength=7)
        lut, ref = np.zeros(7, np.int32), []
        for q in range(7):
            if areas[q] == 0 or (q < 3 and areas[q] < stuff_area_threshold(cfg, *size)) or (q >= 3 and areas[q] < 5):
                continue
            lut[q] = len(ref) + 1
            ref.append({"id": len(ref) + 1, "category_id": [7, 9, 11][q] if q < 3 else [1, 3][int(classes[i, q - 3])],
                        "iscrowd": 0})
        ref_ids = resize_nearest(lut[labels], out)
        for s, area, box in zip(ref, *measure_segments(ref_ids, len(ref))):
            s["area"], s["bbox"] = int(area), box.tolist()
        assert ids[i].dtype == torch.int32 and np.array_equal(ids[i].numpy(), ref_ids)
        assert [{k: v for k, v in s.items() if k != "score"} for s in segments] == [s for s in ref if s["area"]]
        assert all(0 <= s["score"] <= 1 for s in segments) and len(ref) >= 2


def test_segments_are_measured_at_the_output_size_and_vanished_ones_dropped():
    """Predictions at a test size larger than the image (COCO: 480x640 at 800) map back with a
    thin segment gone: ``assemble`` measures at the output size and ``segments_info`` drops it."""
    from ciae.config import InferenceConfig

    h, w = 300, 400
    seg = torch.zeros(h, w, dtype=torch.int64)
    seg[0] = 1                                              # one row: gone when shrunk to 96 rows
    seg[100:200, 100:300] = 2
    basis = torch.eye(3, dtype=torch.float64) * 2.0
    emb = basis[seg].permute(2, 0, 1).contiguous()
    (ids,), table = assemble(emb[None], [(h, w)], basis, basis.new_zeros(1, 0, 3),
                             basis.new_zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64),
                             basis.new_zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool),
                             InferenceConfig(stuff_area=0), stride=1, out_sizes=[(96, 128)])
    segments = segments_info(table[0].numpy(), [184, 1, 3], [])
    ids = ids.numpy()
    assert ids.shape == (96, 128) and 2 not in ids
    assert [s["id"] for s in segments] == [1, 3] and [s["category_id"] for s in segments] == [184, 3]
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        assert s["area"] == len(ys) and s["bbox"] == [xs.min(), ys.min(), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]


def test_scores_follow_the_similarity_the_detector_and_each_category():
    from ciae.modeling.inference import image_quality, segment_score

    assert segment_score(0.8, None) == 0.8 and segment_score(1.7, None) == 1.0
    assert segment_score(-0.1, None) == 0.0
    assert segment_score(0.64, 0.25) == pytest.approx(0.4)
    assert segment_score(0.9, None) > segment_score(0.6, None)
    sky, person = {"category_id": 1, "area": 3000, "score": 0.9}, {"category_id": 2, "area": 10, "score": 0.9}
    assert image_quality([sky, person]) == pytest.approx(0.9)
    doubtful = {"category_id": 3, "area": 10, "score": 0.3}
    # a small doubtful instance weighs as one category, whatever its area
    assert image_quality([sky, person, doubtful]) == pytest.approx(0.7)
    # segments of one category are averaged first
    assert image_quality([sky, person, person | {"score": 0.5}]) == pytest.approx((0.9 + 0.7) / 2)
    assert image_quality([]) == 0.0


def test_stuff_area_threshold_scales_with_image_size():
    from ciae.config import InferenceConfig
    from ciae.modeling.inference import stuff_area_threshold

    cfg = InferenceConfig()
    assert stuff_area_threshold(cfg, 800, 1333) == pytest.approx(4096)
    assert stuff_area_threshold(cfg, 400, 1333 // 2) == pytest.approx(4096 / 4, rel=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_select_instances_drops_low_scores_and_duplicates(backend):
    from ciae.config import InferenceConfig
    from ciae.modeling.inference import select_instances

    q = torch.tensor([[1.0, 0, 0], [0.99, 0.141, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    q = q / q.norm(dim=1, keepdim=True)
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 2, 12, 12], [1, 1, 9, 9], [50, 50, 60, 60], [0, 0, 5, 5]])
    scores = torch.tensor([0.6, 0.9, 0.5, 0.7, 0.1])
    order = scores.argsort(descending=True)             # as fcos_detect sorts them
    # two images: the second with detection 3's slot padding
    q, boxes, scores = q[order].expand(2, 5, 3), boxes[order].expand(2, 5, 4), scores[order].expand(2, 5)
    valid = order != 3
    valid = torch.stack([torch.ones_like(valid), valid])

    def kept(cfg):
        keep = select_instances(q, boxes, scores, valid, cfg, backend=backend)
        return [order[k].tolist() for k in keep]

    # 1 beats its duplicate 0; 2 differs in embedding; 3 is far away (no overlap); 4 scores too low
    assert kept(InferenceConfig(instance_score_thresh=0.4, duplicate_similarity=0.9)) == [[1, 3, 2], [1, 2]]
    assert kept(InferenceConfig(instance_score_thresh=0.0, duplicate_similarity=1.01)) == [[1, 3, 0, 2, 4], [1, 0, 2, 4]]


def test_configs_saved_by_earlier_versions_still_load():
    d = Config.small().to_dict()
    d["inference"]["oracle"] = False          # a retired knob, as older checkpoints hold it
    assert Config.from_dict(d) == Config.small()
    d["inference"]["no_such_knob"] = 1
    with pytest.raises(ValueError, match="no_such_knob"):
        Config.from_dict(d)
