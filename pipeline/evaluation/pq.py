"""Panoptic Quality (Kirillov et al., 2019) with panopticapi's exact rules, as a mergeable accumulator.

The rules, as ``panopticapi.evaluation.pq_compute`` applies them:

* a ground-truth segment and a predicted segment match when they share a category, the
  ground truth is not crowd, and IoU > 0.5, where the union leaves out the predicted pixels
  that lie on ground-truth void;
* an unmatched non-crowd ground-truth segment is a false negative;
* an unmatched predicted segment is a false positive unless more than half of its pixels lie
  on void or on the crowd region of its category (the last crowd segment of that category in
  the ground-truth list, as panopticapi's dict keeps it);
* per class PQ = sum(IoU) / (TP + FP/2 + FN/2), SQ = sum(IoU) / TP, RQ = TP / (TP + FP/2 + FN/2);
  classes with no TP, FP or FN are left out of the All / Things / Stuff averages.

The matching is one ``np.bincount`` over joint (ground truth, prediction) segment codes,
which gives every intersection at once; areas are its marginals. Ids become codes through a
lookup table indexed by the id itself (ids are < 256**3, as in COCO PNGs), so nothing is sorted.

Where this differs from panopticapi, it is on input panopticapi handles badly or not at all:
ground-truth areas are pixel counts (panopticapi trusts the JSON ``area``); inconsistent input
raises :class:`pipeline.RecordError` naming the image (panopticapi raises a bare KeyError,
crashes or counts garbage); with no class to average, PQ, SQ and RQ are 0 with ``n`` = 0
(panopticapi divides by zero). ``per_class`` lists only the classes that count in the averages;
panopticapi also lists the others, at 0.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ciae.data.panoptic import MAX_SEGMENT_ID, CategoryTable, RecordError

GROUPS = (("All", None), ("Things", True), ("Stuff", False))


class _Workspace:
    """Per-process scratch that ``add`` reuses from image to image: fresh image-sized arrays
    would cost more in page faults than the work done on them.

    ``lut``: the id -> code table, 2**24 + 1 int32 entries (64 MiB of virtual memory, resident
    only where ids land), all 0 except while a map is being coded; ids above MAX_SEGMENT_ID
    clip onto the last entry, which stays 0. ``wide`` [N] intp and ``a``, ``b`` [N] int32:
    flat buffers for the largest map seen so far."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lut = np.zeros(MAX_SEGMENT_ID + 2, dtype=np.int32)
        self.wide = self.a = self.b = np.empty(0, dtype=np.int32)

    def buffers(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if n > len(self.wide):
            self.wide = np.empty(n, dtype=np.intp)
            self.a, self.b = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int32)
        return self.wide[:n], self.a[:n], self.b[:n]

    def code(self, ids: np.ndarray, segment_ids: np.ndarray, scale: int, wide: np.ndarray,
             out: np.ndarray) -> bool:
        """Write into ``out`` [N] the code of each id of ``ids`` [H, W]: 0 for ids not in
        ``segment_ids`` (distinct, in [1, MAX_SEGMENT_ID]), ``scale`` for void (0),
        ``(k + 2) * scale`` for ``segment_ids[k]``. False when ``ids`` has negative values."""
        np.copyto(wide, ids.reshape(-1), casting="unsafe")  # np.take would convert to intp itself
        if (ids.dtype.kind == "i" or ids.dtype.itemsize > 4) and wide.size and wide.min() < 0:
            return False  # a negative id, or a uint64 one above 2**63
        self.lut[0] = scale
        self.lut[segment_ids] = np.arange(2, len(segment_ids) + 2, dtype=np.int32) * scale
        try:
            np.take(self.lut, wide, out=out, mode="clip")
        finally:
            self.lut[0] = 0
            self.lut[segment_ids] = 0
        return True


_WORKSPACE = _Workspace()


