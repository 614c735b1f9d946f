"""Batched greedy NMS: the twins (``kernels.nms``) against the greedy NMS of before, one box at a
time (``greedy_reference``), and plain Python loops, the Triton kernels (``kernels.nms_triton``,
interpreted on a CPU) against the twins, their lack of host syncs, and the dispatcher's checks.

Cases mix boxes on a small integer grid (exact score ties, duplicates, IoUs exactly at 0.5,
0.6 and 0.7, empty and inverted boxes) with float32 boxes with fractional corners, several
classes, invalid boxes and an all-invalid image.
"""

from __future__ import annotations

import pytest
import torch

from ciae.modeling.box_ops import box_iou
from ciae.utils.opcount import OpCounter
from kernels import dispatch
from kernels import nms as twin

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif("triton" not in dispatch.BACKENDS, reason="triton not importable")


def make_case(seed, b, n, num_classes=3, valid_frac=0.8):
    """boxes [b, n, 4] float32, scores [b, n] (8 levels: many ties), classes [b, n] int64,
    valid [b, n] bool (the last image all invalid when b > 1)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 8, (b, n, 2), generator=g).float()
    grid = torch.cat([lo, lo + torch.randint(0, 11, (b, n, 2), generator=g)], -1)
    xy = torch.rand(b, n, 2, generator=g) * 30 - 5
    free = torch.cat([xy, xy + torch.rand(b, n, 2, generator=g) * 12], -1)
    boxes = torch.where(torch.rand(b, n, 1, generator=g) < 0.3, free, grid)
    inverted = torch.rand(b, n, generator=g) < 0.05                 # x1 < x0: empty
    boxes[inverted] = boxes[inverted][:, [2, 1, 0, 3]]
    src = (torch.rand(b, n, generator=g) * torch.arange(n)).long()  # an earlier box, or itself
    dup = torch.rand(b, n, 1, generator=g) < 0.1
    boxes = torch.where(dup, boxes.gather(1, src[..., None].expand(-1, -1, 4)), boxes)
    scores = torch.randint(0, 8, (b, n), generator=g).float() / 8
    classes = torch.randint(0, num_classes, (b, n), generator=g)
    valid = torch.rand(b, n, generator=g) < valid_frac
    if b > 1:
        valid[-1] = False
    return boxes, scores, classes, valid


def by_score(scores, *xs):
    """order [b, n] (decreasing score, ties in input order) and each x [b, n, ...] sorted."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order, [x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x))
                   for x in xs]


