"""Write a synthetic dataset in COCO panoptic format.

OUT/images/*.jpg, OUT/panoptic/*.png (id = R + 256 G + 256^2 B) and OUT/panoptic.json, with real
COCO panoptic category ids and names. Deterministic in --seed.

example:
  ciae synth data/synth --images 64 --seed 0
  ciae synth data/synth --images 8 --categories sky-other-merged,sea,person,boat
"""

HELP = "write a synthetic COCO panoptic dataset"


def add_arguments(p):
    p.add_argument("out", help="output folder")
    p.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--height", type=int, default=256, help="image height (default 256)")
    p.add_argument("--width", type=int, default=256, help="image width (default 256)")
    p.add_argument("--categories", default=None,
                   help="comma-separated COCO panoptic category names or ids, at least one stuff and "
                        "one thing (default: 4 stuff and 4 thing classes)")


def run(args) -> int:
    from pipeline.synth import DEFAULT_CATEGORIES, SynthSpec, select_categories, write_dataset

    names = args.categories.split(",") if args.categories else DEFAULT_CATEGORIES
    doc = write_dataset(args.out, args.images, seed=args.seed, categories=select_categories(names),
                        spec=SynthSpec(height=args.height, width=args.width), progress=True)
    n_seg = sum(len(a["segments_info"]) for a in doc["annotations"])
    print(f"wrote {len(doc['images'])} images, {n_seg} segments, {len(doc['categories'])} categories "
          f"to {args.out}")
    return 0
