"""COCO panoptic conventions that the method shares with the data stages: segment-id maps, the
category table, segment measurement and the two error types.

* An id map is [H, W] integers: 0 is void, a segment id lies in [1, ``MAX_SEGMENT_ID``] (COCO
  PNGs store id = R + 256 G + 256**2 B). A segment-index map numbers the segments of its list
  1..N instead (0 void), as the shards and the model produce them.
* Training targets mark ignored pixels ``IGNORE_SEM`` in ``sem`` and ``IGNORE_SEG`` in ``seg``.
* :class:`CategoryTable`: COCO categories with contiguous stuff / thing indices.
* :func:`measure_segments`: areas and COCO boxes of every segment from the row runs of a map
  (a COCO image has a few thousand runs for its 300k pixels); :func:`measure_resized`: the same
  of a batch of maps as resized to other sizes, measured on a device without resizing them.
* :class:`RecordError` names one bad image; :class:`DatasetError` a problem with a whole input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

MAX_SEGMENT_ID = 256**3 - 1
IGNORE_SEM = 255     # ``sem``: void and ignored classes
IGNORE_SEG = -1      # ``seg``: void and crowd regions


class RecordError(ValueError):
    """A bad record. ``image`` names it (id and file), ``problem`` says what is wrong."""

    def __init__(self, image: str, problem: str):
        super().__init__(f"{image}: {problem}")
        self.image = image
        self.problem = problem

    def __reduce__(self):  # picklable, so worker processes and Ray tasks can return it
        return RecordError, (self.image, self.problem)


class DatasetError(ValueError):
    """A problem that makes the whole dataset unusable (unreadable JSON, bad category table)."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]
    supercategory: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "isthing": int(self.isthing),
                "color": list(self.color), "supercategory": self.supercategory}


@dataclass(frozen=True)
class CategoryTable:
    """COCO categories with contiguous indices: stuff 0..C_st-1 and things 0..C_th-1,
    each in ascending category id order."""

    categories: tuple[Category, ...]

    @classmethod
    def from_json(cls, items: list[dict], source: str = "categories") -> "CategoryTable":
        cats = []
        for k, c in enumerate(items):
            try:
                color = tuple(int(v) for v in c.get("color", (0, 0, 0)))
                cats.append(Category(int(c["id"]), str(c["name"]), bool(c["isthing"]),
                                     color, str(c.get("supercategory", ""))))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{source}: category #{k} is malformed ({e!r}): {c}") from None
        dup = [i for i, n in Counter(c.id for c in cats).items() if n > 1]
        if dup:
            raise DatasetError(f"{source}: duplicate category ids {sorted(dup)}")
        if not cats:
            raise DatasetError(f"{source}: no categories")
        return cls(tuple(sorted(cats, key=lambda c: c.id)))

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.categories]

    @property
    def by_id(self) -> dict[int, Category]:
        return {c.id: c for c in self.categories}

    @property
    def stuff_ids(self) -> list[int]:
        return [c.id for c in self.categories if not c.isthing]

    @property
    def thing_ids(self) -> list[int]:
        return [c.id for c in self.categories if c.isthing]

    @property
    def stuff_index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.stuff_ids)}

    @property
    def thing_index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.thing_ids)}


def row_runs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values along the rows of a [H, W] map (a run never crosses a row end).

    Returns (starts [R] flat positions, values [R], lengths [R]). A COCO image has a few
    thousand runs for its 300k pixels, so per-segment work on runs is ~50x cheaper."""
    h, w = a.shape
    brk = np.empty((h, w), bool)
    brk[:, 0] = True
    np.not_equal(a[:, 1:], a[:, :-1], out=brk[:, 1:])
    starts = np.flatnonzero(brk)
    lengths = np.diff(starts, append=a.size)
    return starts, a.ravel()[starts], lengths


def measure_runs(starts, run_index, lengths, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Areas [n] and COCO boxes [n, 4] of segments 1..n from row runs in raster order."""
    areas = np.bincount(run_index, weights=lengths, minlength=n + 1)[1:].astype(np.int64)
    order = np.argsort(run_index, kind="stable")  # per segment, runs stay in raster order
    seg = run_index[order]
    first = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    last = np.r_[first[1:] - 1, len(seg) - 1]
    y, x0 = np.divmod(starts[order], width)
    x1 = x0 + lengths[order] - 1
    boxes = np.zeros((n + 1, 4), np.int64)
    boxes[seg[first], 0] = np.minimum.reduceat(x0, first)
    boxes[seg[first], 1] = y[first]
    boxes[seg[first], 2] = np.maximum.reduceat(x1, first) - boxes[seg[first], 0] + 1
    boxes[seg[first], 3] = y[last] - y[first] + 1
    return areas, boxes[1:]


def measure_segments(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Areas [n] and COCO boxes [n, 4] (x, y, w, h; zeros when empty) of segments 1..n of a
    [H, W] segment-index map, measured on its row runs (int64 arrays)."""
    starts, values, lengths = row_runs(index)
    return measure_runs(starts, values.astype(np.int64), lengths, index.shape[1], n)


def measure_resized(index, n: int, rows, cols):
    """``measure_segments`` of a batch of segment-index maps resized to other sizes
    (``ciae.data.transform.resize_nearest``), measured where they lie (a GPU included) without making
    the resized maps and without a host sync.

    index [B, H, W] integer tensor; rows, cols: (first, count) [B, H] and [B, W] int64, the
    resize of each axis (``ciae.data.transform.nearest_cover``: a pixel becomes count_row x count_col
    output pixels, from the first output row and column on) -> areas [B, n], boxes [B, n, 4]
    int64 (x, y, w, h at the output size; zeros when empty), the numbers ``measure_segments``
    gives on each resized map."""
    import torch

    b, h, w = index.shape
    dev = index.device
    (y_first, y_count), (x_first, x_count) = rows, cols
    weight = y_count[:, :, None] * x_count[:, None, :]                   # [B, H, W]
    seg = index.long()
    # segment s of image i -> bin i n + s - 1; void and vanishing pixels -> the last bin
    offset = n * torch.arange(b, device=dev)[:, None, None] - 1
    bins = torch.where((seg > 0) & (weight > 0), seg + offset, b * n).view(-1)

    def extreme(values: torch.Tensor, how: str, start: int) -> torch.Tensor:
        out = torch.full((b * n + 1,), start, dtype=torch.int64, device=dev)
        return out.scatter_reduce_(0, bins, values.expand(b, h, w).reshape(-1), how,
                                   include_self=False)

    areas = torch.zeros(b * n + 1, dtype=torch.int64, device=dev).scatter_add_(0, bins, weight.view(-1))
    x0 = extreme(x_first[:, None, :], "amin", 0)
    y0 = extreme(y_first[:, :, None], "amin", 0)
    x1 = extreme((x_first + x_count)[:, None, :], "amax", 0)
    y1 = extreme((y_first + y_count)[:, :, None], "amax", 0)
    boxes = torch.where((areas > 0)[:, None], torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1), 0)
    return areas[:-1].view(b, n), boxes[:-1].view(b, n, 4)
