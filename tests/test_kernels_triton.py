"""The Triton kernels against their PyTorch twins (the exact references), forward and backward.

On a CPU-only machine the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported) on small inputs; with a GPU the same tests run the
compiled kernels on CUDA tensors. ``block=16`` forces several programs per map (and, for the
loss's backward, several blocks per persistent program).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernel_cases import degenerate_case, make_case  # noqa: E402

import kernels  # noqa: E402
from ciae.config import EmbeddingConfig  # noqa: E402
from ciae.modeling.loss import category_sums, ciae_loss  # noqa: E402
from ciae.utils.opcount import OpCounter  # noqa: E402
from kernels import (assign_triton, channel_affine_triton, ciae_loss_triton, dispatch,  # noqa: E402
                     group_norm_triton, segment_sums_triton)
from kernels.assign import assign as twin_assign  # noqa: E402
from kernels.assign import assign_upsampled as twin_assign_upsampled  # noqa: E402
from kernels.channel_affine import channel_affine as twin_channel_affine  # noqa: E402
from kernels.ciae_loss import embedding_loss as twin_loss  # noqa: E402
from kernels.group_norm import group_norm as twin_group_norm  # noqa: E402
from kernels.segment_sums import segment_sums as twin_segment_sums  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MARGIN = 0.15
HALF = [torch.float16, torch.bfloat16]


def close(a, b, tol):
    torch.testing.assert_close(a.cpu(), b.to(a.dtype).cpu(), rtol=tol, atol=tol)


def tol_for(dtype):
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)


# ---- segment_sums -------------------------------------------------------------------------------

def run_segment_sums(fn, emb, labels, s, probe, **kw):
    e = emb.clone().requires_grad_()
    sums, counts = fn(e, labels, s, **kw)
    (grad,) = torch.autograd.grad((sums * probe).sum(), e)
    return sums.detach(), counts, grad


@pytest.mark.parametrize("b,d,h,w,s,dtype,block", [
    (1, 3, 5, 7, 4, torch.float64, None),
    (2, 5, 9, 11, 6, torch.float32, 16),       # several blocks per image
    (3, 17, 6, 13, 150, torch.float32, 32),     # D > 16, S over three 64-wide tiles
    (2, 4, 7, 6, 5, torch.float16, None),
    (2, 4, 7, 6, 5, torch.bfloat16, 16),
])
def test_segment_sums_matches_twin(b, d, h, w, s, dtype, block):
    g = torch.Generator().manual_seed(b * 100 + d)
    emb = torch.randn(b, d, h, w, generator=g).to(dtype).to(DEV)
    labels = torch.randint(-1, s, (b, h, w), generator=g)
    labels[labels == 2] = 1                                   # segment 2 stays empty
    labels[-1] = -1 if b > 1 else labels[-1]                  # an all-ignore image
    labels = labels.to(DEV)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    probe = torch.randn(b, s, d, generator=g, dtype=acc).to(DEV)
    sums, counts, grad = run_segment_sums(segment_sums_triton.segment_sums, emb, labels, s, probe,
                                          block=block)
    ref_sums, ref_counts, ref_grad = run_segment_sums(twin_segment_sums, emb, labels, s, probe)
    assert sums.dtype == counts.dtype == acc and grad.dtype == dtype
    assert torch.equal(counts, ref_counts)
    close(sums, ref_sums, 1e-9 if dtype == torch.float64 else 1e-5)
    if dtype == torch.bfloat16:     # the interpreter truncates float32 -> bfloat16 (GPUs round)
        close(grad, ref_grad, 1e-2)
    else:
        assert torch.equal(grad, ref_grad)                    # a gather: exact
    assert (sums[:, 2] == 0).all() and (counts[:, 2] == 0).all()
    if b > 1:
        assert (sums[-1] == 0).all() and (counts[-1] == 0).all() and (grad[-1] == 0).all()


# ---- embedding_loss -----------------------------------------------------------------------------

def run_loss(fn, emb, queries, boxes, target, weight, top_k, need=(True, True, True), **kw):
    """loss, num_valid and the gradients of (emb, queries, weight), each None when not needed."""
    inputs = [x.to(DEV).clone().requires_grad_(r) for x, r in zip((emb, queries, weight), need)]
    loss, n = fn(inputs[0], inputs[1], boxes.to(DEV), target.to(DEV), inputs[2], MARGIN, top_k,
                 **kw)
    wanted = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted)) if wanted else iter(())
    return loss.detach(), n, [next(grads) if x.requires_grad else None for x in inputs]


def assert_loss_matches(case, top_k, need=(True, True, True), block=None, tol=None):
    tol = tol or tol_for(case[0].dtype)
    loss, n, grads = run_loss(ciae_loss_triton.embedding_loss, *case, top_k, need, block=block)
    ref_loss, ref_n, ref_grads = run_loss(twin_loss, *case, top_k, need)
    assert loss.dtype == ref_loss.dtype and n.dtype == ref_n.dtype and float(n) == float(ref_n)
    close(loss, ref_loss, tol)
    for gr, ref in zip(grads, ref_grads):
        assert (gr is None) == (ref is None)
        if gr is not None:
            assert gr.dtype == ref.dtype and torch.isfinite(gr).all()
            close(gr, ref, tol)
    return loss, grads


LOSS_CASES = {
    "random": (dict(seed=0), None),
    "odd_sizes_f32": (dict(seed=1, d=5, h=7, w=3, q=6, dtype=torch.float32), None),
    "one_query": (dict(seed=2, q=1), None),
    "no_ignore_blocks": (dict(seed=3, d=6, h=9, w=13, q=5, ignore=0.0), 16),  # 8 blocks, 4 programs
    "d17_q19_f32": (dict(seed=4, d=17, h=6, w=5, q=19, dtype=torch.float32), 16),
}


@pytest.mark.parametrize("top_k", [1, 3, 40])                   # 40 >= Q: clipped
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_embedding_loss_matches_twin(case, top_k):
    kw, block = LOSS_CASES[case]
    assert_loss_matches(make_case(**kw), top_k, block=block)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
def test_embedding_loss_partial_gradients(need):
    assert_loss_matches(make_case(5, d=4, h=6, w=5, q=5), 2, need, block=16)


def test_embedding_loss_degenerate_boxes_and_zero_pixels():
    assert_loss_matches(degenerate_case(6), 3)


def test_embedding_loss_ties_between_filtered_queries():
    """Most queries' boxes miss most pixels: their s = 0 ties in z at the top-K boundary, where
    the kernel keeps the lowest indices and torch.topk may keep others; loss and gradients agree."""
    emb, queries, boxes, target, weight = make_case(13, d=4, h=6, w=7, q=9)
    boxes[3:] = torch.tensor([1.0, 1.0, 3.0, 2.0])
    for top_k in (2, 4):
        assert_loss_matches((emb, queries, boxes, target, weight), top_k)


def test_embedding_loss_all_ignored():
    emb, queries, boxes, target, weight = make_case(7)
    loss, n, grads = run_loss(ciae_loss_triton.embedding_loss, emb, queries, boxes,
                              torch.full_like(target, -1), weight, 5)
    assert loss.item() == 0 and n.item() == 0
    assert all((gr == 0).all() for gr in grads)


@pytest.mark.parametrize("dtype", HALF)
def test_embedding_loss_half_precision(dtype):
    emb, queries, boxes, target, weight = make_case(8, d=8, h=6, w=7, q=5, dtype=torch.float32)
    case = (emb.to(dtype), queries.to(dtype), boxes, target, weight.to(dtype))
    loss, grads = assert_loss_matches(case, 3)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype


def test_embedding_loss_singularity_is_finite():
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[[-1.0]], [[0.0]]])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    loss, grads = assert_loss_matches((emb, queries, boxes, torch.zeros(1, 1, dtype=torch.int64),
                                       torch.ones(1, 1)), 2)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("target_of_the_pixel", [1, -1], ids=["counted", "ignored"])
def test_embedding_loss_of_a_nan_embedding_is_nan_as_the_twins(target_of_the_pixel):
    """A pixel's NaN embedding makes the loss NaN, counted pixel or ignored, as the twin's (its
    top-k keeps NaN, and an ignored pixel's weight 0 times NaN is NaN), so that a diverging
    embedding reaches the training's non-finite check; the kernel's max dropped the NaN (a
    finite loss)."""
    emb, queries, boxes, target, weight = make_case(9, d=4, h=5, w=6, q=5)
    target[2, 3] = target_of_the_pixel
    emb[:, 2, 3] = float("nan")
    for fn in (ciae_loss_triton.embedding_loss, twin_loss):
        loss, n = fn(emb.to(DEV), queries.to(DEV), boxes.to(DEV), target.to(DEV), weight.to(DEV), MARGIN, 3)
        assert loss.isnan(), fn.__module__


def test_embedding_loss_gradcheck():
    emb, queries, boxes, target, weight = (x.to(DEV) for x in make_case(9, d=3, h=3, w=4, q=3))
    fn = lambda e, q, wt: ciae_loss_triton.embedding_loss(e, q, boxes, target, wt, MARGIN, 2)[0]
    assert torch.autograd.gradcheck(fn, (emb.requires_grad_(), queries.requires_grad_(),
                                         weight.requires_grad_()))


def toy_batch(seed, dtype=torch.float32):
    """Two 7x9 images: 2 stuff classes, instances, void and a crowd region (as the CIAE tests)."""
    g = torch.Generator().manual_seed(seed)
    b, h, w, c_st = 2, 7, 9, 2
    seg = torch.randint(0, c_st, (b, h, w), generator=g)
    seg[0, 1:4, 2:5] = c_st
    seg[0, 4:6, 6:9] = c_st + 1
    seg[1, 2:6, 1:3] = c_st
    seg[1, 0, :] = -1
    seg[0, 6, 0:2] = -1
    sem = torch.where(seg >= c_st, torch.full_like(seg, c_st), seg)
    sem[1, 0, :] = 255
    sem[0, 6, 0:2] = c_st
    boxes = [torch.tensor([[2.0, 1, 5, 4], [6, 4, 9, 6]]), torch.tensor([[1.0, 2, 3, 6]])]
    emb = torch.randn(b, 4, h, w, generator=g).to(dtype)
    memory = F.normalize(torch.randn(c_st + 1, 4, generator=g), dim=1).to(dtype)
    return emb, sem, seg, boxes, memory, c_st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_ciae_loss_triton_equals_torch(dtype):
    emb, sem, seg, boxes, memory, c_st = toy_batch(1, dtype)
    cfg = EmbeddingConfig()
    out = {}
    for backend in ("triton", "torch"):
        e = emb.to(DEV).clone().requires_grad_()
        res = ciae_loss(e, sem.to(DEV), seg.to(DEV), [x.to(DEV) for x in boxes], memory.to(DEV),
                        c_st, cfg, backend=backend)
        res["loss_ciae"].backward()
        out[backend] = res, e.grad
    (res, grad), (ref, ref_grad) = out["triton"], out["torch"]
    tol = tol_for(dtype)
    for key in ("loss_cae", "loss_iae", "loss_ciae"):
        close(res[key].detach(), ref[key].detach(), tol)
    assert grad.dtype == dtype and grad.abs().sum() > 0
    close(grad, ref_grad, tol)
    sums = {backend: category_sums(emb.to(DEV), sem.to(DEV), c_st + 1, backend=backend)
            for backend in ("triton", "torch")}
    for got, want in zip(sums["triton"], sums["torch"]):
        close(got, want, tol)


# ---- assignment ---------------------------------------------------------------------------------

def reference_similarity(emb, queries, boxes):
    """[H * W, Q] float64 filtered similarities of a full-resolution [D, H, W] map."""
    d, h, w = emb.shape
    p = F.normalize(emb.double().reshape(d, -1).T, dim=1)
    s = p @ queries.double().cpu().T
    y = torch.arange(h, dtype=torch.float32)[:, None, None]
    x = torch.arange(w, dtype=torch.float32)[None, :, None]
    b = boxes.float().cpu()
    inside = (x >= b[:, 0]) & (x < b[:, 2]) & (y >= b[:, 1]) & (y < b[:, 3])
    return torch.where(inside.reshape(h * w, -1), s, 0.0)


def assert_assignment_matches(out, ref, sim, gap_tol=1e-4, best_tol=1e-5):
    """Labels equal where the reference's two best similarities (sim [H * W, Q] float64) are more
    than gap_tol apart or exactly equal (queries filtered out, all 0: the lowest index wins);
    elsewhere the label is one of the near-best; best and second-best values close."""
    labels, best, second = (x.cpu().reshape(-1) for x in out)
    ref_labels, ref_best, ref_second = (x.cpu().reshape(-1) for x in ref)
    assert labels.dtype == torch.int64 and best.dtype == second.dtype == torch.float32
    torch.testing.assert_close(second, ref_second, rtol=best_tol, atol=best_tol)
    top = torch.cat([sim, torch.full_like(sim[:, :1], -2)], 1).topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    clear = (gap > gap_tol) | (gap == 0)
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[clear], ref_labels[clear])
    assert (sim.gather(1, labels[:, None])[:, 0] >= top[:, 0] - gap_tol).all()
    torch.testing.assert_close(best, ref_best, rtol=best_tol, atol=best_tol)


@pytest.mark.parametrize("d,h,w,q,dtype,block", [
    (4, 7, 5, 6, torch.float32, None),
    (5, 9, 13, 1, torch.float32, 16),          # one query
    (33, 6, 11, 21, torch.float32, 16),        # D, Q past a power of two
    (8, 7, 9, 5, torch.float16, None),
    (8, 7, 9, 5, torch.bfloat16, 32),
    (4, 5, 6, 7, torch.float64, None),
])
def test_assign_matches_twin(d, h, w, q, dtype, block):
    emb, queries, boxes, _, _ = make_case(10 + d, d=d, h=h, w=w, q=q, dtype=torch.float32)
    if q > 3:
        boxes[3] = torch.tensor([2.0, 2.0, 2.0, 6.0])         # degenerate: never inside
    emb = (3 * emb).to(dtype)
    out = assign_triton.assign(emb.to(DEV), queries.to(DEV), boxes.to(DEV), block=block)
    ref = twin_assign(emb, queries, boxes)
    assert_assignment_matches(out, ref, reference_similarity(emb, queries, boxes),
                              best_tol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-3)


def test_assign_ties_take_the_lowest_index_and_filter_scores_zero():
    d = torch.tensor([1.0, 0.0])
    queries = torch.stack([torch.tensor([0.0, 1.0]), d, d, d]).to(DEV)
    emb = d[:, None, None].expand(2, 2, 3).clone().to(DEV)
    boxes = torch.tensor([[0, 0, 3, 2], [1, 0, 3, 1], [0, 0, 3, 2], [0, 0, 3, 2]],
                         dtype=torch.float32, device=DEV)
    labels, best, second = assign_triton.assign(emb, queries, boxes)
    assert labels.tolist() == [[2, 1, 1], [2, 2, 2]]
    assert torch.allclose(best.cpu(), torch.ones(2, 3)) and torch.allclose(second.cpu(), torch.ones(2, 3))
    labels, best, second = assign_triton.assign(-emb, torch.stack([d, -d]).to(DEV),
                                                torch.tensor([[0, 0, 3, 2], [0, 0, 1, 2.0]], device=DEV))
    assert labels.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert best.tolist() == [[1, 0, 0], [1, 0, 0]]
    assert second.tolist() == [[-1, -1, -1], [-1, -1, -1]]


@pytest.mark.parametrize("lowres,out,dtype,block", [
    ((3, 4), (12, 16), torch.float32, None), ((5, 4), (17, 13), torch.float32, 16),
    ((4, 6), (4, 6), torch.float32, None), ((6, 3), (9, 11), torch.float16, 32),
    ((4, 5), (16, 20), torch.bfloat16, None),
])
def test_assign_upsampled_matches_twin(lowres, out, dtype, block):
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(5, *lowres, generator=g).to(dtype)
    queries = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    boxes = torch.tensor([[0, 0, out[1], out[0]]] * 3 + [[1, 2, 7, 9], [0.5, 0, 3, 4],
                                                           [4, 4, 4, 9], [2, 1, 11, 5]],
                         dtype=torch.float32)
    res = assign_triton.assign_upsampled(emb.to(DEV), out, queries.to(DEV), boxes.to(DEV),
                                         block=block)
    ref = twin_assign_upsampled(emb, out, queries, boxes)
    full = F.interpolate(emb[None].float(), size=out, mode="bilinear", align_corners=False)[0]
    assert_assignment_matches(res, ref, reference_similarity(full, queries, boxes))


@pytest.mark.parametrize("upsampled", [False, True], ids=["assign", "assign_upsampled"])
def test_assign_loops_over_query_tiles_up_to_each_images_last_valid_query(upsampled):
    """150 queries, three tiles of 64, in one batch of three images: every query valid; a sparse
    set ending in the second tile (the third tile is never computed); none (label 0, best -inf,
    second -1). Query 140 equals query 3 (box included): where they win, the tie across tiles
    goes to 3 and the second best equals the best."""
    g = torch.Generator().manual_seed(5)
    b, d, q = 3, 6, 150
    size, out = ((5, 7), (20, 28)) if upsampled else ((9, 13), (9, 13))
    emb = torch.randn(b, d, *size, generator=g)
    queries = F.normalize(torch.randn(b, q, d, generator=g), dim=-1)
    xy = torch.rand(b, q, 2, generator=g) * torch.tensor([out[1], out[0]])
    boxes = torch.cat([xy, xy + torch.rand(b, q, 2, generator=g) * 20 + 2], -1)
    boxes[:, :10] = torch.tensor([0.0, 0.0, out[1], out[0]])
    queries[:, 3] = F.normalize(emb[:, :, 0, 0], dim=-1)       # pixel (0, 0)'s own direction
    queries[:, 140], boxes[:, 140] = queries[:, 3], boxes[:, 3]
    valid = torch.ones(b, q, dtype=torch.bool)
    valid[1] = torch.rand(q, generator=g) < 0.3
    valid[1, 100:] = False
    valid[2] = False
    if upsampled:
        res = assign_triton.assign_upsampled(emb.to(DEV), out, queries.to(DEV), boxes.to(DEV),
                                             valid=valid.to(DEV), block=32)
    else:
        res = assign_triton.assign(emb.to(DEV), queries.to(DEV), boxes.to(DEV), valid=valid.to(DEV),
                                   block=16)
    for i in range(2):
        twin = (twin_assign_upsampled(emb[i], out, queries[i], boxes[i], valid=valid[i]) if upsampled
                else twin_assign(emb[i], queries[i], boxes[i], valid=valid[i]))
        full = F.interpolate(emb[i][None], size=out, mode="bilinear", align_corners=False)[0] \
            if upsampled else emb[i]
        sim = reference_similarity(full, queries[i], boxes[i]).masked_fill(~valid[i], float("-inf"))
        assert_assignment_matches([x[i] for x in res], twin, sim)
    end = assign_triton._batch(emb, queries, boxes, valid)[-1]             # where each loop stops
    assert end.tolist() == [q, int(valid[1].nonzero().max()) + 1, 0] and end[1] <= 128
    tie = res[0][0] == 3
    assert tie.any() and (res[1][0][tie] == res[2][0][tie]).all()
    assert (res[0][1] < 100).all() and valid[1][res[0][1]].all()
    assert (res[0][2] == 0).all() and (res[1][2] == float("-inf")).all() and (res[2][2] == -1).all()


# ---- layouts: planes, pixel-major, other strides --------------------------------------------------

def pixel_major(x):
    """x [..., D, H, W] with the same values laid out pixel by pixel (channels-last)."""
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)


def strided(x):
    """x [..., D, H, W] with the same values as every other column of a wider map (neither
    planes nor pixel-major)."""
    wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    wide[..., ::2] = x
    return wide[..., ::2]


def _loss_run(emb):
    _, queries, boxes, target, weight = make_case(21, d=6, h=9, w=13, q=5, dtype=torch.float32)
    e, q, wt = (t.to(DEV).requires_grad_() for t in (emb, queries, weight))
    loss, n = ciae_loss_triton.embedding_loss(e, q, boxes.to(DEV), target.to(DEV), wt, MARGIN, 2,
                                              block=16)
    return [loss, n], [e, q, wt], loss


def _segment_sums_run(emb):
    labels = torch.randint(-1, 4, (emb.shape[0], *emb.shape[2:]), generator=torch.Generator().manual_seed(2))
    e = emb.requires_grad_()
    sums, counts = segment_sums_triton.segment_sums(e, labels.to(DEV), 4, block=16)
    return [sums, counts], [e], (sums * torch.arange(sums.numel(), device=DEV).view_as(sums)).sum()


def _assign_run(emb):
    _, queries, boxes, _, _ = make_case(22, d=6, h=9, w=13, q=5, dtype=torch.float32)
    queries, boxes = (t.to(DEV).expand(emb.shape[0], -1, -1) for t in (queries, boxes))
    out = assign_triton.assign(emb, queries, boxes, block=16)
    return list(out), [], None


def _assign_upsampled_run(emb):
    _, queries, boxes, _, _ = make_case(23, d=6, h=18, w=26, q=5, dtype=torch.float32)
    queries, boxes = (t.to(DEV).expand(emb.shape[0], -1, -1) for t in (queries, boxes))
    out = assign_triton.assign_upsampled(emb, (18, 26), queries, boxes, block=32)
    return list(out), [], None


LAYOUT_RUNS = {"loss": (_loss_run, (6, 9, 13)), "segment_sums": (_segment_sums_run, (2, 6, 9, 13)),
               "assign": (_assign_run, (2, 6, 9, 13)), "assign_upsampled": (_assign_upsampled_run, (2, 6, 9, 13))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", sorted(LAYOUT_RUNS))
def test_kernels_read_pixel_major_maps_without_a_copy(kernel, dtype):
    """A channels-last (pixel-major) embedding map, as channels-last training and inference make
    them, gives the planar map's outputs and gradients bit for bit, its gradient keeps the map's
    layout, and the launcher issues no more ops than for planes (no copy of the map); any other
    strides are copied to planes first."""
    run, shape = LAYOUT_RUNS[kernel]
    planes = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    results = {}
    for name, emb in (("planes", planes), ("pixels", pixel_major(planes)), ("strided", strided(planes))):
        assert torch.equal(emb, planes)
        emb = emb.detach()                                             # a leaf of its own
        with OpCounter() as counter:
            outs, inputs, objective = run(emb)
            grads = torch.autograd.grad(objective, inputs) if inputs else ()
        results[name] = outs, grads, inputs, counter.ops
    outs, grads, _, ops = results["planes"]
    for name in ("pixels", "strided"):
        other_outs, other_grads, inputs, other_ops = results[name]
        for a, b in zip(outs, other_outs):
            assert torch.equal(a, b), name
        for a, b, x in zip(grads, other_grads, inputs):
            assert torch.equal(a, b), name
            if x.dim() == len(shape):                                  # the map's gradient
                assert b.stride() == (x.stride() if name == "pixels" else planes.stride()), name
    assert results["pixels"][3] == ops, (results["pixels"][3] - ops, ops - results["pixels"][3])
    assert results["strided"][3]["clone"] > ops["clone"]


# ---- group_norm ---------------------------------------------------------------------------------

def run_group_norm(fn, x, groups, weight, bias, relu, probe, **kw):
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = fn(x, groups, weight, bias, relu=relu, **kw)
    grads = torch.autograd.grad((y.float() * probe).sum(), (x, weight, bias))
    return (y.detach(), *grads)


@pytest.mark.parametrize("n,c,h,w,groups,channels_last,relu,block", [
    (2, 16, 5, 7, 4, True, True, None),
    (2, 16, 5, 7, 4, False, True, 2),         # contiguous; several chunks and tiles per image
    (3, 24, 9, 4, 24, True, False, 4),        # one channel per group, no ReLU
    (1, 12, 6, 6, 1, True, True, 8),          # one group; C not a power of two
    (2, 8, 1, 1, 2, True, True, None),        # one pixel (P7 of a small image)
])
def test_group_norm_matches_twin(n, c, h, w, groups, channels_last, relu, block):
    g = torch.Generator().manual_seed(n * c + h)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2, c, generator=g, dtype=torch.float64)
    probe = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(DEV)
    args = [t.to(DEV) for t in (x, weight, bias)]
    got = run_group_norm(group_norm_triton.group_norm, *args[:1], groups, *args[1:], relu, probe, block=block)
    ref = run_group_norm(twin_group_norm, *args[:1], groups, *args[1:], relu, probe)
    for a, b in zip(got, ref):
        close(a, b, 1e-9)
    assert got[0].stride() == args[0].stride() and got[1].stride() == args[0].stride()


def test_group_norm_float32_statistics_survive_a_large_mean():
    """Float32 sums of x and x^2 over a group whose mean is 1000 times its spread would lose the
    variance (E[x^2] - E[x]^2 cancels); shifted by the group's first value they keep it: the
    output is within float32 rounding of a two-pass float64 GroupNorm."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 16, 12, 10, generator=g, dtype=torch.float64) + 1000).contiguous(
        memory_format=torch.channels_last)
    weight, bias = torch.randn(2, 16, generator=g, dtype=torch.float64)
    v = x.reshape(2, 4, -1)
    exact = ((v - v.mean(-1, keepdim=True)) / (v.var(-1, correction=0, keepdim=True) + 1e-5).sqrt())
    exact = exact.view_as(x) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    got = group_norm_triton.group_norm(x.float().to(DEV), 4, weight.float().to(DEV), bias.float().to(DEV),
                                       relu=False, block=8)
    close(got, exact, 2e-3)


