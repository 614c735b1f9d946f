"""The assignment's ``valid`` queries and batches (``kernels.assign`` and ``kernels.assign_triton``
through ``kernels.dispatch``): an invalid query (a batch's padding) scores -inf, never a label nor
a second best, even where every valid query scores below the 0 that a query gets outside its box;
a batch equals its images one by one; the Triton kernels agree with the twin (under the
interpreter on a CPU-only machine, as tests/test_kernels_triton.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels import dispatch  # noqa: E402
from kernel_cases import make_case  # noqa: E402
from test_kernels_triton import DEV, assert_assignment_matches, reference_similarity  # noqa: E402

BACKENDS = ("torch", "triton")


def padded_case(seed, d=6, h=9, w=11, q=7):
    """``make_case``'s queries with about half of them invalid, among them query 0 (the one
    covering the image), and an invalid query equal to a pixel's direction over the whole map:
    every pixel would score 1 with it. -> emb [D, H, W], queries [Q + 1, D], boxes [Q + 1, 4],
    valid [Q + 1]."""
    emb, queries, boxes, _, _ = make_case(seed, d=d, h=h, w=w, q=q, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(q, generator=g) < 0.5
    valid[0], valid[1] = False, True
    queries = torch.cat([queries, F.normalize(emb[:, 0, 0], dim=0)[None]])
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0, w, h]])])
    return emb, queries, boxes, torch.cat([valid, torch.tensor([False])])


def valid_reference(emb, queries, boxes, valid):
    """The twin on the valid queries alone, labels mapped back to all of them."""
    idx = valid.nonzero()[:, 0]
    labels, best, second = dispatch.assign(emb, queries[idx], boxes[idx], backend="torch")
    return idx[labels], best, second


def valid_similarity(emb, queries, boxes, valid):
    sim = reference_similarity(emb, queries, boxes)
    sim[:, ~valid] = float("-inf")
    return sim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invalid_queries_never_win_nor_come_second(backend, seed):
    emb, queries, boxes, valid = padded_case(seed)
    out = dispatch.assign(emb.to(DEV), queries.to(DEV), boxes.to(DEV), valid=valid.to(DEV),
                          backend=backend)
    ref = valid_reference(emb, queries, boxes, valid)
    if backend == "torch":
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert_assignment_matches(out, ref, valid_similarity(emb, queries, boxes, valid))
    assert valid[out[0].cpu()].all()
    # without the mask the padding takes pixels
    assert not valid[dispatch.assign(emb, queries, boxes, backend=backend)[0]].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_invalid_query_outside_its_box_does_not_beat_negative_similarities(backend):
    """A pixel whose every in-box similarity is negative: a query outside its box (0) would take
    it if valid; invalid, it scores -inf and the pixel keeps its best valid query."""
    d = torch.tensor([1.0, 0.0])
    emb = (-d)[:, None, None].expand(2, 2, 3).clone().to(DEV)
    queries = torch.stack([d, torch.tensor([0.6, 0.8]), d]).to(DEV)       # cosines -1, -0.6, -1
    boxes = torch.tensor([[0, 0, 3, 2], [0, 0, 3, 2], [0, 0, 0, 0]], dtype=torch.float32, device=DEV)
    labels, best, second = dispatch.assign(emb, queries, boxes, backend=backend)
    assert (labels == 2).all()                                           # 0 outside its box wins
    valid = torch.tensor([True, True, False], device=DEV)
    labels, best, second = dispatch.assign(emb, queries, boxes, valid=valid, backend=backend)
    assert (labels == 1).all()
    torch.testing.assert_close(best.cpu(), torch.full((2, 3), -0.6))
    torch.testing.assert_close(second.cpu(), torch.full((2, 3), -1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_query(backend):
    emb, queries, boxes, valid = padded_case(3)
    labels, best, second = dispatch.assign(emb.to(DEV), queries.to(DEV), boxes.to(DEV),
                                           valid=torch.zeros_like(valid).to(DEV), backend=backend)
    assert (labels == 0).all() and (best == float("-inf")).all() and (second == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_is_its_images(backend):
    cases = [padded_case(seed) for seed in (4, 5, 6)]
    emb, queries, boxes, valid = (torch.stack(x).to(DEV) for x in zip(*cases))
    valid[2] = False                                            # an image without valid queries
    lowres = emb[:, :, ::3, ::3].contiguous()
    batched = dispatch.assign(emb, queries, boxes, valid=valid, backend=backend)
    upsampled = dispatch.assign_upsampled(lowres, (9, 11), queries, boxes, valid=valid, backend=backend)
    assert batched[0].shape == upsampled[0].shape == (3, 9, 11)
    for i in range(3):
        one = dispatch.assign(emb[i], queries[i], boxes[i], valid=valid[i], backend=backend)
        assert all(torch.equal(a[i], b) for a, b in zip(batched, one))
        one = dispatch.assign_upsampled(lowres[i], (9, 11), queries[i], boxes[i], valid=valid[i],
                                        backend=backend)
        assert all(torch.equal(a[i], b) for a, b in zip(upsampled, one))


@pytest.mark.parametrize("lowres,out,block", [((3, 4), (12, 16), None), ((5, 4), (17, 13), 16)])
def test_triton_upsampled_with_valid_matches_twin(lowres, out, block):
    from kernels import assign_triton

    g = torch.Generator().manual_seed(11)
    emb = torch.randn(2, 5, *lowres, generator=g)
    queries = F.normalize(torch.randn(2, 7, 5, generator=g), dim=2)
    boxes = torch.tensor([[0, 0, out[1], out[0]]] * 3 + [[1, 2, 7, 9], [0.5, 0, 3, 4],
                                                         [4, 4, 4, 9], [2, 1, 11, 5]],
                         dtype=torch.float32).expand(2, 7, 4)
    valid = torch.tensor([[True, False, True, True, False, True, False],
                          [False, True, True, False, True, True, True]])
    res = assign_triton.assign_upsampled(emb.to(DEV), out, queries.to(DEV), boxes.to(DEV),
                                         valid=valid.to(DEV), block=block)
    ref = dispatch.assign_upsampled(emb, out, queries, boxes, valid=valid, backend="torch")
    full = F.interpolate(emb, size=out, mode="bilinear", align_corners=False)
    for i in range(2):
        assert_assignment_matches([x[i] for x in res], [x[i] for x in ref],
                                  valid_similarity(full[i], queries[i], boxes[i], valid[i]))


def test_dispatch_checks_valid_and_batches():
    emb, queries, boxes, valid = padded_case(7)
    with pytest.raises(ValueError, match="valid must be"):
        dispatch.assign(emb, queries, boxes, valid=valid[:-1])
    with pytest.raises(ValueError, match="valid must be"):
        dispatch.assign(emb, queries, boxes, valid=valid.int())
    with pytest.raises(ValueError, match="a batch's"):
        dispatch.assign(emb[None], queries, boxes)
    with pytest.raises(ValueError, match="queries must be"):
        dispatch.assign_upsampled(emb[None], (9, 11), queries[None, :, :2], boxes[None])
