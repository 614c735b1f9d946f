"""Convert a COCO panoptic dataset into Parquet shards with a Ray Data job.

Reads images, panoptic PNGs and the panoptic JSON from local paths or filesystem URIs
(file://, s3://, gs://, any fsspec protocol), validates every record against its PNG and writes
OUT/part-*.parquet (one row per image) and OUT/_manifest.json (schema version, categories with
contiguous stuff/thing indices, counts, every rejected record with its reason). Tools read OUT
as a Parquet dataset (pandas.read_parquet(OUT), pyarrow.dataset, Spark): one row per image; the
manifest and temporary files are skipped by their leading '_' and '.'.

Bad records are rejected and listed, never dropped silently; re-running into the same OUT skips
the shards already written and never duplicates a row.

example:
  ciae prepare --images coco/val2017 --panoptic-json coco/annotations/panoptic_val2017.json \\
               --panoptic-dir coco/annotations/panoptic_val2017 --out shards/val2017
"""

HELP = "convert COCO panoptic data to Parquet shards (Ray Data)"


def add_arguments(p):
    from pipeline.data.prepare import prepare
    from workflows.commands import defaults

    d = defaults(prepare)
    p.add_argument("--images", required=True, help="folder of images (path or URI)")
    p.add_argument("--panoptic-json", required=True, help="COCO panoptic JSON (path or URI)")
    p.add_argument("--panoptic-dir", required=True, help="folder of panoptic PNGs (path or URI)")
    p.add_argument("--out", required=True, help="output folder for shards and manifest (path or URI)")
    p.add_argument("--rows-per-shard", type=int, default=d["rows_per_shard"],
                   help=f"images per shard (default {d['rows_per_shard']})")
    p.add_argument("--address", default=d["address"], help="Ray cluster address (default: a local Ray)")


def run(args) -> int:
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import MANIFEST, Source
    from pipeline.data.storage import join, public_uri

    m = prepare(Source(args.images, args.panoptic_json, args.panoptic_dir), args.out,
                rows_per_shard=args.rows_per_shard, address=args.address)
    c = m["counts"]
    print(f"{c['images']} images in {c['shards']} shards ({m['skipped_shards']} already written), "
          f"{c['rejected']} rejected -> {public_uri(args.out)}")
    for r in m["rejected"][:20]:
        print(f"  rejected {r['image']}: {r['reason']}")
    if c["rejected"] > 20:
        print(f"  ... {c['rejected'] - 20} more in {join(public_uri(args.out), MANIFEST)}")
    return 0
