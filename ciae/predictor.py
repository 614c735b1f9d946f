"""Prediction on images of any size: decode, resize to the model's test size, pad, predict, and
map the panoptic output back to each image's own size.

This is the one place where test-time preprocessing lives; the MLflow pyfunc
(``workflows.pyfunc``), the labeling job and the demo all go through :class:`Predictor`, and it
preprocesses exactly as ``workflows.local.evaluate`` does (PIL bilinear resize of the shorter side
to ``cfg.input.test_shorter_side`` with the longer side capped at ``cfg.input.max_size``; the id
map resized back with PIL nearest), so PQ measured either way agrees.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ciae.allocator import retain_freed_memory
from ciae.model import CIAEModel
from pipeline.coco import measure_segments
from pipeline.targets import output_size


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, anything PIL reads) -> [H, W, 3] uint8 RGB.

    Decodes in full, so a truncated or corrupt file raises ValueError (with PIL's reason). EXIF
    orientation is not applied: COCO sizes and annotations refer to the stored pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None


def resize_ids(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] int32 segment ids -> [height, width] int32, nearest neighbour (PIL's)."""
    if ids.shape == (height, width):
        return ids
    return np.asarray(Image.fromarray(ids.astype(np.int32, copy=False)).resize((width, height), Image.NEAREST))


def remeasure(ids: np.ndarray, segments: list[dict]) -> list[dict]:
    """segments_info of ``ids`` [H, W] (segment i has id i, as the model numbers them) with area
    and bbox measured on this map; segments left with no pixel (lost when the map shrank) are
    dropped, so every listed id is present, as COCO panoptic requires."""
    areas, boxes = measure_segments(ids, len(segments))
    out = []
    for k, s in enumerate(segments):
        if s["id"] != k + 1:
            raise ValueError(f"segment ids must be 1..N in order, got {s['id']} at position {k + 1}")
        if areas[k] > 0:
            out.append({**s, "area": int(areas[k]), "bbox": boxes[k].tolist()})
    return out


class Predictor:
    """A model wrapped for images of any size.

    ``Predictor(model)(images)``: ``images`` a list of [H, W, 3] uint8 RGB arrays of any sizes;
    returns per image {"panoptic": [H, W] int32 segment ids (0 void) at the image's own size,
    "segments_info": [{id, category_id, iscrowd, area, bbox}] with COCO category ids, area and
    bbox measured at that size} and, with ``return_embeddings``, "embedding": [D, h/4, w/4]
    float32 numpy, the stride-4 pixel embeddings (before normalisation) of the image resized to
    the test size (h, w).
    """

    def __init__(self, model: CIAEModel, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        retain_freed_memory()   # see ciae.allocator
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    def test_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of (height, width) is resized to before prediction."""
        i = self.model.cfg.input
        return output_size(height, width, i.test_shorter_side, i.max_size)

    def _batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Resize each image to the test size and zero-pad all to one size divisible by 32:
        [B, 3, Hp, Wp] uint8 on the model's device, and the resized (h, w) of each."""
        resized = []
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"expected an [H, W, 3] uint8 image, got {img.dtype} {img.shape}")
            h, w = self.test_size(*img.shape[:2])
            if (h, w) != img.shape[:2]:
                img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
            resized.append(img)
        hp = -(-max(r.shape[0] for r in resized) // 32) * 32
        wp = -(-max(r.shape[1] for r in resized) // 32) * 32
        batch = np.zeros((len(resized), hp, wp, 3), dtype=np.uint8)
        for k, r in enumerate(resized):
            batch[k, : r.shape[0], : r.shape[1]] = r
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return images.to(self.device, non_blocking=True), [r.shape[:2] for r in resized]

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], batch_size: int | None = None,
                 return_embeddings: bool = False) -> list[dict]:
        bs = batch_size or self.batch_size
        results = []
        for k in range(0, len(images), bs):
            chunk = images[k:k + bs]
            batch, sizes = self._batch(chunk)
            preds = self.model.predict(batch, sizes, return_embeddings=return_embeddings)
            for img, pred in zip(chunk, preds):
                h, w = img.shape[:2]
                ids = resize_ids(pred["panoptic"], h, w)
                res = {"panoptic": ids, "segments_info": remeasure(ids, pred["segments_info"])}
                if return_embeddings:
                    res["embedding"] = pred["embedding"].float().numpy()
                results.append(res)
        return results
