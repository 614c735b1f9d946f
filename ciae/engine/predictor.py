"""Prediction on images of any size: resize to the model's test size, pad, predict, and map the
panoptic output back to each image's own size, with ``ciae.data.transform``'s sizes and resampling
(the same preprocessing as training and validation) and the post-processing on the model's
device.

The MLflow pyfunc (``workflows.tracking.pyfunc``) and the labeling job (both decode and resize with
``Transform.decode_for_test``, the job in CPU tasks, and call ``predict_resized``), validation
(``pipeline.evaluation.validation.accumulate``, with the oracle protocol's ground truth when
asked), training pictures and the demo all go through :class:`Predictor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ciae.data.panoptic import IGNORE_SEG
from ciae.data.transform import Transform, batch_order, pad_batch
from ciae.modeling.inference import HostCopy, image_quality, segments_info
from ciae.modeling.model import CIAEModel
from ciae.utils.allocator import retain_freed_memory


ORDER_WINDOW = 64      # images resized and ordered together by ``__call__``: its memory stays bounded


class Predictor:
    """A model wrapped for images of any size.

    ``Predictor(model)(images)``: ``images`` a list of [H, W, 3] uint8 RGB arrays of any sizes,
    batched by shape within windows of ``ORDER_WINDOW`` (``predict_many``); returns in their
    order, per image
    {"panoptic": [H, W] int32 numpy segment ids (0 void) at the image's own size,
    "segments_info": [{id, category_id, iscrowd, area, bbox, score}] with COCO category ids,
    area and bbox measured at that size, "quality": the image's confidence
    (``ciae.modeling.inference.image_quality``)} and, with ``return_embeddings``, "embedding":
    [D, h/4, w/4] float32 numpy, the stride-4 pixel embeddings (before normalisation) of the
    image resized to the test size (h, w).

    On CUDA: ``amp`` runs the network under bfloat16 autocast, ``channels_last`` lays the
    network's activations out NHWC (faster convolutions on tensor cores) and ``compile``
    compiles its forward pass with ``torch.compile`` (dynamic shapes). Only the final id maps
    and the segments' numbers leave the device, in one copy per batch, which ``submit`` queues
    without waiting for it. On the CPU the three do nothing.
    """

    def __init__(self, model: CIAEModel, batch_size: int = 4, amp: bool = True, channels_last: bool = True,
                 compile: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        retain_freed_memory()   # see ciae.utils.allocator
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.transform = Transform(model.cfg.input)
        cuda = self.device.type == "cuda"
        self.amp, self.channels_last = amp and cuda, channels_last and cuda
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if compile and cuda:
            model.compile_features()

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], batch_size: int | None = None,
                 return_embeddings: bool = False) -> list[dict]:
        window = max(ORDER_WINDOW, batch_size or self.batch_size)
        results = []
        for k in range(0, len(images), window):
            chunk = images[k:k + window]
            results += self.predict_many([self.transform.resize_for_test(im) for im in chunk],
                                         [im.shape[:2] for im in chunk], batch_size, return_embeddings)
        return results

    @torch.no_grad()
    def predict_many(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                     batch_size: int | None = None, return_embeddings: bool = False) -> list[dict]:
        """``predict_resized`` of any number of images, in batches of ``batch_size`` images of
        like shape (``ciae.data.transform.batch_order``); the results in the images' order."""
        bs = batch_size or self.batch_size
        order = batch_order([im.shape[1:] for im in images])
        results: list[dict] = [{}] * len(images)
        for k in range(0, len(images), bs):
            chunk = order[k:k + bs]
            preds = self.predict_resized([images[i] for i in chunk], [sizes[i] for i in chunk], return_embeddings)
            for i, pred in zip(chunk, preds):
                results[i] = pred
        return results

    @torch.no_grad()
    def predict_resized(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                        return_embeddings: bool = False,
                        oracle: Sequence[dict] | None = None) -> list[dict]:
        """One batch of images already at their test sizes (``Transform.resize_for_test``: [3, h, w]
        uint8) and the (H, W) each should be labeled at -> the results described in the class
        docstring.

        ``oracle`` (Table IV, an evaluation protocol): per image its ground truth at the test
        size, ``pipeline.feed.targets.TargetMaker``'s ``seg`` [h, w] int16, ``boxes`` [N, 4] and
        ``classes`` [N] numpy arrays; the instances are then the ground truth's, each queried by
        its mask's mean embedding, instead of the detections."""
        if not images:
            return []
        batch, test_sizes = self.collate(images)
        return self.predict_batch(batch, test_sizes, sizes, return_embeddings, oracle)

    def collate(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images at their test sizes ([3, h, w] uint8) -> ``Transform.batch``'s (batch, test
        sizes) for ``submit``; on CUDA in page-locked memory, so that the batch's copy to the GPU
        is queued behind the batch in flight while the host goes on (from pageable memory the
        copy would first wait for every kernel queued before it)."""
        return self.transform.batch(images, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor, test_sizes: Sequence[tuple[int, int]],
                      sizes: Sequence[tuple[int, int]], return_embeddings: bool = False,
                      oracle: Sequence[dict] | None = None) -> list[dict]:
        """``predict_resized`` on a batch already made (``collate``: [B, 3, H, W] uint8, padded,
        on any device, and the test size of each image): ``submit(...).result()``."""
        return self.submit(batch, test_sizes, sizes, return_embeddings, oracle).result()

    @torch.no_grad()
    def submit(self, batch: torch.Tensor, test_sizes: Sequence[tuple[int, int]],
               sizes: Sequence[tuple[int, int]], return_embeddings: bool = False,
               oracle: Sequence[dict] | None = None) -> "PendingPrediction":
        """``predict_batch``'s device work and its one copy to the host, queued without waiting
        for them (``CIAEModel.predict_on_device``, ``ciae.modeling.inference.HostCopy``): the caller
        may prepare the next batch meanwhile, then take the results with ``result()``."""
        if not len(test_sizes):
            return PendingPrediction(None, 0, [], [], False)
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        truth = None if oracle is None else self._oracle(oracle, tuple(batch.shape[-2:]))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            ids, table, emb4 = self.model.predict_on_device(batch, list(test_sizes), oracle=truth,
                                                            out_sizes=list(sizes))
        parts = [table, *ids]
        if return_embeddings:
            parts += [emb4[i, :, : (h + 3) // 4, : (w + 3) // 4].float()
                      for i, (h, w) in enumerate(test_sizes)]
        return PendingPrediction(HostCopy(parts), len(ids), self.model.stuff_ids,
                                 self.model.thing_ids, return_embeddings)

    def _oracle(self, targets: Sequence[dict], padded: tuple[int, int]) -> dict:
        """Per-image ground truth -> ``CIAEModel.predict``'s ``oracle``: ``seg`` padded to the
        batch (ignore outside the images), boxes and classes, on the model's device."""
        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a)).to(self.device, non_blocking=True)

        return {"seg": pad_batch([t["seg"] for t in targets], IGNORE_SEG, padded).to(self.device),
                "boxes": [put(t["boxes"]) for t in targets], "classes": [put(t["classes"]) for t in targets]}


class PendingPrediction:
    """A batch queued by ``Predictor.submit``; ``result()`` waits for its copy to the host and
    returns the results of ``Predictor.predict_batch``: the id maps are views of the one host
    buffer."""

    def __init__(self, copy: HostCopy | None, num_images: int, stuff_ids: list[int],
                 thing_ids: list[int], embeddings: bool):
        self.copy, self.num_images, self.embeddings = copy, num_images, embeddings
        self.stuff_ids, self.thing_ids = stuff_ids, thing_ids

    def result(self) -> list[dict]:
        if self.copy is None:
            return []
        table, *rest = self.copy.wait()          # table [B, Q, 9], B id maps (, B embeddings)
        b = self.num_images
        results = []
        for i, ids in enumerate(rest[:b]):
            segments = segments_info(table[i], self.stuff_ids, self.thing_ids)
            res = {"panoptic": ids, "segments_info": segments, "quality": image_quality(segments)}
            if self.embeddings:
                res["embedding"] = rest[b + i]
            results.append(res)
        return results