def greedy_reference(boxes, scores, classes, iou_thresh):
    """The NMS ``ciae.modeling.box_ops.batched_nms`` ran before the kernels, one box at a time: boxes by
    decreasing score (ties in input order), each class moved in float64 by a multiple of the
    boxes' span (so that two classes never overlap), a box kept unless a kept one has IoU >
    ``iou_thresh`` with it -> the kept indices, best first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if len(order) == 0:
        return order
    span = (boxes.max() - boxes.min()).double() + 1
    moved = (boxes.double() + (classes.double() * span)[:, None])[order]
    iou = box_iou(moved, moved).numpy()
    keep = []
    for j in range(len(order)):
        if not (iou[keep, j] > iou_thresh).any():
            keep.append(j)
    return order[keep]


def assert_keeps_as_greedy_nms(fn, boxes, scores, classes, valid, iou_thresh):
    """fn(sorted boxes, classes, valid, iou_thresh) keeps, per image, the original indices
    the greedy NMS of before (``greedy_reference``) keeps of the image's valid boxes, in the same
    order; returns them."""
    order, (sboxes, sclasses, svalid) = by_score(scores, boxes, classes, valid)
    keep = fn(sboxes, sclasses, svalid, iou_thresh)
    assert keep.dtype == torch.bool and keep.shape == valid.shape
    kept = [order[i][keep[i].cpu()] for i in range(len(boxes))]
    for i in range(len(boxes)):
        idx = valid[i].nonzero()[:, 0]
        ref = idx[greedy_reference(boxes[i, idx], scores[i, idx], classes[i, idx], iou_thresh)]
        assert torch.equal(kept[i], ref), f"image {i}"
    return kept


def exact_threshold_case():
    """One image: pairs (same class) with IoU exactly 0.5, 0.6 and 0.7, a duplicate, a score
    tie, two identical empty boxes, and the same pairs again in another class."""
    pairs = [[0, 0, 4, 1], [0, 0, 2, 1],          # IoU 2/4
             [10, 0, 15, 1], [10, 0, 13, 1],      # IoU 3/5
             [20, 0, 30, 1], [20, 0, 27, 1],      # IoU 7/10
             [40, 0, 43, 2], [40, 0, 43, 2],      # duplicates
             [50, 5, 50, 9], [50, 5, 50, 9]]      # empty (union 0)
    boxes = torch.tensor(pairs * 2, dtype=torch.float32)[None]
    scores = torch.tensor([1.0, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.3] * 2)[None]
    classes = torch.tensor([0] * 10 + [4] * 10)[None]
    return boxes, scores, classes, torch.ones(1, 20, dtype=torch.bool)


def loop_greedy_keep(suppress, valid):
    sup, val = suppress.tolist(), valid.tolist()
    keep = [[False] * len(v) for v in val]
    for b, v in enumerate(val):
        for j in range(len(v)):
            keep[b][j] = v[j] and not any(keep[b][i] and sup[b][i][j] for i in range(j))
    return torch.tensor(keep, dtype=torch.bool).view(valid.shape)


def random_suppress(seed, b, n, density=0.05):
    """suppress [b, n, n] bool with entries below the diagonal too (to be ignored), valid [b, n]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, n, n, generator=g) < density,
            torch.rand(b, n, generator=g) < 0.8)


def sorted_inputs(case):
    boxes, scores, classes, valid = case
    return by_score(scores, boxes, classes, valid)[1]


# ---- the twins ---------------------------------------------------------------------------------

@pytest.mark.parametrize("iou_thresh", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("n", [1, 37, 64, 100, 333])
@pytest.mark.parametrize("seed", range(6))
def test_twin_keeps_what_greedy_nms_keeps(seed, n, iou_thresh):
    assert_keeps_as_greedy_nms(twin.nms, *make_case(seed, 3, n), iou_thresh)


@pytest.mark.parametrize("iou_thresh", [0.3, 0.5, 0.6, 0.7])
def test_twin_at_the_threshold_exactly(iou_thresh):
    kept = set(assert_keeps_as_greedy_nms(twin.nms, *exact_threshold_case(), iou_thresh)[0].tolist())
    for first in (0, 10):                      # the class 0 boxes, then their class 4 copies
        seconds = [first + 1 in kept, first + 3 in kept, first + 5 in kept]   # IoU .5, .6, .7
        assert seconds == [iou <= iou_thresh for iou in (0.5, 0.6, 0.7)]
        assert {first, first + 2, first + 4, first + 6, first + 8, first + 9} <= kept
        assert first + 7 not in kept


def test_twin_large_batch_many_blocks():
    """N over several blocks, float boxes from 80 classes, 10% and all valid."""
    g = torch.Generator().manual_seed(7)
    b, n = 2, 1500
    xy = torch.rand(b, n, 2, generator=g) * 1200
    boxes = torch.cat([xy, xy + torch.rand(b, n, 2, generator=g) * 300], -1)
    scores = torch.rand(b, n, generator=g)
    classes = torch.randint(0, 80, (b, n), generator=g)
    for valid in (torch.rand(b, n, generator=g) < 0.1, torch.ones(b, n, dtype=torch.bool)):
        assert_keeps_as_greedy_nms(twin.nms, boxes, scores, classes, valid, 0.6)


def test_nms_suppression_is_box_iou_per_class():
    boxes, _, classes, _ = make_case(3, 2, 150)
    sup = twin.nms_suppression(boxes, classes, 0.5)
    for i in range(2):
        x = boxes[i].double()
        ref = ((box_iou(x, x) > 0.5) & (classes[i, :, None] == classes[i])).triu(1)
        assert torch.equal(sup[i], ref)


@pytest.mark.parametrize("n", [1, 5, 64, 100, 300])
def test_greedy_keep_twin_matches_loop(n):
    suppress, valid = random_suppress(n, 3, n)
    assert torch.equal(twin.greedy_keep(suppress, valid), loop_greedy_keep(suppress, valid))


def test_twin_nms_is_greedy_keep_of_the_suppression():
    boxes, classes, valid = sorted_inputs(make_case(11, 3, 200))
    assert torch.equal(twin.nms(boxes, classes, valid, 0.5),
                       twin.greedy_keep(twin.nms_suppression(boxes, classes, 0.5), valid))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 130])