def test_group_norm_of_a_constant_group_is_its_bias():
    """Zero variance: the output is relu(bias) and the gradient finite, as the twin's."""
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    x[:, :4] = 3.0                                   # group 0 of both images is constant
    weight, bias = torch.randn(2, 8, dtype=torch.float64)
    probe = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    got = run_group_norm(group_norm_triton.group_norm, x.to(DEV), 2, weight.to(DEV), bias.to(DEV), True,
                         probe.to(DEV))
    ref = run_group_norm(twin_group_norm, x, 2, weight, bias, True, probe)
    close(got[0][:, :4], bias[:4].relu().view(1, 4, 1, 1).expand(2, 4, 4, 4), 1e-9)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        close(a, b, 1e-6)


def test_group_norm_keeps_nan_as_the_twin():
    """A NaN in a group makes the group's output NaN through the ReLU, and the ReLU passes a NaN's
    gradient, as PyTorch's (the kernel's ReLU turned the group to 0: a diverging map vanished)."""
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    x[0, 1, 2, 2] = float("nan")                       # group 0 of 2
    weight, bias = torch.randn(2, 8, dtype=torch.float64)
    probe = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    got = run_group_norm(group_norm_triton.group_norm, x.to(DEV), 2, weight.to(DEV), bias.to(DEV), True,
                         probe.to(DEV))
    ref = run_group_norm(twin_group_norm, x, 2, weight, bias, True, probe)
    assert got[0][0, :4].isnan().all() and not got[0][0, 4:].isnan().any()
    for a, b in zip(got[:2], ref[:2]):
        assert torch.equal(a.isnan().cpu(), b.isnan()), (a, b)
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 5)], ids=["no image", "no pixel"])
def test_group_norm_of_an_empty_map(shape):
    x = torch.randn(shape, dtype=torch.float64).to(DEV)
    weight, bias = torch.randn(2, 8, dtype=torch.float64).to(DEV)
    probe = torch.randn(shape, dtype=torch.float64).to(DEV)
    got = run_group_norm(group_norm_triton.group_norm, x, 2, weight, bias, True, probe)
    assert got[0].shape == got[1].shape == shape and not got[2].any() and not got[3].any()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_group_norm_keeps_the_maps_dtype(dtype):
    """A half-precision map stays in its dtype and layout, within a rounding of the twin's output
    (which normalises in float32 too; the interpreter truncates float32 to bfloat16 where a GPU
    rounds to nearest); the gradients of weight and bias stay float32."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 32, 6, 10, generator=g) * 4 + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(2, 32, generator=g)
    probe = torch.randn(2, 32, 6, 10, generator=g).to(DEV)
    got = run_group_norm(group_norm_triton.group_norm, x.to(DEV), 8, weight.to(DEV), bias.to(DEV), True, probe)
    ref = run_group_norm(twin_group_norm, x.to(DEV), 8, weight.to(DEV), bias.to(DEV), True, probe)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    tol = tol_for(dtype)
    for a, b in zip(got, ref):
        close(a, b, tol)


def test_the_models_group_norms_run_the_kernels_and_train_as_the_twins(monkeypatch):
    """Every GroupNorm (the backbone's, and with its ReLU the head's towers' and the embedding
    branch's) goes through the backend the model is given: with "triton", a training forward and
    backward of a channels-last model equals the twins' (losses and every parameter's gradient)."""
    from test_device_discipline import tiny_config, toy_batch

    from ciae.modeling.backbone import GroupNorm2d
    from ciae.modeling.model import CIAEModel

    calls = []
    kernel = group_norm_triton.group_norm
    monkeypatch.setitem(dispatch.BACKENDS, "triton", dataclasses.replace(
        dispatch.BACKENDS["triton"], group_norm=lambda *a: calls.append(1) or kernel(*a)))
    batch = {k: v.to(DEV) if torch.is_tensor(v) else [t.to(DEV) for t in v] if isinstance(v, list) and v
             and torch.is_tensor(v[0]) else v for k, v in toy_batch(2, 64, 96).items()}
    results = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = CIAEModel(tiny_config(), stuff_ids=[184, 187], thing_ids=[1, 3]).to(DEV)
        model = model.to(memory_format=torch.channels_last)
        # GroupNorm biases off zero: on a 1x1 P7 with one channel per group the normalised value
        # is 0, and a zero bias would put the ReLU on its kink, where rounding picks the gradient
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.bias") or ("_tower." in name and name.endswith("bias")):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        model.kernel_backend = backend
        out = model(batch, memory_step=(0, 10))
        out["loss"].backward()
        results[backend] = out, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    cfg = tiny_config()
    backbone = sum(isinstance(m, GroupNorm2d) for m in model.backbone.modules())     # "gn" here
    assert backbone and len(calls) == 2 * cfg.fcos.num_convs * len(cfg.fcos.strides) + 7 + backbone
    (out, grads), (ref, ref_grads) = results["triton"], results["torch"]
    for key in ("loss", "loss_cls", "loss_ciae"):
        close(out[key].detach(), ref[key].detach(), 1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        close(grads[name], ref_grads[name], 1e-3)


# ---- channel_affine -----------------------------------------------------------------------------

def run_channel_affine(fn, x, scale, shift, residual, residual_scale, residual_shift, relu, probe, **kw):
    """The output and the gradients of x and the residual (None where there is none)."""
    x = x.clone().requires_grad_()
    r = None if residual is None else residual.clone().requires_grad_()
    y = fn(x, scale, shift, r, residual_scale, residual_shift, relu, **kw)
    inputs = (x,) if r is None else (x, r)
    grads = torch.autograd.grad((y.float() * probe).sum(), inputs)
    return y.detach(), *grads, *([None] if r is None else [])


def affine_case(seed, shape, dtype=torch.float64, channels_last=True, residual="affine"):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r, probe = (torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
    c = shape[1]
    scale, shift, r_scale, r_shift = (torch.randn(c, 1, 1, generator=g).to(dtype) for _ in range(4))
    res = {"none": (None, None, None), "plain": (r, None, None), "affine": (r, r_scale, r_shift)}[residual]
    return [t if t is None else t.to(DEV) for t in (x, scale, shift, *res)], probe.float().to(DEV)


@pytest.mark.parametrize("shape,channels_last,residual,relu,block", [
    ((2, 16, 5, 7), True, "affine", True, None),      # a bottleneck's end with its projection
    ((2, 16, 5, 7), False, "affine", True, 4),        # contiguous; several tiles per image
    ((2, 24, 9, 16), False, "plain", True, 128),      # contiguous, 8 channels per tile (3 blocks)
    ((3, 24, 9, 4), True, "plain", True, 8),          # the identity shortcut; C not a power of two
    ((1, 12, 6, 6), True, "none", True, 16),          # norm + ReLU
    ((2, 8, 3, 5), False, "none", False, None),       # the norm alone
    ((2, 8, 1, 1), True, "plain", False, None),       # one pixel, no ReLU
])
def test_channel_affine_matches_twin(shape, channels_last, residual, relu, block):
    """Output and the gradients of x and the residual, float64, every residual kind and layout;
    the output and the gradients keep the map's layout."""
    args, probe = affine_case(sum(shape), shape, channels_last=channels_last, residual=residual)
    got = run_channel_affine(channel_affine_triton.channel_affine, *args, relu, probe, block=block)
    ref = run_channel_affine(twin_channel_affine, *args, relu, probe)
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
            continue
        close(a, b, 1e-12)
        assert a.stride() == args[0].stride()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_channel_affine_keeps_the_maps_dtype_and_rounds_once(dtype):
    """A half-precision map and its residual stay in their dtype; the kernel computes in float32
    and rounds once, so it is within a rounding of the float64 result (the twin, in the map's
    dtype, rounds after each of its four operations: within a few)."""
    args, probe = affine_case(7, (2, 32, 6, 10), dtype=dtype)
    got = run_channel_affine(channel_affine_triton.channel_affine, *args, True, probe)
    exact = run_channel_affine(twin_channel_affine, *[t.double() for t in args], True, probe.double())
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, exact):
        close(a.float(), b.float(), {torch.float32: 1e-5}.get(dtype, 1e-2))