class _Segments:
    """The segment list of one side of one image as arrays: ids [N], category ids [N],
    category positions in the table [N] and crowd flags [N]."""

    def __init__(self, segments: Sequence[Any], side: str, image: str, acc: "PQAccumulator"):
        n = len(segments)
        self.ids = np.empty(n, dtype=np.int64)
        self.category_ids = np.empty(n, dtype=np.int64)
        self.crowd = np.zeros(n, dtype=bool)
        for k, s in enumerate(segments):
            try:
                if isinstance(s, Mapping):
                    self.ids[k], self.category_ids[k] = s["id"], s["category_id"]
                    self.crowd[k] = s.get("iscrowd", 0) == 1
                else:
                    self.ids[k], self.category_ids[k] = s.id, s.category_id
                    self.crowd[k] = getattr(s, "iscrowd", 0) == 1
            except (KeyError, AttributeError, TypeError, ValueError, OverflowError) as e:
                raise RecordError(image, f"{side} segment #{k} is malformed ({e!r}): {s!r}") from None
        bad = (self.ids < 1) | (self.ids > MAX_SEGMENT_ID)
        if bad.any():
            raise RecordError(image, f"{side} segment id {int(self.ids[bad][0])} is outside "
                                     f"[1, {MAX_SEGMENT_ID}] (0 is void)")
        unique, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise RecordError(image, f"duplicate {side} segment ids {unique[counts > 1].tolist()}")
        self.positions = acc.category_positions(self.category_ids)
        unknown = self.positions < 0
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise RecordError(image, f"{side} segment {int(self.ids[k])} has unknown category_id "
                                     f"{int(self.category_ids[k])}")

    def __len__(self) -> int:
        return len(self.ids)