def test_pack_bits(n):
    mask, _ = random_suppress(n, 2, n, density=0.5)
    words = twin.pack_bits(mask)
    assert words.dtype == torch.int64 and words.shape == (2, n, -(-n // 64))
    for b in range(2):
        for i in range(n):
            for w in range(words.shape[2]):
                bits = sum(1 << k for k in range(64) if 64 * w + k < n and mask[b, i, 64 * w + k])
                assert int(words[b, i, w]) == bits - (1 << 64 if bits >> 63 else 0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(backend):
    for b, n in ((2, 0), (0, 3)):
        keep = dispatch.nms(torch.zeros(b, n, 4, device=DEV), torch.zeros(b, n, dtype=torch.int64,
                            device=DEV), torch.ones(b, n, dtype=torch.bool, device=DEV), 0.5,
                            backend=backend)
        assert keep.shape == (b, n) and keep.dtype == torch.bool
        keep = dispatch.greedy_keep(torch.ones(b, n, n, dtype=torch.bool, device=DEV),
                                    torch.ones(b, n, dtype=torch.bool, device=DEV), backend=backend)
        assert keep.shape == (b, n) and keep.dtype == torch.bool


# ---- Triton against the twins ------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("seed,b,n,iou_thresh", [
    (0, 2, 1, 0.5), (1, 3, 63, 0.5), (2, 2, 64, 0.6), (3, 2, 65, 0.7), (4, 3, 130, 0.5),
    (5, 2, 200, 0.6),
])
def test_triton_nms_matches_twin(seed, b, n, iou_thresh):
    from kernels import nms_triton

    boxes, classes, valid = (x.to(DEV) for x in sorted_inputs(make_case(seed, b, n)))
    bits = nms_triton.nms_suppression_bits(boxes, classes, iou_thresh)
    assert torch.equal(bits.cpu(), twin.pack_bits(twin.nms_suppression(boxes, classes,
                                                                       iou_thresh)).cpu())
    keep = nms_triton.nms(boxes, classes, valid, iou_thresh)
    assert torch.equal(keep.cpu(), twin.nms(boxes, classes, valid, iou_thresh).cpu())


@needs_triton
@pytest.mark.parametrize("iou_thresh", [0.5, 0.6, 0.7])
def test_triton_at_the_threshold_keeps_what_greedy_nms_keeps(iou_thresh):
    """A float32 threshold would suppress the pair at IoU 0.7 at iou_thresh = 0.7."""
    fn = lambda *args: dispatch.nms(*(x.to(DEV) for x in args[:3]), args[3], backend="triton")
    assert_keeps_as_greedy_nms(fn, *exact_threshold_case(), iou_thresh)


@needs_triton
def test_triton_sign_bit_words():
    """Boxes 63 and 127 (bit 63 of their words) suppressed, kept, or the only valid ones."""
    n = 130
    boxes = torch.tensor([0.0, 0.0, 4.0, 4.0]).expand(3, n, 4).contiguous()
    classes = torch.zeros(3, n, dtype=torch.int64)
    classes[1, 64:] = 1                                  # two groups: keeps 0 and 64
    classes[2, 63], classes[2, 127] = 2, 3               # own classes: 63 and 127 kept
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, :63] = False                                # image 0 starts at box 63
    keep = dispatch.nms(boxes.to(DEV), classes.to(DEV), valid.to(DEV), 0.5, backend="triton")
    expected = torch.zeros(3, n, dtype=torch.bool)
    expected[0, 63] = expected[1, 0] = expected[1, 64] = True
    expected[2, [0, 63, 127]] = True
    assert torch.equal(keep.cpu(), expected)
    assert torch.equal(twin.nms(boxes, classes, valid, 0.5), expected)


