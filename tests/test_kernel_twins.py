"""The PyTorch twins of the fused operations against direct per-pixel Python loops.

The loops follow the definitions literally (one pixel, one query at a time) and their autograd is
the gradient reference for the twins' hand-written backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch
from kernels.assign import assign, assign_upsampled
from kernels.ciae_loss import embedding_loss
from kernels.segment_sums import segment_sums
from kernel_cases import degenerate_case, make_case

MARGIN = 0.15


# ---- references: one pixel at a time -----------------------------------------------------------

def loop_segment_sums(emb, labels, num_segments):
    b, d, h, w = emb.shape
    sums = [[emb.new_zeros(d) for _ in range(num_segments)] for _ in range(b)]
    counts = torch.zeros(b, num_segments, dtype=emb.dtype)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(labels[i, y, x])
                if label >= 0:
                    sums[i][label] = sums[i][label] + emb[i, :, y, x]
                    counts[i, label] += 1
    return torch.stack([torch.stack(row) for row in sums]), counts


def inside(box, y, x):
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 <= x < x1 and y0 <= y < y1


def unit(e):
    return e / e.norm().clamp_min(1e-12)


def loop_embedding_loss(emb, queries, boxes, target, weight, margin, top_k):
    d, h, w = emb.shape
    total, num_valid = emb.new_zeros(()), 0
    for y in range(h):
        for x in range(w):
            t = int(target[y, x])
            if t < 0:
                continue
            num_valid += 1
            p = unit(emb[:, y, x])
            s = [p @ q if inside(box, y, x) else p.new_zeros(()) for q, box in zip(queries, boxes)]
            dist = [1 - sk for sk in s]
            losses = []
            for k in range(len(queries)):
                d_neg = dist[k] if k != t else 0
                l_hinge = torch.clamp(dist[t] - d_neg + margin, min=0)
                losses.append(-torch.log(1 - l_hinge / (2 + margin)))
            kept = sorted(losses, key=lambda v: float(v.detach()), reverse=True)[:top_k]
            total = total + weight[y, x] * sum(kept)
    return total, num_valid


def loop_assign(emb, queries, boxes):
    d, h, w = emb.shape
    labels, best, second = torch.zeros(h, w, dtype=torch.int64), torch.zeros(h, w), torch.zeros(h, w)
    for y in range(h):
        for x in range(w):
            p = unit(emb[:, y, x].double())
            s = [float(p @ q.double()) if inside(box, y, x) else 0.0 for q, box in zip(queries, boxes)]
            k = max(range(len(s)), key=lambda j: (s[j], -j))   # first maximum
            labels[y, x], best[y, x] = k, s[k]
            second[y, x] = max([v for j, v in enumerate(s) if j != k] + [-1.0])
    return labels, best, second


# ---- inputs ----------------------------------------------------------------------------------------

def twin_and_loop(emb, queries, boxes, target, weight, top_k, chunk=7, weight_grad=False):
    """Loss values and gradients w.r.t. emb, queries (and weight) of the twin and of the loop."""
    out = []
    for fn in (lambda *a: embedding_loss(*a, chunk=chunk), loop_embedding_loss):
        e, q = emb.clone().requires_grad_(), queries.clone().requires_grad_()
        wt = weight.clone().requires_grad_(weight_grad)
        loss, n = fn(e, q, boxes, target, wt, MARGIN, top_k)
        inputs = (e, q, wt) if weight_grad else (e, q)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else None
        if grads is not None:
            grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
        out.append((loss.detach(), float(n), grads))
    return out


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


# ---- segment_sums ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_segment_sums_matches_loop(dtype):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 3, 5, 7, generator=g, dtype=dtype)
    labels = torch.randint(-1, 4, (2, 5, 7), generator=g)
    labels[labels == 2] = 1                                   # segment 2 and 5 stay empty
    sums, counts = segment_sums(emb, labels, 6)
    ref_sums, ref_counts = loop_segment_sums(emb, labels, 6)
    assert sums.shape == (2, 6, 3) and counts.shape == (2, 6)
    assert sums.dtype == counts.dtype == (dtype if dtype == torch.float64 else torch.float32)
    assert_close(sums, ref_sums)
    assert_close(counts, ref_counts)
    assert (counts[:, [2, 5]] == 0).all() and (sums[:, [2, 5]] == 0).all()


def test_segment_sums_all_ignored_and_half():
    emb = torch.randn(1, 4, 3, 5, dtype=torch.float16)
    sums, counts = segment_sums(emb, torch.full((1, 3, 5), -1), 3)
    assert sums.dtype == torch.float32 and (sums == 0).all() and (counts == 0).all()
    labels = torch.randint(0, 3, (1, 3, 5))
    assert_close(segment_sums(emb, labels, 3)[0], loop_segment_sums(emb.double(), labels, 3)[0], 1e-5)


def test_segment_sums_gradient_matches_loop():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, 3, (2, 4, 5), generator=g)
    probe = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    grads = []
    for fn in (segment_sums, loop_segment_sums):
        e = emb.clone().requires_grad_()
        sums, _ = fn(e, labels, 3)
        grads.append(torch.autograd.grad((sums * probe).sum(), e)[0])
    assert_close(*grads)


def test_gradient_reaches_segment_sums_through_normalised_means():
    """Queries = normalised segment means of the same map: the loss's gradient reaches emb both
    as pixels and through the means, and matches the loop version end to end."""
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (5, 4), generator=g)
    target[0, 0] = -1
    boxes = torch.tensor([[0, 0, 4, 5], [0, 0, 3, 4], [1, 1, 4, 5]], dtype=torch.float64)
    weight = torch.ones(5, 4, dtype=torch.float64)
    grads = []
    for sums_fn, loss_fn in ((segment_sums, embedding_loss), (loop_segment_sums, loop_embedding_loss)):
        e = emb.clone().requires_grad_()
        sums, _ = sums_fn(e[None], target[None], 3)
        means = F.normalize(sums[0], dim=1)
        loss, _ = loss_fn(e, means, boxes, target, weight, MARGIN, 2)
        grads.append(torch.autograd.grad(loss, e)[0])
    assert grads[0].abs().sum() > 0
    assert_close(*grads)
    # the part through the means alone is nonzero too
    e = emb.clone().requires_grad_()
    means = F.normalize(segment_sums(e[None], target[None], 3)[0][0], dim=1)
    loss, _ = embedding_loss(emb, means, boxes, target, weight, MARGIN, 2)
    assert torch.autograd.grad(loss, e)[0].abs().sum() > 0


# ---- embedding_loss ----------------------------------------------------------------------------

CASES = {
    "random": dict(seed=0),
    "odd_sizes": dict(seed=1, d=5, h=7, w=3, q=6),
    "one_query": dict(seed=2, q=1),
    "no_ignore": dict(seed=3, ignore=0.0),
}


@pytest.mark.parametrize("top_k", [1, 2, 4, 9])
@pytest.mark.parametrize("case", sorted(CASES))
def test_embedding_loss_matches_loop(case, top_k):
    emb, queries, boxes, target, weight = make_case(**CASES[case])
    (loss, n, grads), (ref_loss, ref_n, ref_grads) = twin_and_loop(
        emb, queries, boxes, target, weight, top_k, weight_grad=True)
    assert n == ref_n
    assert_close(loss, ref_loss)
    for gr, ref in zip(grads, ref_grads):
        assert_close(gr, ref)


def test_embedding_loss_float32_matches_loop():
    emb, queries, boxes, target, weight = make_case(4, d=4, h=6, w=5, q=5, dtype=torch.float32)
    (loss, _, grads), (ref_loss, _, ref_grads) = twin_and_loop(emb, queries, boxes, target, weight, 3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for gr, ref in zip(grads, ref_grads):
        torch.testing.assert_close(gr, ref, rtol=1e-5, atol=1e-6)


def test_embedding_loss_degenerate_boxes_and_zero_pixels():
    emb, queries, boxes, target, weight = degenerate_case(5)
    (loss, _, grads), (ref_loss, _, ref_grads) = twin_and_loop(emb, queries, boxes, target, weight, 3)
    assert torch.isfinite(loss) and all(torch.isfinite(gr).all() for gr in grads)
    assert_close(loss, ref_loss)
    for gr, ref in zip(grads, ref_grads):
        assert_close(gr, ref)


def test_embedding_loss_all_ignored():
    emb, queries, boxes, target, weight = make_case(6)
    e, q = emb.clone().requires_grad_(), queries.clone().requires_grad_()
    loss, n = embedding_loss(e, q, boxes, torch.full_like(target, -1), weight, MARGIN, 5)
    loss.backward()
    assert loss.item() == 0 and n.item() == 0
    assert (e.grad == 0).all() and (q.grad == 0).all()


def test_embedding_loss_chunk_sizes_agree():
    emb, queries, boxes, target, weight = make_case(7, d=4, h=9, w=11, q=6, dtype=torch.float32)
    results = [twin_and_loop(emb, queries, boxes, target, weight, 5, chunk=c)[0]
               for c in (None, 1, 13, 64, 99, 1000)]
    for loss, n, grads in results[1:]:
        assert n == results[0][1]
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for gr, ref in zip(grads, results[0][2]):
            # fp32 sums in another order per chunk size: a few ulps apart (AVX-512 hosts differ most)
            torch.testing.assert_close(gr, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, None])  # rows recomputed in the backward / kept from the forward
def test_embedding_loss_gradcheck(chunk):
    emb, queries, boxes, target, weight = make_case(8, d=3, h=3, w=4, q=3)
    weight.requires_grad_()
    fn = lambda e, q, wt: embedding_loss(e, q, boxes, target, wt, MARGIN, 2, chunk=chunk)[0]
    assert torch.autograd.gradcheck(fn, (emb.requires_grad_(), queries.requires_grad_(), weight))


def test_embedding_loss_half_precision():
    emb, queries, boxes, target, weight = make_case(9, d=8, h=6, w=7, q=5, dtype=torch.float32)
    ref = twin_and_loop(emb, queries, boxes, target, weight, 3)[0]
    half = twin_and_loop(emb.half(), queries.half(), boxes, target, weight.half(), 3)[0]
    assert half[0].dtype == torch.float32 and half[2][0].dtype == torch.float16
    torch.testing.assert_close(half[0], ref[0], rtol=1e-2, atol=1e-2)
    for gr, r in zip(half[2], ref[2]):
        torch.testing.assert_close(gr.float(), r, rtol=5e-2, atol=5e-2)


def test_embedding_loss_singularity_is_finite():
    """An exactly antipodal pixel and query: the log's argument is floored, no inf or NaN."""
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[[-1.0]], [[0.0]]]).requires_grad_()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    loss, _ = embedding_loss(emb, queries, boxes, torch.zeros(1, 1, dtype=torch.int64),
                             torch.ones(1, 1), MARGIN, 2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


# ---- assign ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 3, 8])
def test_assign_matches_loop(chunk):
    emb, queries, boxes, _, _ = make_case(10, d=4, h=7, w=5, q=6, dtype=torch.float32)
    boxes[3] = torch.tensor([2.0, 2.0, 2.0, 6.0])             # degenerate: never inside
    labels, best, second = assign(emb * 3.0, queries, boxes, chunk=chunk)
    ref_labels, ref_best, ref_second = loop_assign(emb, queries, boxes)
    assert labels.dtype == torch.int64 and best.dtype == second.dtype == torch.float32
    assert torch.equal(labels, ref_labels)
    assert_close(best, ref_best)
    assert_close(second, ref_second)
    assert (best >= second).all()


def test_assign_ties_and_box_filter():
    d = torch.tensor([1.0, 0.0])
    queries = torch.stack([torch.tensor([0.0, 1.0]), d, d, d])
    emb = d[:, None, None].expand(2, 2, 3).clone()            # every pixel points along d
    boxes = torch.tensor([[0, 0, 3, 2], [1, 0, 3, 1], [0, 0, 3, 2], [0, 0, 3, 2]], dtype=torch.float32)
    labels, best, second = assign(emb, queries, boxes)
    # pixel (0, 1), (0, 2): queries 1, 2, 3 tie, the lowest wins; elsewhere query 1 is filtered
    assert labels.tolist() == [[2, 1, 1], [2, 2, 2]]
    assert torch.allclose(best, torch.ones(2, 3)) and torch.allclose(second, torch.ones(2, 3))  # a tie
    # outside its box a query scores 0 (Eq. 16 with the filter), which beats a negative cosine
    labels, best, second = assign(-emb, torch.stack([d, -d]), torch.tensor([[0, 0, 3, 2], [0, 0, 1, 2.0]]))
    assert labels.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert best.tolist() == [[1, 0, 0], [1, 0, 0]]
    assert second.tolist() == [[-1, -1, -1], [-1, -1, -1]]
    # one query: nothing else to choose, the second best is the floor -1
    _, best, second = assign(emb, queries[:1], boxes[:1])
    assert torch.equal(second, torch.full((2, 3), -1.0))


@pytest.mark.parametrize("lowres,out,chunk", [((3, 4), (12, 16), 16), ((5, 4), (17, 13), 1),
                                              ((4, 6), (4, 6), 7), ((6, 3), (9, 11), None)])
def test_assign_upsampled_equals_interpolate_normalise_assign(lowres, out, chunk):
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(5, *lowres, generator=g)
    queries = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    boxes = torch.tensor([[0, 0, out[1], out[0]]] * 3 + [[1, 2, 7, 9], [0.5, 0, 3, 4],
                                                           [4, 4, 4, 9], [2, 1, 11, 5]],
                         dtype=torch.float32)
    full = F.normalize(F.interpolate(emb[None], size=out, mode="bilinear", align_corners=False)[0], dim=0)
    ref_labels, ref_best, ref_second = assign(full, queries, boxes, chunk=None)
    labels, best, second = assign_upsampled(emb, out, queries, boxes, chunk=chunk)
    assert torch.equal(labels, ref_labels)
    assert_close(best, ref_best)
    assert_close(second, ref_second)
    _, half_best, half_second = assign_upsampled(emb.half(), out, queries, boxes, chunk=chunk)
    assert_close(half_best, ref_best, 1e-2)
    assert_close(half_second, ref_second, 1e-2)


# ---- dispatcher --------------------------------------------------------------------------------

def test_dispatch_routes_to_the_twins():
    emb, queries, boxes, target, weight = make_case(12, dtype=torch.float32)
    assert kernels.embedding_loss is dispatch.embedding_loss
    for backend in ("auto", "torch"):
        assert_close(kernels.embedding_loss(emb, queries, boxes, target, weight, MARGIN, 5,
                                            backend=backend)[0],
                     embedding_loss(emb, queries, boxes, target, weight, MARGIN, 5)[0])
        assert torch.equal(kernels.assign(emb, queries, boxes, backend=backend)[0],
                           assign(emb, queries, boxes)[0])
        assert torch.equal(kernels.assign_upsampled(emb, (10, 8), queries, boxes, backend=backend)[0],
                           assign_upsampled(emb, (10, 8), queries, boxes)[0])
        assert torch.equal(kernels.segment_sums(emb[None], target[None], 4, backend=backend)[0],
                           segment_sums(emb[None], target[None], 4)[0])


def test_dispatch_calls_the_backend_it_is_given(monkeypatch):
    """Each entry point reaches the chosen backend's function (and "auto" the first that accepts),
    whatever the outputs are."""
    emb, queries, boxes, target, weight = make_case(12, dtype=torch.float32)
    calls = []

    def spy(name):
        def fn(*args):
            calls.append(name)
            return "result of " + name
        return dispatch.Backend(segment_sums=fn, embedding_loss=fn, assign=fn, assign_upsampled=fn, nms=fn,
                                greedy_keep=fn, group_norm=fn, channel_affine=fn,
                                accepts=lambda t: name == "second")
    monkeypatch.setattr(dispatch, "BACKENDS", {"first": spy("first"), "second": spy("second")})
    for backend, expected in (("first", "first"), ("second", "second"), ("auto", "second")):
        calls.clear()
        assert kernels.segment_sums(emb[None], target[None], 4, backend=backend) == "result of " + expected
        assert kernels.embedding_loss(emb, queries, boxes, target, weight, MARGIN, 5,
                                      backend=backend) == "result of " + expected
        assert kernels.assign(emb, queries, boxes, backend=backend) == "result of " + expected
        assert kernels.assign_upsampled(emb, (10, 8), queries, boxes, backend=backend) == "result of " + expected
        assert kernels.group_norm(emb[None], 3, emb.new_ones(3), emb.new_zeros(3),
                                  backend=backend) == "result of " + expected
        assert kernels.channel_affine(emb[None], emb.new_ones(3, 1, 1), emb.new_zeros(3, 1, 1), emb[None],
                                      backend=backend) == "result of " + expected
        assert calls == [expected] * 6


def test_dispatch_rejects_bad_input():
    emb, queries, boxes, target, weight = make_case(13, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.assign(emb, queries, boxes, backend="cuda")
    with pytest.raises(ValueError, match="queries"):
        kernels.assign(emb, queries[:, :2], boxes)
    with pytest.raises(ValueError, match="boxes"):
        kernels.embedding_loss(emb, queries, boxes[:2], target, weight, MARGIN, 5)
    with pytest.raises(ValueError, match="target"):
        kernels.embedding_loss(emb, queries, boxes, target[:2], weight, MARGIN, 5)
    with pytest.raises(ValueError, match="labels"):
        kernels.segment_sums(emb[None], target, 4)
    x, c = emb[None], emb.new_ones(3, 1, 1)
    with pytest.raises(ValueError, match="scale and shift must be"):
        kernels.channel_affine(x, c[:2], c[:2])
    with pytest.raises(ValueError, match="constants"):
        kernels.channel_affine(x, c.clone().requires_grad_(), c)
    with pytest.raises(ValueError, match="come together"):
        kernels.channel_affine(x, c, c, x, c)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.channel_affine(x, c, c, x[..., :2])
