"""Run the whole pipeline end to end on the embedded default, on a local Ray:

  1. a synthetic COCO-panoptic dataset (train and held-out splits);
  2. Parquet shards of both, by a Ray Data job;
  3. training with Ray Train on --workers workers (DDP, gloo), tracked in MLflow (sqlite), the
     model registered as a pyfunc and given the alias @champion when it beats the holder;
  4. labeling of the held-out images with the registered model (streaming Ray Data job: decode
     tasks, model actors, encode tasks), written as Parquet shards and in COCO panoptic and
     instances formats, with PQ streamed against the ground truth and the least confident
     images listed first in _review.csv (the labels a Parquet dataset: pandas reads the folder);
  5. panels (image | prediction | ground truth | embedding PCA), on disk and as MLflow artifacts.

example:
  ciae demo --workdir runs/demo
"""

HELP = "run the pipeline end to end on synthetic data"


def add_arguments(p):
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default %(default)s)")
    p.add_argument("--train-images", type=int, default=256,
                   help="synthetic training images (default %(default)s)")
    p.add_argument("--val-images", type=int, default=48,
                   help="synthetic held-out images (default %(default)s)")
    p.add_argument("--iterations", type=int, default=600,
                   help="training steps (default %(default)s: held-out PQ ~0.72 in ~4 min on 2 cores; "
                        "Config.small()'s warm-up and decay steps scale with it)")
    p.add_argument("--workers", type=int, default=2,
                   help="Ray Train workers and labeling actors (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")


def run(args) -> int:
    import os
    import time

    from ciae.config import Config
    from pipeline.cluster.ray_runtime import connect
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source
    from pipeline.data.synth import SynthSpec, write_dataset
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob, TrainJob
    from workflows.jobs.train import train
    from workflows.tracking.location import DEFAULT_DB, SQLITE, Tracking

    t0 = time.perf_counter()
    wd = os.path.abspath(args.workdir)
    uri = SQLITE + os.path.join(wd, DEFAULT_DB)
    cfg = Config.small()
    size = cfg.input.test_shorter_side
    splits = {"train": (args.train_images, args.seed), "val": (args.val_images, args.seed + 1000)}
    with connect(args.address):
        for split, (n, seed) in splits.items():
            src = os.path.join(wd, "synth", split)
            print(f"[demo] synthetic {split} split: {n} images -> {src}")
            write_dataset(src, n, seed=seed, spec=SynthSpec(height=size, width=size), progress=True)
            out = os.path.join(wd, "shards", split)
            m = prepare(Source(os.path.join(src, "images"), os.path.join(src, "panoptic.json"),
                               os.path.join(src, "panoptic")), out, rows_per_shard=16)
            print(f"[demo] {split}: {m['counts']['images']} images in {m['counts']['shards']} shards, "
                  f"{m['counts']['rejected']} rejected -> {out}")

        print(f"[demo] training Config.small() for {args.iterations} steps on {args.workers} Ray Train workers")
        s = train(TrainJob(data=os.path.join(wd, "shards", "train"), val=os.path.join(wd, "shards", "val"),
                           config=cfg, workers=args.workers, iterations=args.iterations,
                           storage=os.path.join(wd, "ray_results"), tracking_uri=uri, experiment="ciae-demo",
                           register="ciae-demo"), address=args.address)
        print(f"[demo] trained to step {s['step']}: validation PQ {100 * s['pq']['All']['pq']:.1f}; "
              f"registered ciae-demo version {s['model_version']}"
              f"{' (now @champion)' if s['alias_moved'] else ' (@champion kept by a better version)'}")

        val = os.path.join(wd, "synth", "val")
        model_uri = f"models:/ciae-demo/{s['model_version']}"
        print(f"[demo] labeling {args.val_images} held-out images with {model_uri}")
        labels = label(LabelJob(model=model_uri, input=os.path.join(val, "images"), out=os.path.join(wd, "labels"),
                                tracking_uri=uri, workers=args.workers,
                                gt_json=os.path.join(val, "panoptic.json"), gt_dir=os.path.join(val, "panoptic"),
                                coco_panoptic=True, coco_instances=True, overlays=4),
                       address=args.address)
    pictures = Tracking.resolve(uri).download(f"runs:/{s['run_id']}/pictures", dst=wd)
    pq = labels["metrics"]["All"]
    print(f"""
[demo] done in {time.perf_counter() - t0:.0f} s. Held-out PQ {100 * pq['pq']:.1f} (SQ {100 * pq['sq']:.1f}, RQ {100 * pq['rq']:.1f})
  data          {os.path.join(wd, 'synth')}  (COCO panoptic) and {os.path.join(wd, 'shards')} (Parquet)
  checkpoints   {os.path.join(wd, 'ray_results')}
  MLflow        {uri}  run {s['run_id']}, model ciae-demo version {s['model_version']}
  labels        {labels['out']}/labels/*.parquet (one row per image: pandas.read_parquet of the folder),
                _coco/panoptic/*.png + _coco/predictions.json (COCO panoptic), _coco/instances.json
                (COCO instances, RLE), _metrics.json, _review.csv (least confident first), _rejects.json
  panels        {os.path.join(labels['out'], '_overlays')}  (image | prediction | ground truth)
  pictures      {pictures}  (validation panels with embedding PCA, also MLflow artifacts)
  MLflow UI     .venv/bin/mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000""")
    return 0