def test_channel_affine_keeps_nan_and_cuts_at_zero_as_relu():
    """relu(NaN) is NaN, as PyTorch's; a zero or negative output passes no gradient, a NaN one
    passes it (``threshold_backward``'s rule), as the twin."""
    x = torch.tensor([[[[float("nan"), -1.0, 0.0, 2.0]]]], dtype=torch.float64).to(DEV)
    one, zero = x.new_ones(1, 1, 1), x.new_zeros(1, 1, 1)
    probe = torch.ones_like(x).float()
    got = run_channel_affine(channel_affine_triton.channel_affine, x, one, zero, None, None, None, True, probe)
    ref = run_channel_affine(twin_channel_affine, x, one, zero, None, None, None, True, probe)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert got[0][0, 0, 0, 0].isnan() and got[1].flatten().tolist()[1:] == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 5)], ids=["no image", "no pixel"])
def test_channel_affine_of_an_empty_map(shape):
    args, probe = affine_case(1, shape)
    got = run_channel_affine(channel_affine_triton.channel_affine, *args, True, probe)
    assert got[0].shape == got[1].shape == got[2].shape == shape


def test_channel_affine_copies_a_residual_to_the_maps_layout():
    """A contiguous residual beside a channels-last map (and the reverse) gives the twin's values."""
    args, probe = affine_case(3, (2, 16, 4, 6))
    args[3] = args[3].contiguous()
    got = run_channel_affine(channel_affine_triton.channel_affine, *args, True, probe)
    ref = run_channel_affine(twin_channel_affine, *args, True, probe)
    for a, b in zip(got, ref):
        close(a, b, 1e-12)


