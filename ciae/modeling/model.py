"""The CIAE panoptic model (paper Fig. 3): ResNet-FPN, an FCOS proposal head on P3-P7 that also
predicts box embeddings, an embedding branch on P2-P5, and the category memory.

Training: ``model(batch, memory_step=(t, T))`` updates the category memory from the batch
(Eq. 13-14) and returns the losses of Eq. 15 (focal, box IoU, centerness and CIAE), the CIAE
loss taking the updated memory as its queries.
Inference: ``model.predict(images, image_sizes)`` returns COCO panoptic id maps and segments_info.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ciae import checkpoint
from ciae.config import Config
from ciae.modeling.backbone import FrozenBatchNorm2d, GroupNorm2d, build_backbone
from ciae.modeling.embedding import EmbeddingBranch, full_resolution
from ciae.modeling.fcos import (FCOSHead, compute_locations, fcos_detect, fcos_losses, fcos_normalisers,
                                fcos_targets)
from ciae.modeling.fpn import FPN
from ciae.modeling.inference import (assemble, classes_from_embedding, detection_queries, oracle_queries,
                                     segments_info, select_instances)
from ciae.modeling.loss import category_sums, ciae_loss, ciae_normalisers
from ciae.modeling.memory import CategoryMemory


class CIAEModel(nn.Module):
    """``stuff_ids`` / ``thing_ids``: COCO category ids in contiguous-index order (the manifest's
    ``stuff_index`` / ``thing_index``); ``category_names``: id -> name where known (checkpoints
    keep them, so that fine-tuning can tell which categories two models share)."""

    def __init__(self, cfg: Config, stuff_ids: list[int], thing_ids: list[int],
                 category_names: dict[int, str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.stuff_ids, self.thing_ids = list(stuff_ids), list(thing_ids)
        self.category_names = {int(k): str(v) for k, v in (category_names or {}).items()}
        e = cfg.embedding
        self.backbone = build_backbone(cfg.backbone)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn.channels)
        self.head = FCOSHead(cfg.fpn.channels, len(thing_ids), e.dim if e.box_embedding else None,
                             cfg.fcos)
        self.embedding = EmbeddingBranch(cfg.fpn.channels, e.branch_channels, e.dim,
                                         coordconv=e.coordconv, box_embedding=e.box_embedding)
        n_memory = len(stuff_ids) + {"merged": 1, "specific": len(thing_ids), "none": 0}[e.thing_mode]
        self.memory = CategoryMemory(n_memory, e.dim, momentum=e.memory_momentum, seed=cfg.solver.seed)
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.kernel_backend = "auto"
        # the mean of a flat tensor over data-parallel workers (set by the distributed trainer):
        # a step's memory statistics and loss normalisers, so that every worker's memory stays
        # identical and W workers with batch B take the step of one worker with batch W * B
        self.reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str | torch.device = "cpu") -> "CIAEModel":
        """The model a checkpoint (``ciae.checkpoint``, as ``ciae.checkpoint.load`` read it)
        describes: rebuilt from its config and categories, weights and memory loaded, in eval
        mode on ``device``. ValueError naming what is missing when ``ckpt`` is not one."""
        lacking = checkpoint.missing(ckpt)
        if lacking:
            held = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"not a ciae checkpoint: it lacks {', '.join(lacking)} (it holds {held})")
        model = cls(Config.from_dict(ckpt["config"]), ckpt["stuff_ids"], ckpt["thing_ids"],
                    ckpt.get("category_names"))
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval()

    @property
    def num_stuff(self) -> int:
        return len(self.stuff_ids)

    @property
    def kernel_backend(self) -> str:
        """The backend of the fused kernels (``kernels.dispatch``: "auto", "triton" or "torch"),
        for the loss, the post-processing, every GroupNorm + ReLU and every frozen BatchNorm with
        what follows it."""
        return self._kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, name: str) -> None:
        self._kernel_backend = name
        for m in self.modules():
            if isinstance(m, (GroupNorm2d, FrozenBatchNorm2d)):
                m.backend = name

    def compile_features(self, **options) -> None:
        """Compile the network (backbone to embedding map) with ``torch.compile``, dynamic
        shapes (``options`` go to it, e.g. ``backend``); the loss and the post-processing stay
        eager. In training its backward is compiled with it."""
        self._forward_features = torch.compile(self._forward_features, dynamic=True, **options)

    def _forward_features(self, images: torch.Tensor):
        """images [B, 3, H, W] uint8 (H, W multiples of 32) -> (head outputs, FCOS locations,
        stride-4 embedding map [B, D, H/4, W/4])."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        p = self.fpn(self.backbone(x))
        levels = [p[f"p{i}"] for i in range(3, 3 + len(self.cfg.fcos.strides))]
        head = self.head(levels)
        locations = compute_locations([f.shape[-2:] for f in levels], self.cfg.fcos.strides, images.device)
        emb4 = self.embedding([p["p2"], p["p3"], p["p4"], p["p5"]], head.get("box_embed"))
        return head, locations, emb4

    def forward(self, batch: dict, memory_step: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """batch: ``pipeline.feed.targets.collate`` output on the model's device (``sem`` and ``seg``
        of any integer dtype: they travel narrow and are widened here); ``memory_step``: (t, T)
        of a training step, which first updates the memory with this batch's category means
        (Eq. 13-14) before the loss takes it; None leaves it as it is.

        Over data-parallel workers, one all-reduce (``reduce_mean``) per step carries the memory
        statistics and every loss normaliser (FCOS positives and centerness sum, CIAE pixel
        counts) together: the memory update depends only on the sums' directions, so their
        means do as well as their sums.

        Returns loss_cls, loss_box, loss_ctr, loss_cae, loss_iae, loss_ciae and loss (Eq. 15)."""
        sem, seg = batch["sem"].long(), batch["seg"].long()
        head, locations, emb4 = self._forward_features(batch["images"])
        fc = self.cfg.fcos
        targets = fcos_targets(locations, fc.strides, fc.size_ranges, seg, batch["boxes"],
                               batch["classes"], self.num_stuff, fc.center_sample_radius)
        emb = full_resolution(emb4)
        stats = [fcos_normalisers(targets), ciae_normalisers(sem, seg)]
        if memory_step is not None:
            sums, counts = category_sums(emb, sem, self.memory.num_categories,
                                         backend=self.kernel_backend)
            stats += [counts, sums.flatten()]
        stats = self.reduce_mean(torch.cat(stats))
        if memory_step is not None:
            c = self.memory.num_categories
            self.memory.update(stats[4 + c:].view(c, -1), stats[4:4 + c], *memory_step)
        out = fcos_losses(head, locations, targets, fc, normalisers=stats[:2])
        out.update(ciae_loss(emb, sem, seg, batch["boxes"], self.memory(), self.num_stuff,
                             self.cfg.embedding, backend=self.kernel_backend,
                             normalisers=stats[2:4]))
        out["loss"] = out["loss_cls"] + out["loss_box"] + out["loss_ctr"] + out["loss_ciae"]
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                oracle: dict | None = None, return_embeddings: bool = False,
                out_sizes: list[tuple[int, int]] | None = None) -> list[dict]:
        """images [B, 3, H, W] uint8 padded; image_sizes: the unpadded (h, w) of each;
        out_sizes: the (H, W) each id map is returned at (default ``image_sizes``; nearest
        resampling, ``ciae.data.transform.resize_nearest``), its segments measured there.

        ``oracle`` (Table IV): a collate batch with ground-truth ``seg``, ``boxes``, ``classes``
        replacing the detections. Returns per image {"panoptic": [H, W] int32 segment ids, a
        tensor on the images' device, "segments_info": [...] with a ``score`` per segment}
        (+ "embedding": [D, h/4, w/4] when asked). ``predict_on_device`` does the work; the
        segments' numbers reach the host in one copy for the batch."""
        if not image_sizes:
            return []
        ids, table, emb4 = self.predict_on_device(images, image_sizes, oracle, out_sizes)
        rows = table.cpu().numpy()
        results = []
        for i, (h, w) in enumerate(image_sizes):
            res = {"panoptic": ids[i],
                   "segments_info": segments_info(rows[i], self.stuff_ids, self.thing_ids)}
            if return_embeddings:
                res["embedding"] = emb4[i, :, : (h + 3) // 4, : (w + 3) // 4].cpu()
            results.append(res)
        return results

    @torch.no_grad()
    def predict_on_device(self, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                          oracle: dict | None = None, out_sizes: list[tuple[int, int]] | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``predict``'s work, queued on the images' device without a host sync: the network,
        detection, query selection and ``ciae.modeling.inference.assemble`` for the whole batch.

        Returns (per image the [H', W'] int32 id map, ``assemble``'s table [B, Q, 9] float64
        for ``segments_info``, the stride-4 embeddings [B, D, h, w]). With ``oracle`` the
        instance queries are made per image (``oracle_queries``), padded to the batch's largest
        number of instances."""
        head, locations, emb4 = self._forward_features(images)
        memory = self.memory()
        inf = self.cfg.inference
        if oracle is None:
            dets = fcos_detect(head, locations, image_sizes, self.cfg.fcos, backend=self.kernel_backend)
            queries = detection_queries(emb4, dets["locations"])
            valid = select_instances(queries, dets["boxes"], dets["scores"], dets["valid"], inf,
                                     backend=self.kernel_backend)
            boxes, classes, scores = dets["boxes"], dets["classes"], dets["scores"]
            if inf.instance_class_from == "embedding":
                classes = classes_from_embedding(queries, memory[self.num_stuff:])
        else:
            pad = functools.partial(nn.utils.rnn.pad_sequence, batch_first=True)
            counts = [len(b) for b in oracle["boxes"]]
            queries = pad([oracle_queries(emb4[i], oracle["seg"][i].long(), self.num_stuff, n)
                           for i, n in enumerate(counts)])
            boxes, classes = pad(list(oracle["boxes"])), pad(list(oracle["classes"]))
            valid = pad([boxes.new_ones(n, dtype=torch.bool) for n in counts])
            scores = valid.to(boxes.dtype)
        ids, table = assemble(emb4, image_sizes, memory[: self.num_stuff], queries, boxes, classes,
                              scores, valid, inf, backend=self.kernel_backend, out_sizes=out_sizes)
        return ids, table, emb4
