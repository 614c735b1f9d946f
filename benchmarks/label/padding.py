"""What padding costs the network when a batch mixes orientations, and what batching like shapes
together (``ciae.data.transform.batch_order``, which ``Labeler`` and ``Predictor`` apply) saves.

1. *Pixels*: a COCO-like mix of image sizes (an assumption, not COCO's measured distribution:
   ``--portrait`` of them portraits, the rest landscapes, at 640x480, 640x427 and a few squares
   and 500x375), resized to the paper's test size (shorter side 800, longer at most 1333),
   batched by ``--batch-size`` within calls of ``DECODE_BATCH`` images (the model actor's input)
   in arrival order and in ``batch_order``, each batch padded to its largest image (a multiple of
   32): the pixels the network computes per pixel labeled, and the distinct padded shapes.
   The same for training steps: the plan of ``pipeline.feed.stream`` (one epoch, global batch
   G, one worker) without and with aspect grouping (``epoch_order``'s groups), at shorter side
   800.
2. *Time*: the network's forward pass of a ``Config.small()`` model (untrained, one torch thread)
   on --images of the same mix at its own test size (192, longer side at most 320), batched both
   ways, alternated over --runs runs: CPU ms per image. (On the CPU the post-processing of this
   small model costs ~3x its network; on a GPU at 800 px the network dominates.)

    python benchmarks/label/padding.py [--images 64] [--batch-size 8] [--portrait 0.25] [--runs 3]

Nothing is asserted; tests/test_transform.py and tests/test_label_actor.py check the order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ciae.data.transform import batch_order, output_size, padded_size  # noqa: E402
from pipeline.label.stages import DECODE_BATCH  # noqa: E402

LANDSCAPES = [(480, 640)] * 6 + [(427, 640)] * 3 + [(375, 500)]
SQUARES = [(640, 640)]


def draw_sizes(n: int, portrait: float, seed: int = 0) -> list[tuple[int, int]]:
    """n (h, w): ``portrait`` of them turned landscapes, 1 in 20 square, the rest landscapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.05:
            out.append(SQUARES[0])
        else:
            h, w = LANDSCAPES[rng.integers(len(LANDSCAPES))]
            out.append((w, h) if u < 0.05 + portrait else (h, w))
    return out


def batches(sizes: list[tuple[int, int]], batch: int, ordered: bool) -> list[list[int]]:
    """Indices into ``sizes`` per model batch, within calls of DECODE_BATCH images."""
    out = []
    for c in range(0, len(sizes), DECODE_BATCH):
        call = list(range(c, min(c + DECODE_BATCH, len(sizes))))
        if ordered:
            call = [call[j] for j in batch_order([sizes[k] for k in call])]
        out += [call[b:b + batch] for b in range(0, len(call), batch)]
    return out


def pixels(sizes: list[tuple[int, int]], batch: int, ordered: bool) -> tuple[float, int]:
    """(pixels computed per pixel labeled, distinct padded shapes) at the paper's test size."""
    test = [output_size(h, w, 800, 1333) for h, w in sizes]
    computed, shapes = 0, set()
    for group in batches(test, batch, ordered):
        shape = padded_size([test[k] for k in group])
        computed += shape[0] * shape[1] * len(group)
        shapes.add(shape)
    return computed / sum(h * w for h, w in test), len(shapes)


def training_pixels(sizes: list[tuple[int, int]], batch: int, grouped: bool) -> float:
    """Pixels computed per pixel trained over one epoch of the training plan."""
    from pipeline.feed.stream import epoch_order, steps_per_epoch

    test = [output_size(h, w, 800, 1333) for h, w in sizes]
    groups = np.array([h > w for h, w in sizes], np.int8) if grouped else None
    order = epoch_order(len(sizes), 0, 0, groups, batch)
    computed = real = 0
    for s in range(steps_per_epoch(len(sizes), batch, groups)):
        step = [test[k] for k in order[s * batch:(s + 1) * batch]]
        hh, ww = padded_size(step)
        computed += hh * ww * len(step)
        real += sum(h * w for h, w in step)
    return computed / real


def timed(n: int, batch: int, portrait: float, runs: int) -> dict[str, list[float]]:
    """CPU seconds per image of the network's forward pass (``CIAEModel._forward_features``, what a
    GPU spends most of a batch on at 800 px) over the same images batched both ways."""
    import torch

    from ciae.config import Config
    from ciae.data.transform import Transform
    from ciae.modeling.model import CIAEModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Config.small()
    model = CIAEModel(cfg, stuff_ids=list(range(92, 145)), thing_ids=list(range(1, 81))).eval()
    transform = Transform(cfg.input)
    rng = np.random.default_rng(2)
    images = [transform.resize_for_test(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in draw_sizes(n, portrait, seed=1)]
    made = {name: [transform.batch([images[k] for k in group])[0]
                   for group in batches([im.shape[1:] for im in images], batch, ordered)]
            for name, ordered in (("arrival order", False), ("batch_order", True))}
    out: dict[str, list[float]] = {name: [] for name in made}
    with torch.no_grad():
        model._forward_features(made["batch_order"][0])              # warm-up
        for _ in range(runs):
            for name, tensors in made.items():
                start = time.process_time()
                for t in tensors:
                    model._forward_features(t)
                out[name].append((time.process_time() - start) / n)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images timed (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch (default 8)")
    p.add_argument("--portrait", type=float, default=0.25, help="share of portraits (default 0.25)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each order (default 3)")
    args = p.parse_args()

    sizes = draw_sizes(64 * 200, args.portrait)
    print(f"pixels computed per pixel labeled, {len(sizes)} COCO-like images ({args.portrait:.0%} portraits), "
          f"paper's test size, calls of {DECODE_BATCH}")
    print("| batch | arrival order | batch_order | padded shapes, arrival / batch_order |")
    print("|---:|---:|---:|---|")
    for b in sorted({8, 16, args.batch_size}):
        (a, na), (o, no) = pixels(sizes, b, False), pixels(sizes, b, True)
        print(f"| {b} | {a:.3f} | {o:.3f} | {na} / {no} |")
    print("\ntraining: pixels computed per pixel trained, one epoch of the same images, shorter side 800")
    print("| global batch | ungrouped | aspect grouping |\n|---:|---:|---:|")
    for b in (8, 16):
        print(f"| {b} | {training_pixels(sizes, b, False):.3f} | {training_pixels(sizes, b, True):.3f} |")
    t = timed(args.images, args.batch_size, args.portrait, args.runs)
    print(f"\nthe network's forward, Config.small() at test size 192, {args.images} images, batch "
          f"{args.batch_size}, one thread: CPU ms per image, median (min-max) of {args.runs}")
    for name, v in t.items():
        print(f"  {name}: {1e3 * statistics.median(v):.1f} ({1e3 * min(v):.1f}-{1e3 * max(v):.1f})")


if __name__ == "__main__":
    main()