def test_the_models_frozen_batchnorms_run_one_kernel_each_and_train_as_the_twins():
    """The paper's backbone (frozen BatchNorm, ``freeze_at`` 2), channels-last: with "triton",
    each norm and what follows it is one kernel launch (a bottleneck's end takes its shortcut's
    norm along), no ``addcmul``, ``add_`` or ``relu_`` is left, and a forward and backward give
    the twins' features and gradients."""
    from ciae.modeling.backbone import FrozenBatchNorm2d, ResNet

    results = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        net = ResNet(50, width=4, norm="frozen_bn", freeze_at=2).to(DEV).double()
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):     # statistics off 0 / 1, so every term counts
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.1)
                m.backend = backend
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = x.to(DEV).contiguous(memory_format=torch.channels_last)
        with OpCounter() as counter:
            out = net(x)
            sum((v * v).sum() for v in out.values()).backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        results[backend] = out, grads, counter.ops
    (out, grads, ops), (ref_out, ref_grads, ref_ops) = results["triton"], results["torch"]
    for level in out:
        close(out[level], ref_out[level], 1e-9)
        assert out[level].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(grads, ref_grads):
        close(a, b, 1e-9)
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert ops["triton:_forward_kernel"] == norms - 4      # the four projections' norms ride along
    assert not (ops["addcmul"] or ops["add_"] or ops["relu_"]), ops
    assert ref_ops["addcmul"] == norms


