"""Shard rows -> training targets, with resize to a shorter side, scale jitter and flip.

Per image, with C_st stuff and C_th thing classes (contiguous indices from the manifest):

* ``image``   [3, H, W] uint8 RGB (the model normalises)
* ``sem``     [H, W] int64: stuff classes 0..C_st-1; things one class C_st ("merged", the
  paper's default), or C_st..C_st+C_th-1 ("specific"), or ignored ("none"); 255 = ignore (void)
* ``seg``     [H, W] int64: a stuff pixel carries its stuff class index, thing instance j carries
  C_st + j; -1 = ignore (void and crowd regions)
* ``boxes``   [N, 4] float32 xyxy of the N non-crowd thing instances (pixel edges: x1 = x + w)
* ``classes`` [N] int64 contiguous thing class of each instance
* ``image_id`` int, ``orig_size`` (H0, W0), ``scale`` float, ``flipped`` bool

:class:`TargetMaker` is a plain callable on a row dict, usable by ``ray.data.Dataset.map`` and
by a plain loop alike; ``collate`` pads several images' targets into a batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.coco import measure_segments
from pipeline.shards import decode_panoptic_row

IGNORE_SEM = 255
IGNORE_SEG = -1
THING_MODES = ("merged", "specific", "none")


@dataclass(frozen=True)
class TargetConfig:
    """Resize and augmentation. ``shorter_sides``: one is drawn per image (scale jitter); the
    longer side is capped at ``max_size``. ``thing_mode`` as in Table II of the paper."""

    shorter_sides: tuple[int, ...] = (800,)
    max_size: int = 1333
    flip_prob: float = 0.5
    thing_mode: str = "merged"

    def __post_init__(self):
        if self.thing_mode not in THING_MODES:
            raise ValueError(f"thing_mode must be one of {THING_MODES}, got {self.thing_mode!r}")
        if not self.shorter_sides or min(self.shorter_sides) < 1:
            raise ValueError("shorter_sides must be a non-empty tuple of positive sizes")


def output_size(h: int, w: int, shorter: int, max_size: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``shorter`` with the longer side <= ``max_size``."""
    scale = min(shorter / min(h, w), max_size / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _resize_nearest(a: np.ndarray, oh: int, ow: int) -> np.ndarray:
    h, w = a.shape
    ys = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return a[ys[:, None], xs[None, :]]


class TargetMaker:
    """Callable: shard row (dict) -> targets (dict of numpy arrays, see the module docstring).

    ``categories`` is the manifest's ``stuff_index`` / ``thing_index`` pair. Randomness is
    drawn from (seed, epoch, image_id), so a row gives the same targets wherever it runs."""

    def __init__(self, stuff_index: dict, thing_index: dict, config: TargetConfig = TargetConfig(),
                 train: bool = True, seed: int = 0, epoch: int = 0):
        self.stuff_index = {int(k): int(v) for k, v in stuff_index.items()}
        self.thing_index = {int(k): int(v) for k, v in thing_index.items()}
        self.config, self.train, self.seed, self.epoch = config, train, seed, epoch

    @classmethod
    def from_manifest(cls, manifest: dict, **kwargs) -> "TargetMaker":
        return cls(manifest["stuff_index"], manifest["thing_index"], **kwargs)

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_index)

    def __call__(self, row: dict) -> dict:
        cfg = self.config
        rng = np.random.default_rng([self.seed, self.epoch, int(row["image_id"])])
        with Image.open(io.BytesIO(row["image"])) as im:
            im = im.convert("RGB")
            h0, w0 = im.height, im.width
            shorter = int(rng.choice(cfg.shorter_sides)) if self.train else cfg.shorter_sides[-1]
            oh, ow = output_size(h0, w0, shorter, cfg.max_size)
            image = np.asarray(im.resize((ow, oh), Image.BILINEAR) if (oh, ow) != (h0, w0) else im)
        index, segments = decode_panoptic_row(row)
        if index.shape != (h0, w0):
            raise ValueError(f"image {row['image_id']}: panoptic map {index.shape} != image {(h0, w0)}")
        index = _resize_nearest(index, oh, ow)
        flipped = bool(self.train and rng.random() < cfg.flip_prob)
        if flipped:
            image, index = image[:, ::-1], index[:, ::-1]
        out = self._labels(np.ascontiguousarray(index), segments)
        out.update(image=np.ascontiguousarray(image.transpose(2, 0, 1)), image_id=int(row["image_id"]),
                   orig_size=(h0, w0), scale=oh / h0, flipped=flipped)
        return out

    def _labels(self, index: np.ndarray, segments: list[dict]) -> dict:
        """[H, W] segment-index map + segments -> sem, seg, boxes, classes."""
        c_st, n = self.num_stuff, len(segments)
        areas, boxes_xywh = measure_segments(index, n)
        sem_lut = np.full(n + 1, IGNORE_SEM, np.int64)
        seg_lut = np.full(n + 1, IGNORE_SEG, np.int64)
        boxes, classes = [], []
        for i, s in enumerate(segments, start=1):
            cid = int(s["category_id"])
            if cid in self.stuff_index:
                sem_lut[i] = seg_lut[i] = self.stuff_index[cid]
                continue
            thing = self.thing_index[cid]
            sem_lut[i] = {"merged": c_st, "specific": c_st + thing, "none": IGNORE_SEM}[self.config.thing_mode]
            if s["iscrowd"] or areas[i - 1] == 0:
                continue
            seg_lut[i] = c_st + len(boxes)
            x, y, w, h = boxes_xywh[i - 1]
            boxes.append((x, y, x + w, y + h))
            classes.append(thing)
        return {"sem": sem_lut[index], "seg": seg_lut[index],
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int64)}


def collate(items: list[dict]):
    """Targets of several images -> a batch: images zero-padded to a common size divisible by 32
    into [B, 3, H, W] uint8, ``sem`` padded with 255 and ``seg`` with -1; per-image lists of
    boxes and classes (torch tensors)."""
    import torch

    hs = max(it["image"].shape[1] for it in items)
    ws = max(it["image"].shape[2] for it in items)
    hs, ws = -(-hs // 32) * 32, -(-ws // 32) * 32
    b = len(items)
    images = torch.zeros((b, 3, hs, ws), dtype=torch.uint8)
    sem = torch.full((b, hs, ws), IGNORE_SEM, dtype=torch.int64)
    seg = torch.full((b, hs, ws), IGNORE_SEG, dtype=torch.int64)
    for k, it in enumerate(items):
        _, h, w = it["image"].shape
        images[k, :, :h, :w] = torch.from_numpy(it["image"])
        sem[k, :h, :w] = torch.from_numpy(it["sem"])
        seg[k, :h, :w] = torch.from_numpy(it["seg"])
    return {"images": images, "sem": sem, "seg": seg,
            "boxes": [torch.from_numpy(it["boxes"]) for it in items],
            "classes": [torch.from_numpy(it["classes"]) for it in items],
            "image_sizes": [tuple(it["image"].shape[1:]) for it in items],
            "image_ids": [it["image_id"] for it in items]}
