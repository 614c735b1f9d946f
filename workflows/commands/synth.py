"""Write a synthetic dataset in COCO panoptic format.

OUT/images/*.jpg, OUT/panoptic/*.png (id = R + 256 G + 256^2 B) and OUT/panoptic.json, with real
COCO panoptic category ids and names. Deterministic in --seed.

example:
  ciae synth data/synth --images 64 --seed 0
  ciae synth data/synth --images 8 --categories sky-other-merged,sea,person,boat
"""

HELP = "write a synthetic COCO panoptic dataset"


def add_arguments(p):
    from pipeline.data.synth import DEFAULT_CATEGORIES, SynthSpec, write_dataset
    from workflows.commands import defaults

    d, spec = defaults(write_dataset), defaults(SynthSpec)
    p.add_argument("out", help="output folder")
    p.add_argument("--images", type=int, default=d["n_images"], help=f"number of images (default {d['n_images']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"random seed (default {d['seed']})")
    p.add_argument("--height", type=int, default=spec["height"], help=f"image height (default {spec['height']})")
    p.add_argument("--width", type=int, default=spec["width"], help=f"image width (default {spec['width']})")
    p.add_argument("--categories",
                   help="comma-separated COCO panoptic category names or ids, at least one stuff and "
                        f"one thing (default: {','.join(DEFAULT_CATEGORIES)})")


def run(args) -> int:
    from pipeline.data.synth import SynthSpec, select_categories, write_dataset

    categories = select_categories(args.categories.split(",")) if args.categories else None
    doc = write_dataset(args.out, args.images, seed=args.seed, categories=categories,
                        spec=SynthSpec(height=args.height, width=args.width), progress=True)
    n_seg = sum(len(a["segments_info"]) for a in doc["annotations"])
    print(f"wrote {len(doc['images'])} images, {n_seg} segments, {len(doc['categories'])} categories "
          f"to {args.out}")
    return 0
