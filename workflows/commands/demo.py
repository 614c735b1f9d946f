"""Run the pipeline end to end on the embedded default: a synthetic dataset, prepared into
Parquet shards by a Ray Data job on a local Ray.

Training, registration and labeling stages join as they land.

example:
  ciae demo --workdir runs/demo
"""

HELP = "run the pipeline end to end on synthetic data"


def add_arguments(p):
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default runs/demo)")
    p.add_argument("--train-images", type=int, default=48, help="synthetic training images (default 48)")
    p.add_argument("--val-images", type=int, default=16, help="synthetic held-out images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")


def run(args) -> int:
    import os

    from pipeline.prepare import prepare
    from pipeline.ray_runtime import connect
    from pipeline.shards import Source
    from pipeline.synth import SynthSpec, write_dataset

    wd = os.path.abspath(args.workdir)
    splits = {"train": (args.train_images, args.seed), "val": (args.val_images, args.seed + 1000)}
    with connect(args.address):
        for split, (n, seed) in splits.items():
            src = os.path.join(wd, "synth", split)
            print(f"[demo] synthetic {split} split: {n} images -> {src}")
            write_dataset(src, n, seed=seed, spec=SynthSpec(height=192, width=192), progress=True)  # Config.small()'s size
            out = os.path.join(wd, "shards", split)
            m = prepare(Source(os.path.join(src, "images"), os.path.join(src, "panoptic.json"),
                               os.path.join(src, "panoptic")), out, rows_per_shard=16)
            print(f"[demo] {split}: {m['counts']['images']} images in {m['counts']['shards']} shards, "
                  f"{m['counts']['rejected']} rejected -> {out}")
    print(f"[demo] done; everything is under {wd}")
    return 0
