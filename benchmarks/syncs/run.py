"""Ops and host syncs of a training step and of an inference batch, counted on the CPU.

On a GPU the host issues every op of a step as a kernel launch (a few microseconds each, whatever
the op does) and stops at every host sync until the device has caught up; so these two counts,
which a CPU run shows exactly (``ciae.utils.opcount.OpCounter``), set how much of a GPU the real jobs
can use. Reported per backend ("torch": the CPU path; "triton": the kernels a GPU runs, here
under the Triton interpreter):

* a training step (``Trainer.train_step``) of a small model at ``--size``, batch 2;
* an inference batch (``Predictor.predict_batch``: network, detection, NMS, instance selection,
  assignment, measurement, the copy to the host) at batch 1 and ``--batch``, with a model whose
  detector fires everywhere (many overlapping detections, as a trained one at COCO scale), and
  the ratio of their op counts.

Usage: ``python benchmarks/syncs/run.py [--size 128] [--batch 8] [--out FILE]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported: CPU tensors run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from ciae.config import Config  # noqa: E402
from ciae.modeling.model import CIAEModel  # noqa: E402
from ciae.utils.opcount import OpCounter  # noqa: E402


def small_model(detect_everywhere: bool) -> CIAEModel:
    cfg = Config.small().merged({"backbone": {"width": 8}, "fpn": {"channels": 32},
                                 "embedding": {"dim": 8, "branch_channels": 16}})
    torch.manual_seed(0)
    model = CIAEModel(cfg, stuff_ids=[184, 187], thing_ids=[1, 3])
    if detect_everywhere:
        with torch.no_grad():
            model.head.cls_logits.bias.fill_(10.0)
            model.head.centerness.bias.fill_(10.0)
            model.head.box_reg.bias.fill_(2.0)
    return model


def batch_of(b: int, h: int, w: int) -> dict:
    """Two stuff classes, two instances per image (``pipeline.feed.targets.collate``'s layout)."""
    g = torch.Generator().manual_seed(0)
    seg = torch.zeros(b, h, w, dtype=torch.int64)
    seg[:, h // 2:] = 1
    seg[:, h // 8:h // 2, w // 8:w // 2] = 2
    seg[:, h // 4:3 * h // 4, w // 3:3 * w // 4] = 3
    sem = torch.where(seg >= 2, torch.full_like(seg, 2), seg)
    boxes = [torch.tensor([[w / 8, h / 8, w / 2, h / 4], [w / 3, h / 4, 3 * w / 4, 3 * h / 4]])] * b
    return {"images": torch.randint(0, 255, (b, 3, h, w), dtype=torch.uint8, generator=g), "sem": sem,
            "seg": seg, "boxes": boxes, "classes": [torch.tensor([0, 1])] * b,
            "image_sizes": [(h, w)] * b, "image_ids": list(range(b))}


def count(fn) -> dict:
    fn()                                    # warm-up (caches, first-call paths)
    with OpCounter() as c:
        fn()
    return {"ops": c.num_ops, "syncs": c.num_syncs, "where": c.report().split("\n")[1:]}


def training_step(backend: str, size: int) -> dict:
    from ciae.engine.train import Trainer

    model = small_model(False)
    model.kernel_backend = backend
    trainer = Trainer(model)
    batch = batch_of(2, size, size * 3 // 2)
    return count(lambda: trainer.train_step(batch))


def inference(backend: str, size: int, b: int) -> dict:
    from ciae.engine.predictor import Predictor

    model = small_model(True)
    model.kernel_backend = backend
    predictor = Predictor(model)
    images = batch_of(b, size, size * 3 // 2)["images"]
    sizes = [(size, size * 3 // 2)] * b
    return count(lambda: predictor.predict_batch(images, sizes, sizes))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="image height (width 1.5x)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backends", default="torch,triton")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {}
    for backend in args.backends.split(","):
        one, many = inference(backend, args.size, 1), inference(backend, args.size, args.batch)
        result[backend] = {"train_step": training_step(backend, args.size), "infer_b1": one,
                           f"infer_b{args.batch}": many, "ops_ratio": many["ops"] / one["ops"]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