@pytest.mark.parametrize("script,impls,tol", [("group_norm", ("autocast", "twin", "triton"), 0.05),
                                               ("channel_affine", ("twin", "triton"), 0.1)])
def test_norm_benchmarks_run(script, impls, tol):
    """``benchmarks/kernels/{group_norm,channel_affine}.py --smoke``: every implementation and
    pass of each map, each within bfloat16 rounding of float64 (the interpreter truncates where a
    GPU rounds; its times mean nothing on the CPU)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / f"{script}.py"
    out = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and " ms " not in line
            and "---" not in line]
    passes = ("forward", "forward + backward")
    assert [(r[1].strip(), r[2].strip()) for r in rows[:2 * len(impls)]] == [
        (impl, what) for impl in impls for what in passes]
    assert len(rows) == 12 and all(float(r[-1]) < tol for r in rows)


@pytest.mark.parametrize("dtype,layout", [("bf16", "pixels"), ("fp32", "planes")])
def test_every_kernel_compiles_for_a_gpu(dtype, layout):
    """``benchmarks/kernels/resources.py``: every kernel compiled for sm_90 as the JIT compiles a
    COCO-sized launch, with Triton's bundled ptxas, no GPU needed. The interpreter runs code a GPU
    compile rejects (a loop-carried value whose type changes in the loop did), so the device
    path is compiled here too."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "resources.py"
    run = subprocess.run([sys.executable, str(script), "--dtype", dtype, "--layout", layout],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()
            if line.startswith("| ") and "---" not in line and "kernel" not in line]
    assert {r[0].strip() for r in rows} == {
        "loss forward", "loss backward de", "loss backward de+dq", "loss backward de+dq+dw",
        "assign", "assign_upsampled", "segment_sums forward", "segment_sums backward",
        "group_norm statistics", "group_norm apply", "group_norm backward sums",
        "group_norm backward dx", "channel_affine forward", "channel_affine backward"}
    assert all(0 < int(r[4]) <= 255 for r in rows)                            # registers


