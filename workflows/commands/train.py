"""Train CIAE with Ray Train (DDP over N workers) on prepared shards, tracked in MLflow.

Each worker streams its split of the shards through Ray Data (decode and augmentation run as Ray
Data tasks, prefetched). The learning rate scales with the global batch (workers x batch per
worker) against the config's solver.batch_size. Rank 0 logs the loss terms, learning rate and
images/s per step, and validation PQ, to one MLflow run; the final checkpoint is evaluated,
logged with overlays, registered as a pyfunc model, and given the alias when it beats the holder.

A killed worker restarts from the latest checkpoint (--max-failures); a stopped driver resumes
when run again with the same --name.

examples:
  ciae train --data runs/demo/shards/train --val runs/demo/shards/val --register ciae-demo
  ciae train --data s3://bucket/shards/train2017 --val s3://bucket/shards/val2017 --config paper \\
      --workers 8 --gpus-per-worker 1 --batch-per-worker 2 --address auto \\
      --storage s3://bucket/ray_results --tracking-uri http://mlflow:5000 --register ciae-r50
"""

HELP = "train with Ray Train, tracked and registered in MLflow"


def add_arguments(p):
    p.add_argument("--data", required=True, help="prepared training shards (folder or URI)")
    p.add_argument("--val", default=None, help="prepared held-out shards for validation PQ")
    p.add_argument("--config", default="small",
                   help="'small' (CPU-sized, default), 'paper' (ResNet-50, 90k iterations), or a JSON "
                        "file of overrides: {\"base\": \"small\"|\"paper\", \"solver\": {\"lr\": 0.02}, ...}")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker (default 0.5 on CPU, leaving room for Ray Data; 4 with GPUs)")
    p.add_argument("--batch-per-worker", type=int, default=None,
                   help="images per worker per step (default: the config's batch / workers)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--storage", default="runs/ray_results", help="Ray Train checkpoint storage (path or URI)")
    p.add_argument("--name", default=None, help="run name; an existing stopped run of that name resumes")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--experiment", default="ciae", help="MLflow experiment (default ciae)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the model under NAME")
    p.add_argument("--alias", default="champion", help="alias given when validation PQ beats its holder")
    p.add_argument("--eval-every", type=int, default=0, help="validation PQ every N steps (0: at the end)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts allowed (default 3)")


def load_config(spec: str):
    """'small', 'paper', or a JSON file {"base": "small"|"paper", section: {key: value}}."""
    import json

    from ciae.config import Config

    presets = {"small": Config.small, "paper": Config}
    if spec in presets:
        return presets[spec]()
    try:
        with open(spec) as f:
            overrides = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--config {spec}: not 'small', 'paper' or a readable JSON file ({e})")
    base = overrides.pop("base", "small")
    if base not in presets:
        raise SystemExit(f"--config {spec}: base must be 'small' or 'paper', got {base!r}")
    try:
        return presets[base]().merged(overrides)
    except ValueError as e:
        raise SystemExit(f"--config {spec}: {e}")


def run(args) -> int:
    from workflows.train import TrainJob, train

    job = TrainJob(data=args.data, val=args.val, config=load_config(args.config), workers=args.workers,
                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                   batch_per_worker=args.batch_per_worker, iterations=args.iterations,
                   storage=args.storage, name=args.name, tracking_uri=args.tracking_uri,
                   experiment=args.experiment, register=args.register, alias=args.alias,
                   eval_every=args.eval_every, max_failures=args.max_failures)
    s = train(job, address=args.address)
    print(f"[train] run {s['name']} finished at step {s['step']} (MLflow run {s['run_id']}, {s['tracking_uri']})")
    if s["pq"]:
        print(f"[train] validation PQ {100 * s['pq']['All']['pq']:.1f}")
    if s["model_version"]:
        held = "now holds" if s["alias_moved"] else "did not take"
        print(f"[train] registered {args.register} version {s['model_version']}; it {held} @{args.alias}")
    return 0
