"""The CIAE panoptic model (paper Fig. 3): ResNet-FPN, an FCOS proposal head on P3-P7 that also
predicts box embeddings, an embedding branch on P2-P5, and the category memory.

Training: ``model(batch)`` returns the losses of Eq. 15 (focal, box IoU, centerness and CIAE)
plus the batch's category sums/counts for the memory update, which the training loop applies.
Inference: ``model.predict(images, image_sizes)`` returns COCO panoptic id maps and segments_info.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ciae.backbone import build_backbone
from ciae.ciae_loss import ciae_loss
from ciae.config import Config
from ciae.embedding import EmbeddingBranch, full_resolution
from ciae.fcos import FCOSHead, compute_locations, fcos_detect, fcos_losses, fcos_targets
from ciae.fpn import FPN
from ciae.inference import (assemble, classes_from_embedding, detection_queries, oracle_queries,
                            select_instances)
from ciae.memory import CategoryMemory


class CIAEModel(nn.Module):
    """``stuff_ids`` / ``thing_ids``: COCO category ids in contiguous-index order (the manifest's
    ``stuff_index`` / ``thing_index``)."""

    def __init__(self, cfg: Config, stuff_ids: list[int], thing_ids: list[int]):
        super().__init__()
        self.cfg = cfg
        self.stuff_ids, self.thing_ids = list(stuff_ids), list(thing_ids)
        e = cfg.embedding
        self.backbone = build_backbone(cfg.backbone)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn.channels)
        self.head = FCOSHead(cfg.fpn.channels, len(thing_ids), e.dim, cfg.fcos)
        self.embedding = EmbeddingBranch(cfg.fpn.channels, e.branch_channels, e.dim,
                                         coordconv=e.coordconv, box_embedding=e.box_embedding)
        n_memory = len(stuff_ids) + {"merged": 1, "specific": len(thing_ids), "none": 0}[e.thing_mode]
        self.memory = CategoryMemory(n_memory, e.dim, momentum=e.memory_momentum, seed=cfg.solver.seed)
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.kernel_backend = "auto"
        # the mean of a local scalar over data-parallel workers (set by the distributed trainer)
        self.reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_ids)

    def _forward_features(self, images: torch.Tensor):
        """images [B, 3, H, W] uint8 (H, W multiples of 32) -> (head outputs, FCOS locations,
        stride-4 embedding map [B, D, H/4, W/4])."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        p = self.fpn(self.backbone(x))
        levels = [p[f"p{i}"] for i in range(3, 3 + len(self.cfg.fcos.strides))]
        head = self.head(levels)
        locations = compute_locations([f.shape[-2:] for f in levels], self.cfg.fcos.strides, images.device)
        emb4 = self.embedding([p["p2"], p["p3"], p["p4"], p["p5"]],
                              head["box_embed"] if self.cfg.embedding.box_embedding else None)
        return head, locations, emb4

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: ``pipeline.targets.collate`` output on the model's device.

        Returns loss_cls, loss_box, loss_ctr, loss_cae, loss_iae, loss (the total of Eq. 15),
        category_sums [C, D] and category_counts [C] (for ``memory.update``)."""
        head, locations, emb4 = self._forward_features(batch["images"])
        fc = self.cfg.fcos
        targets = fcos_targets(locations, fc.strides, fc.size_ranges, batch["seg"], batch["boxes"],
                               batch["classes"], self.num_stuff, fc.center_sample_radius)
        reduce = self.reduce_mean or (lambda t: t)
        out = fcos_losses(head, locations, targets, fc, reduce_fn=reduce)
        emb = full_resolution(emb4)
        out.update(ciae_loss(emb, batch["sem"], batch["seg"], batch["boxes"], self.memory(),
                             self.num_stuff, self.cfg.embedding, backend=self.kernel_backend,
                             reduce_fn=reduce))
        out["loss"] = out["loss_cls"] + out["loss_box"] + out["loss_ctr"] + out["loss_ciae"]
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                oracle: dict | None = None, return_embeddings: bool = False) -> list[dict]:
        """images [B, 3, H, W] uint8 padded; image_sizes: the unpadded (h, w) of each.

        ``oracle`` (Table IV): a collate batch with ground-truth ``seg``, ``boxes``, ``classes``
        replacing the detections. Returns per image {"panoptic": [h, w] int32 segment ids,
        "segments_info": [...]} (+ "embedding": [D, h/4, w/4] when asked)."""
        head, locations, emb4 = self._forward_features(images)
        memory = self.memory()
        stuff_memory = memory[: self.num_stuff]
        inf = self.cfg.inference
        results = []
        if oracle is None:
            dets = fcos_detect(head, locations, image_sizes, self.cfg.fcos)
        for i, size in enumerate(image_sizes):
            if oracle is not None:
                n = len(oracle["boxes"][i])
                queries = oracle_queries(emb4[i], oracle["seg"][i], self.num_stuff, n)
                boxes, classes = oracle["boxes"][i], oracle["classes"][i]
            else:
                queries = detection_queries(emb4[i], dets[i]["locations"])
                keep = select_instances(queries, dets[i]["boxes"], dets[i]["scores"], inf)
                queries, boxes, classes = queries[keep], dets[i]["boxes"][keep], dets[i]["classes"][keep]
                if inf.instance_class_from == "embedding":
                    thing_memory = memory[self.num_stuff:]
                    classes = classes_from_embedding(queries, thing_memory)
            ids, segments = assemble(emb4[i], size, stuff_memory, queries, boxes, classes,
                                     self.stuff_ids, self.thing_ids, inf, backend=self.kernel_backend)
            res = {"panoptic": ids, "segments_info": segments}
            if return_embeddings:
                res["embedding"] = emb4[i, :, : (size[0] + 3) // 4, : (size[1] + 3) // 4].cpu()
            results.append(res)
        return results