# ---- dispatch ----------------------------------------------------------------------------------

def test_dispatch_lists_triton_first_and_auto_keeps_cpu_on_the_twin():
    assert list(dispatch.BACKENDS) == ["triton", "torch"]
    assert dispatch.BACKENDS["triton"].accepts(SimpleNamespace(is_cuda=True))
    cpu = torch.zeros(1)
    assert not dispatch.BACKENDS["triton"].accepts(cpu)
    assert dispatch._pick("auto", cpu) is dispatch.BACKENDS["torch"]


def test_dispatch_forces_each_backend():
    emb, queries, boxes, target, weight = (x.to(DEV) for x in make_case(12, dtype=torch.float32))
    for name in ("triton", "torch"):
        loss, _ = kernels.embedding_loss(emb, queries, boxes, target, weight, MARGIN, 5,
                                         backend=name)
        close(loss, twin_loss(emb.cpu(), queries.cpu(), boxes.cpu(), target.cpu(), weight.cpu(),
                              MARGIN, 5)[0], 1e-4)
        sums, _ = kernels.segment_sums(emb[None], target[None], 4, backend=name)
        close(sums, twin_segment_sums(emb[None].cpu(), target[None].cpu(), 4)[0], 1e-5)


def test_kernels_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import kernels\n"
            "assert list(kernels.BACKENDS) == ['torch'], list(kernels.BACKENDS)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