@needs_triton
@pytest.mark.parametrize("n", [1, 64, 100, 130])
def test_triton_greedy_keep_matches_twin(n):
    from kernels import nms_triton

    suppress, valid = random_suppress(100 + n, 3, n)
    keep = nms_triton.greedy_keep(suppress.to(DEV), valid.to(DEV))
    assert torch.equal(keep.cpu(), twin.greedy_keep(suppress, valid))


@needs_triton
def test_triton_wrappers_make_no_host_sync():
    boxes, classes, valid = (x.to(DEV) for x in sorted_inputs(make_case(9, 2, 70)))
    suppress, keep_valid = (x.to(DEV) for x in random_suppress(9, 2, 70))
    with OpCounter() as c:
        dispatch.nms(boxes, classes, valid, 0.5, backend="triton")
        dispatch.greedy_keep(suppress, keep_valid, backend="triton")
    assert c.num_syncs == 0, c.report()
    assert c.num_ops > 0


# ---- dispatch ----------------------------------------------------------------------------------

def test_dispatch_routes_cpu_to_the_twin():
    boxes, classes, valid = sorted_inputs(make_case(4, 2, 80))
    suppress, keep_valid = random_suppress(4, 2, 80)
    for backend in ("auto", "torch"):
        assert torch.equal(dispatch.nms(boxes, classes, valid, 0.5, backend=backend),
                           twin.nms(boxes, classes, valid, 0.5))
        assert torch.equal(dispatch.greedy_keep(suppress, keep_valid, backend=backend),
                           twin.greedy_keep(suppress, keep_valid))


def test_dispatch_rejects_bad_input():
    boxes = torch.zeros(2, 5, 4)
    classes = torch.zeros(2, 5, dtype=torch.int64)
    valid = torch.ones(2, 5, dtype=torch.bool)
    bad_nms = [
        ((boxes[0], classes, valid, 0.5), "boxes"),
        ((boxes[..., :3], classes, valid, 0.5), "boxes"),
        ((boxes.long(), classes, valid, 0.5), "boxes"),
        ((boxes, classes[:, :4], valid, 0.5), "classes"),
        ((boxes, classes.int(), valid, 0.5), "classes"),
        ((boxes, classes, valid[:1], 0.5), "valid"),
        ((boxes, classes, valid.float(), 0.5), "valid"),
        ((boxes, classes, valid, -0.1), "iou_thresh"),
    ]
    for args, what in bad_nms:
        with pytest.raises(ValueError, match=what):
            dispatch.nms(*args)
    suppress = torch.zeros(2, 5, 5, dtype=torch.bool)
    for args, what in [((suppress[:, :4], valid), "suppress"), ((suppress.float(), valid), "suppress"),
                       ((suppress[0], valid), "suppress"), ((suppress, valid[:, :4]), "valid"),
                       ((suppress, valid.long()), "valid")]:
        with pytest.raises(ValueError, match=what):
            dispatch.greedy_keep(*args)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.nms(boxes, classes, valid, 0.5, backend="cuda")