class PQAccumulator:
    """Per-category PQ statistics over any number of images; partial states merge.

    State, indexed by the category's position in ``categories`` (ascending id): ``iou`` [C]
    float64 sum of matched IoUs, ``tp``, ``fp``, ``fn`` [C] int64, and ``images``, the number
    of images added. Plain numpy and picklable, so workers (processes, Ray tasks) each fill one
    and the driver adds them up with ``merge`` or ``+``.
    """

    def __init__(self, categories: CategoryTable):
        self.categories = categories
        self.category_ids = np.array([c.id for c in categories.categories], dtype=np.int64)
        self.isthing = np.array([c.isthing for c in categories.categories], dtype=bool)
        c = len(self.category_ids)
        self.iou = np.zeros(c, dtype=np.float64)
        self.tp = np.zeros(c, dtype=np.int64)
        self.fp = np.zeros(c, dtype=np.int64)
        self.fn = np.zeros(c, dtype=np.int64)
        self.images = 0

    def category_positions(self, category_ids: np.ndarray) -> np.ndarray:
        """[N] category ids -> [N] positions in ``self.category_ids``, -1 for unknown ids."""
        pos = np.searchsorted(self.category_ids, category_ids)
        np.minimum(pos, len(self.category_ids) - 1, out=pos)
        return np.where(self.category_ids[pos] == category_ids, pos, -1)

    # ---------------------------------------------------------------------------- adding

    def add(self, gt_ids: np.ndarray, gt_segments: Sequence[Any], pred_ids: np.ndarray,
            pred_segments: Sequence[Any], image: str = "image") -> None:
        """Add one image given COCO-style id maps.

        ``gt_ids``, ``pred_ids``: [H, W] non-negative integer segment ids, 0 = void (decoded
        COCO panoptic PNGs, ``pipeline.data.panoptic_png.decode_id_png``).
        ``gt_segments``, ``pred_segments``: the segments of each map as dicts or objects with
        ``id`` (in [1, 256**3 - 1], as in COCO), ``category_id`` and, for the ground truth,
        ``iscrowd`` (1 = crowd). Every id of a map must be listed and every listed segment must
        have pixels.
        ``image`` names the image in errors (:class:`RecordError`).
        """
        gt = _Segments(gt_segments, "ground-truth", image, self)
        pred = _Segments(pred_segments, "predicted", image, self)
        gt_ids, pred_ids = self._check_maps(image, gt_ids, pred_ids, "id")
        cols = len(pred) + 2
        if (len(gt) + 2) * cols > np.iinfo(np.int32).max:
            raise RecordError(image, f"too many segments to match: {len(gt)} ground-truth and "
                                     f"{len(pred)} predicted")
        # Codes: 0 = id missing from the list, 1 = void, k + 2 = k-th segment, the ground
        # truth's scaled by the number of predicted codes: their sum is one flat key per pixel
        # of the joint (ground truth, prediction) histogram.
        ws = _WORKSPACE
        with ws.lock:
            wide, a, b = ws.buffers(gt_ids.size)
            for side, ids, seg, scale, out in (("ground-truth", gt_ids, gt, cols, a),
                                               ("predicted", pred_ids, pred, 1, b)):
                if not ws.code(ids, seg.ids, scale, wide, out):
                    raise RecordError(image, f"{side} id map has negative ids")
            g, p, n = _joint_histogram(np.add(a, b, out=wide), (len(gt) + 2) * cols, cols)
        for side, idx, ids, seg in (("ground-truth", g, gt_ids, gt), ("predicted", p, pred_ids, pred)):
            if (idx == 0).any():
                stray = np.setdiff1d(np.unique(ids), np.append(seg.ids, 0))
                raise RecordError(image, f"{side} id map has segment ids missing from the {side} "
                                         f"segments: {_some(stray)}")
        self._accumulate(image, g - 2, p - 2, n, gt, pred)

    def add_indexed(self, gt_index: np.ndarray, gt_segments: Sequence[Any], pred_index: np.ndarray,
                    pred_segments: Sequence[Any], image: str = "image") -> None:
        """Add one image given segment-index maps: 0 = void, i = the i-th segment (1-based) of
        the list, as in the shards' ``panoptic`` column or a model's per-pixel segment index.

        ``gt_index``, ``pred_index``: [H, W] integer arrays with values in [0, len(segments)].
        Segments as in :meth:`add`; their ids are only checked, never looked up.
        """
        gt = _Segments(gt_segments, "ground-truth", image, self)
        pred = _Segments(pred_segments, "predicted", image, self)
        gt_index, pred_index = self._check_maps(image, gt_index, pred_index, "index")
        for side, index, seg in (("ground-truth", gt_index, gt), ("predicted", pred_index, pred)):
            if index.size and (index.min() < 0 or index.max() > len(seg)):
                raise RecordError(image, f"{side} index map has values outside [0, {len(seg)}] "
                                         f"(0 = void, i = the i-th of {len(seg)} segments)")
        cols = len(pred) + 1
        ws = _WORKSPACE
        with ws.lock:
            key, _, _ = ws.buffers(gt_index.size)
            np.multiply(gt_index.reshape(-1), cols, out=key, casting="unsafe")
            key += pred_index.reshape(-1)
            g, p, n = _joint_histogram(key, (len(gt) + 1) * cols, cols)
        self._accumulate(image, g - 1, p - 1, n, gt, pred)

    @staticmethod
    def _check_maps(image: str, gt: np.ndarray, pred: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Both maps as [H, W] integer arrays of the same size, or a RecordError."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.ndim != 2 or pred.ndim != 2:
            raise RecordError(image, f"{kind} maps must be [H, W], got ground truth {gt.shape} "
                                     f"and prediction {pred.shape}")
        for side, m in (("ground-truth", gt), ("predicted", pred)):
            if m.dtype.kind not in "ui":
                raise RecordError(image, f"{side} {kind} map has dtype {m.dtype}, expected integers")
        if gt.shape != pred.shape:
            raise RecordError(image, f"the prediction is {pred.shape[1]}x{pred.shape[0]} but the "
                                     f"ground truth is {gt.shape[1]}x{gt.shape[0]}")
        return gt, pred

    def _accumulate(self, image: str, g: np.ndarray, p: np.ndarray, n: np.ndarray,
                    gt: _Segments, pred: _Segments) -> None:
        """Match one image from its sparse joint histogram and add the outcome.

        ``g``, ``p``: [K] ground-truth / predicted segment index of each non-empty cell (-1 =
        void); ``n``: [K] its pixel count.
        """
        gt_area = np.bincount(g + 1, weights=n, minlength=len(gt) + 1)[1:].astype(np.int64)
        pred_area = np.bincount(p + 1, weights=n, minlength=len(pred) + 1)[1:].astype(np.int64)
        for side, area, seg in (("ground-truth", gt_area, gt), ("predicted", pred_area, pred)):
            if (area == 0).any():
                raise RecordError(image, f"{side} segments {_some(seg.ids[area == 0])} are absent "
                                         f"from the {side} id map")
        on_void = g < 0
        pred_void = np.bincount(p[on_void] + 1, weights=n[on_void],
                                minlength=len(pred) + 1)[1:].astype(np.int64)

        # Candidate pairs: every cell where both sides are segments.
        both = (g >= 0) & (p >= 0)
        gi, pj, inter = g[both], p[both], n[both]
        union = gt_area[gi] + pred_area[pj] - pred_void[pj] - inter
        # IoU > 0.5 as exact integers; it makes a match unique on both sides.
        match = ((2 * inter > union) & (gt.positions[gi] == pred.positions[pj]) & ~gt.crowd[gi])
        gt_matched = np.zeros(len(gt), dtype=bool)
        gt_matched[gi[match]] = True
        pred_matched = np.zeros(len(pred), dtype=bool)
        pred_matched[pj[match]] = True

        c = len(self.category_ids)
        matched_pos = gt.positions[gi[match]]
        self.tp += np.bincount(matched_pos, minlength=c)
        self.iou += np.bincount(matched_pos, weights=inter[match] / union[match], minlength=c)
        self.fn += np.bincount(gt.positions[~gt_matched & ~gt.crowd], minlength=c)

        # An unmatched prediction is ignored when more than half of it is on void or on the
        # crowd region of its category.
        last_crowd = {int(gt.positions[k]): k for k in np.flatnonzero(gt.crowd)}
        pred_crowd = np.array([last_crowd.get(pos, -1) for pos in pred.positions.tolist()], dtype=np.int64)
        on_crowd = gi == pred_crowd[pj]
        ignored = pred_void + np.bincount(pj[on_crowd], weights=inter[on_crowd],
                                          minlength=len(pred)).astype(np.int64)
        fp = ~pred_matched & ~(2 * ignored > pred_area)
        self.fp += np.bincount(pred.positions[fp], minlength=c)
        self.images += 1

    # --------------------------------------------------------------------------- merging

    def merge(self, other: "PQAccumulator") -> "PQAccumulator":
        """Add another accumulator's statistics into this one; returns self."""
        if not np.array_equal(self.category_ids, other.category_ids) or \
                not np.array_equal(self.isthing, other.isthing):
            raise ValueError("cannot merge PQ accumulators over different category tables")
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.images += other.images
        return self

    def __add__(self, other: "PQAccumulator") -> "PQAccumulator":
        return PQAccumulator(self.categories).merge(self).merge(other)

    # --------------------------------------------------------------------------- state

    def to_json(self) -> dict:
        """The statistics as a JSON-friendly dict, only the categories with any (by position):
        {"images", "c", "iou", "tp", "fp", "fn"}. ``add_json`` reads it back exactly."""
        nz = np.flatnonzero(self.tp + self.fp + self.fn)
        return {"images": self.images, "c": nz.tolist(), "iou": self.iou[nz].tolist(),
                "tp": self.tp[nz].tolist(), "fp": self.fp[nz].tolist(), "fn": self.fn[nz].tolist()}

    def add_json(self, state: dict) -> "PQAccumulator":
        """Add the statistics of a ``to_json`` state of the same category table; returns self."""
        c = np.asarray(state["c"], dtype=np.int64)
        np.add.at(self.iou, c, state["iou"])
        np.add.at(self.tp, c, state["tp"])
        np.add.at(self.fp, c, state["fp"])
        np.add.at(self.fn, c, state["fn"])
        self.images += int(state["images"])
        return self

    @classmethod
    def from_json(cls, categories: CategoryTable, state: dict) -> "PQAccumulator":
        return cls(categories).add_json(state)

    def to_vector(self) -> np.ndarray:
        """[4C + 1] float64: iou, tp, fp, fn and images in one vector (counts below 2^53 are
        exact), so that processes sum their states with one all-reduce; ``from_vector`` reads
        a sum back."""
        return np.concatenate([self.iou, self.tp, self.fp, self.fn, [self.images]]).astype(np.float64)

    @classmethod
    def from_vector(cls, categories: CategoryTable, vector: np.ndarray) -> "PQAccumulator":
        acc = cls(categories)
        c = len(acc.category_ids)
        if vector.shape != (4 * c + 1,):
            raise ValueError(f"a PQ state vector of {vector.shape} for {c} categories")
        acc.iou[:] = vector[:c]
        for k, name in enumerate(("tp", "fp", "fn"), start=1):
            getattr(acc, name)[:] = np.rint(vector[k * c:(k + 1) * c]).astype(np.int64)
        acc.images = int(round(float(vector[-1])))
        return acc

    # --------------------------------------------------------------------------- results

    def summary(self) -> dict:
        """``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id:
        {"pq", "sq", "rq"}}}``, fractions in [0, 1]; ``per_class`` holds the ``n`` classes of
        "All" (those with a TP, FP or FN). Same arithmetic, in the same order, as panopticapi's
        ``PQStat.pq_average``."""
        per_class = {}
        for k, cid in enumerate(self.category_ids.tolist()):
            tp, fp, fn, iou = int(self.tp[k]), int(self.fp[k]), int(self.fn[k]), float(self.iou[k])
            if tp + fp + fn == 0:
                continue
            per_class[cid] = {"pq": iou / (tp + 0.5 * fp + 0.5 * fn),
                              "sq": iou / tp if tp != 0 else 0.0,
                              "rq": tp / (tp + 0.5 * fp + 0.5 * fn)}
        out = {}
        for name, isthing in GROUPS:
            classes = [per_class[cid] for k, cid in enumerate(self.category_ids.tolist())
                       if cid in per_class and (isthing is None or self.isthing[k] == isthing)]
            n = len(classes)
            out[name] = {key: sum(c[key] for c in classes) / n if n else 0.0 for key in ("pq", "sq", "rq")}
            out[name]["n"] = n
        out["per_class"] = per_class
        return out


def _joint_histogram(key: np.ndarray, bins: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N] keys row * cols + col in [0, bins) -> the non-empty cells as rows [K], cols [K],
    counts [K], in ascending key order. A bincount when the table is small, else a sort."""
    if bins <= max(4 * key.size, 1 << 16):
        counts = np.bincount(key, minlength=bins)
        cells = np.flatnonzero(counts)
        n = counts[cells]
    else:  # many segments on both sides: a dense table would dwarf the image
        cells, n = np.unique(key, return_counts=True)
    return cells // cols, cells % cols, n


def _some(ids: np.ndarray, limit: int = 10) -> str:
    ids = np.asarray(ids).tolist()
    return f"{ids[:limit]}{' ...' if len(ids) > limit else ''}"


def format_table(summary: dict) -> str:
    """The All / Things / Stuff table of a :meth:`PQAccumulator.summary`, in percent, laid out
    as panopticapi prints it."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * 38]
    for name, _ in GROUPS:
        r = summary[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    return "\n".join(lines)
