"""Shard rows -> training targets, with resize to a shorter side, scale jitter and flip.

Per image, with C_st stuff and C_th thing classes (contiguous indices from the manifest):

* ``image``   [3, H, W] uint8 RGB (the model normalises)
* ``sem``     [H, W] uint8: stuff classes 0..C_st-1; things one class C_st ("merged", the
  paper's default), or C_st..C_st+C_th-1 ("specific"), or ignored ("none"); 255 = ignore (void)
* ``seg``     [H, W] int16: a stuff pixel carries its stuff class index, thing instance j carries
  C_st + j; -1 = ignore (void and crowd regions)

``sem`` and ``seg`` stay this narrow through Ray Data, collation and the copy to the device (a
quarter and an eighth of int64's bytes); the model widens them there.
* ``boxes``   [N, 4] float32 xyxy of the N non-crowd thing instances (pixel edges: x1 = x + w)
* ``classes`` [N] int64 contiguous thing class of each instance
* ``image_id`` int, ``orig_size`` (H0, W0), ``scale`` float, ``flipped`` bool

Sizes and resampling are ``ciae.data.transform``'s (the same as at test time). :class:`TargetMaker`
is a plain callable on a row dict, usable by ``ray.data.Dataset.map`` and by a plain loop alike;
``collate`` pads several images' targets into a batch.
"""

from __future__ import annotations

import numpy as np

from ciae.config import InputConfig
from ciae.data.panoptic import IGNORE_SEG, IGNORE_SEM, measure_segments
from ciae.data.transform import Transform, decode_rgb, pad_batch, padded_size, resize_chw, resize_nearest
from pipeline.data.shards import decode_panoptic_row


class TargetMaker:
    """Callable: shard row (dict) -> targets (dict of numpy arrays, see the module docstring).

    ``stuff_index`` / ``thing_index``: the manifest's category id -> contiguous index maps;
    ``input``: sizes and flips (``train``: a shorter side drawn from ``input.shorter_sides`` and
    a flip with ``input.flip_prob``; else the test size, no flip); ``thing_mode``: Table II.
    Randomness is drawn from (seed, epoch, image_id), so a row gives the same targets wherever
    it runs; given the training ``step``, the shorter side is drawn from (seed, step) instead:
    every image of a step, on every worker, gets the same one, so a batch is not padded to its
    largest image and data-parallel workers do equal work (one pixel in eight less on average
    with 2 images of 160-224 px; no worker waits on another's larger batch)."""

    def __init__(self, stuff_index: dict, thing_index: dict, input: InputConfig = InputConfig(),
                 thing_mode: str = "merged", train: bool = True, seed: int = 0, epoch: int = 0):
        self.stuff_index = {int(k): int(v) for k, v in stuff_index.items()}
        self.thing_index = {int(k): int(v) for k, v in thing_index.items()}
        self.transform, self.thing_mode = Transform(input), thing_mode
        self.train, self.seed, self.epoch = train, seed, epoch
        if len(self.stuff_index) + len(self.thing_index) >= IGNORE_SEM:
            raise ValueError(f"{len(self.stuff_index) + len(self.thing_index)} categories: at most "
                             f"{IGNORE_SEM - 1} fit the semantic targets (uint8, {IGNORE_SEM} = ignore)")

    @classmethod
    def from_manifest(cls, manifest: dict, **kwargs) -> "TargetMaker":
        return cls(manifest["stuff_index"], manifest["thing_index"], **kwargs)

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_index)

    def __call__(self, row: dict, step: int | None = None) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(row["image_id"])])
        image, index, segments = decode_row(row)
        h0, w0 = image.shape[:2]
        if self.train:
            size_rng = rng if step is None else np.random.default_rng([self.seed, int(step)])
            size = self.transform.train_size(h0, w0, size_rng)
        else:
            size = self.transform.test_size(h0, w0)
        image = resize_chw(image, size)                   # [3, h, w]
        index = resize_nearest(index, size)
        flipped = bool(self.train and rng.random() < self.transform.cfg.flip_prob)
        if flipped:
            image, index = image[:, :, ::-1], index[:, ::-1]
        out = self.labels(np.ascontiguousarray(index), segments)
        out.update(image=np.ascontiguousarray(image), image_id=int(row["image_id"]),
                   orig_size=(h0, w0), scale=size[0] / h0, flipped=flipped)
        return out

    def labels(self, index: np.ndarray, segments: list[dict]) -> dict:
        """[H, W] segment-index map (at the size the targets are wanted at) + segments -> sem,
        seg, boxes, classes."""
        c_st, n = self.num_stuff, len(segments)
        areas, boxes_xywh = measure_segments(index, n)
        sem_lut = np.full(n + 1, IGNORE_SEM, np.uint8)
        seg_lut = np.full(n + 1, IGNORE_SEG, np.int16)
        boxes, classes = [], []
        for i, s in enumerate(segments, start=1):
            cid = int(s["category_id"])
            if cid in self.stuff_index:
                sem_lut[i] = seg_lut[i] = self.stuff_index[cid]
                continue
            thing = self.thing_index[cid]
            sem_lut[i] = {"merged": c_st, "specific": c_st + thing, "none": IGNORE_SEM}[self.thing_mode]
            if s["iscrowd"] or areas[i - 1] == 0:
                continue
            seg_lut[i] = c_st + len(boxes)
            x, y, w, h = boxes_xywh[i - 1]
            boxes.append((x, y, x + w, y + h))
            classes.append(thing)
        return {"sem": sem_lut[index], "seg": seg_lut[index],
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int64)}


def decode_row(row: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A shard row -> its image ([H, W, 3] uint8 RGB, ``decode_rgb``), its [H, W] segment-index
    map and its segments, each decoded once; a map of another size than the image is a
    ValueError naming the image."""
    image = decode_rgb(row["image"])
    index, segments = decode_panoptic_row(row)
    if index.shape != image.shape[:2]:
        raise ValueError(f"image {row['image_id']}: panoptic map {index.shape} != image {image.shape[:2]}")
    return image, index, segments


def collate(items: list[dict]) -> dict:
    """Targets of several images -> a batch: images zero-padded to a common size divisible by 32
    into [B, 3, H, W] uint8, ``sem`` padded with 255 and ``seg`` with -1; per-image lists of
    boxes and classes (torch tensors)."""
    import torch

    size = padded_size([it["image"].shape[1:] for it in items])
    return {"images": pad_batch([it["image"] for it in items], 0, size),
            "sem": pad_batch([it["sem"] for it in items], IGNORE_SEM, size),
            "seg": pad_batch([it["seg"] for it in items], IGNORE_SEG, size),
            "boxes": [torch.from_numpy(it["boxes"]) for it in items],
            "classes": [torch.from_numpy(it["classes"]) for it in items],
            "image_sizes": [tuple(it["image"].shape[1:]) for it in items],
            "image_ids": [it["image_id"] for it in items]}
