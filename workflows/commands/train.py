"""Train CIAE with Ray Train (DDP over N workers) on prepared shards, tracked in MLflow.

Each worker takes its part of the training plan from Ray tasks (decode and augmentation, one
task per step, several steps in flight). The learning rate scales with the global batch (workers x batch
per worker) against the config's solver.batch_size. Rank 0 logs the loss terms, learning rate
and images/s per step, and validation PQ, to one MLflow run; the final checkpoint is evaluated,
logged with pictures, registered as a pyfunc model, and given the alias when it beats the holder.

A killed worker restarts from the latest checkpoint (--max-failures); a stopped driver resumes
when run again with the same --name.

--init starts from another model's weights (fine-tuning, e.g. a COCO model on your own data
with other categories): every tensor whose name and shape fit is carried, the class logits and
the category memory keep the rows of the categories both datasets share (same COCO id and
name); the run records the source (tags ciae.init, ciae.init.run_id, ciae.init.model_version)
and what was carried, partly carried, re-initialised and dropped (artifact init.json), and with
--val logs the validation PQ before the first step.

--config: 'small' (CPU-sized), 'paper' (ResNet-50-FPN, 90k iterations; needs
ImageNet weights, see below) or a JSON file of overrides:
  {"base": "paper", "backbone": {"weights": "/data/resnet50.pth"}, "solver": {"iterations": 45000}}

examples:
  ciae train --data runs/demo/shards/train --val runs/demo/shards/val --register ciae-demo
  ciae train --data shards/my_data --val shards/my_val --config paper --init models:/ciae-r50@champion \
      --iterations 10000 --register ciae-my-data
  ciae train --data s3://bucket/shards/train2017 --val s3://bucket/shards/val2017 --config paper.json \\
      --workers 8 --gpus-per-worker 1 --batch-per-worker 2 --address auto \\
      --storage s3://bucket/ray_results --tracking-uri http://mlflow:5000 --register ciae-r50
"""

import dataclasses

HELP = "train with Ray Train, tracked and registered in MLflow"


def add_arguments(p):
    from ciae.config import PRESETS
    from workflows.commands import defaults
    from workflows.jobs.specs import TRAIN_CPUS, TRAIN_CPUS_GPU, TrainJob
    from workflows.tracking.location import ARTIFACTS, DEFAULT_DB, SQLITE

    d = defaults(TrainJob)
    config = next(f.default_factory for f in dataclasses.fields(TrainJob) if f.name == "config")
    preset = next(name for name, make in PRESETS.items() if make == config)     # TrainJob's, by name
    p.add_argument("--data", required=True, help="prepared training shards (folder or URI)")
    p.add_argument("--val", default=d["val"], help="prepared held-out shards for validation PQ")
    p.add_argument("--config", default=preset,
                   help=f"a preset ({', '.join(PRESETS)}) or a JSON file of overrides (default %(default)s)")
    p.add_argument("--iterations", type=int, default=d["iterations"], help="training steps (default: the config's)")
    p.add_argument("--workers", type=int, default=d["workers"], help=f"Ray Train workers (default {d['workers']})")
    p.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"],
                   help=f"GPUs per worker (default {d['gpus_per_worker']:g}: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"],
                   help=f"CPUs per worker (default: on CPU {TRAIN_CPUS:g}, leaving room for the data tasks; "
                        f"with GPUs {TRAIN_CPUS_GPU:g})")
    p.add_argument("--batch-per-worker", type=int, default=d["batch_per_worker"],
                   help="images per worker per step (default: the config's batch / workers)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--storage", default=d["storage"],
                   help=f"Ray Train checkpoint storage, path or URI (default {d['storage']})")
    p.add_argument("--placement", default=d["placement"], choices=("pack", "spread"),
                   help="workers on as few nodes as fit (pack) or one per node where there is room (spread); "
                        "either moves them to the nodes left when one is lost (default %(default)s)")
    p.add_argument("--name", default=d["name"], help="run name; an existing stopped run of that name resumes")
    p.add_argument("--tracking-uri", default=d["tracking_uri"],
                   help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {SQLITE}{DEFAULT_DB})")
    p.add_argument("--artifact-root", default=d["artifact_root"], metavar="URI",
                   help="where a new experiment keeps its MLflow artifacts, e.g. s3://bucket/mlflow "
                        f"(default: for a sqlite store, {ARTIFACTS}/ beside its database; a server's "
                        "own root)")
    p.add_argument("--experiment", default=d["experiment"], help=f"MLflow experiment (default {d['experiment']})")
    p.add_argument("--register", default=d["register"], metavar="NAME", help="register the model under NAME")
    p.add_argument("--alias", default=d["alias"],
                   help=f"alias given when validation PQ beats its holder (default {d['alias']})")
    p.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="validation PQ every N steps (0: at the end only; default %(default)s)")
    p.add_argument("--max-failures", type=int, default=d["max_failures"],
                   help=f"worker-group restarts allowed (default {d['max_failures']})")
    p.add_argument("--pictures", type=int, default=d["pictures"],
                   help=f"validation panels logged to MLflow (default {d['pictures']})")
    p.add_argument("--init", default=d["init"], metavar="SOURCE",
                   help="start from these weights (fine-tuning): models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/PATH, a checkpoint of this project or a torchvision ResNet state dict "
                        "(path or URI); shared categories keep their weights, new ones start afresh")


def run(args) -> int:
    from ciae.config import Config
    from workflows.jobs.specs import TrainJob
    from workflows.jobs.train import train

    try:
        config = Config.load(args.config)
    except ValueError as e:
        raise ValueError(f"--config {e}") from None
    fields = {f.name for f in dataclasses.fields(TrainJob)} - {"config"}
    job = TrainJob(config=config, **{k: getattr(args, k) for k in fields})
    s = train(job, address=args.address)
    print(f"[train] run {s['name']} finished at step {s['step']} (MLflow run {s['run_id']}, {s['tracking_uri']})")
    if s["pq"]:
        print(f"[train] validation PQ {100 * s['pq']['All']['pq']:.1f}")
    if s["model_version"]:
        held = "now holds" if s["alias_moved"] else "did not take"
        print(f"[train] registered {args.register} version {s['model_version']}; it {held} @{args.alias}")
    return 0
