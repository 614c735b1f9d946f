"""The typed jobs the ``ciae`` commands run, checked once when they are made; the command line
reads its defaults from them. Light on purpose: importing this module imports neither torch,
Ray nor MLflow, so that ``ciae --help`` stays instant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ciae.config import Config
from workflows.tracking.location import refuse_credentials

# CPUs per training worker when the job sets none (TrainJob.resolved): with GPUs, and without (room
# for the data tasks); per labeling actor (workflows.jobs.label.actor_cpus): LABEL_CPUS where that
# fits, else the largest share that leaves LABEL_DATA_CPUS of the cluster's to decoding and encoding
TRAIN_CPUS_GPU, TRAIN_CPUS = 4.0, 0.5
LABEL_CPUS, LABEL_DATA_CPUS = 1.0, 1.0


@dataclass
class TrainJob:
    """One training run, checked when it is made. Paths may be local or filesystem URIs."""

    data: str                              # prepared training shards
    val: str | None = None                 # held-out shards: periodic and final PQ
    config: Config = field(default_factory=Config.small)
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None   # default TRAIN_CPUS_GPU with GPUs, else TRAIN_CPUS
    batch_per_worker: int | None = None    # default solver.batch_size // workers
    iterations: int | None = None          # default solver.iterations (decay steps scale with it)
    storage: str = "runs/ray_results"      # Ray Train checkpoints (shared storage on a cluster)
    placement: str = "pack"                # workers on as few nodes as fit ("pack") or one per node ("spread")
    name: str | None = None                # run name; give it again to resume a stopped run
    tracking_uri: str | None = None
    artifact_root: str | None = None       # a new experiment's MLflow artifacts (default: the store's)
    experiment: str = "ciae"
    register: str | None = None            # registered model name (None: do not register)
    alias: str = "champion"
    eval_every: int = 0                    # validation PQ every N steps (0: at the end only)
    max_failures: int = 3
    pictures: int = 4                      # validation panels logged
    init: str | None = None                # initial weights (workflows.tracking.sources.fetch): fine-tuning

    def __post_init__(self):
        refuse_credentials("tracking URI", self.tracking_uri)
        refuse_credentials("artifact root", self.artifact_root)
        checks = [
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.gpus_per_worker == 0 or (self.gpus_per_worker >= 1 and self.gpus_per_worker % 1 == 0),
             f"gpus_per_worker must be 0 (CPU) or a whole number of GPUs, got {self.gpus_per_worker:g}: "
             "DDP ranks cannot share a GPU (NCCL refuses two ranks on one device); only labeling "
             "can share GPUs"),
            (self.cpus_per_worker is None or self.cpus_per_worker > 0,
             f"cpus_per_worker must be > 0, got {self.cpus_per_worker}"),
            (self.batch_per_worker is None or self.batch_per_worker >= 1,
             f"batch_per_worker must be >= 1, got {self.batch_per_worker}"),
            (self.iterations is None or self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.eval_every >= 0 and self.max_failures >= 0 and self.pictures >= 0,
             "eval_every, max_failures and pictures must be >= 0"),
            (self.placement in ("pack", "spread"), f"placement must be 'pack' or 'spread', got {self.placement!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        b = self.config.backbone
        if b.norm == "bn" and b.freeze_at < 5 and self.workers > 1 and not self.gpus_per_worker:
            raise ValueError(
                f"backbone.norm 'bn' with {self.workers} CPU workers: the workers' BatchNorm statistics "
                "must be synchronised (SyncBatchNorm), which torch runs on GPUs only; choose "
                "backbone.norm 'gn', one worker, or --gpus-per-worker 1")
        if b.norm == "frozen_bn" and not b.weights and not self.init:
            raise ValueError(
                "this config freezes the backbone's BatchNorm (backbone.norm 'frozen_bn', the paper's "
                "recipe for ImageNet weights) but gives no backbone.weights or --init, so its norms "
                "would do nothing: set backbone.weights to a torchvision ResNet state dict, start from "
                "a trained model with --init, or choose backbone.norm 'bn' or 'gn' (with freeze_at 0) "
                "to train from scratch")

    def resolved(self) -> tuple[Config, int, float]:
        """(config with the run's solver, batch per worker, CPUs per worker). The learning
        rate scales linearly with the global batch against solver.batch_size; the decay steps
        and warm-up scale with ``iterations``."""
        from ciae.engine.train import scale_schedule

        solver = self.config.solver
        if self.iterations and self.iterations != solver.iterations:
            solver = scale_schedule(solver, self.iterations)
        per_worker = self.batch_per_worker or max(1, solver.batch_size // self.workers)
        global_batch = per_worker * self.workers
        solver = dataclasses.replace(solver, lr=solver.lr * global_batch / solver.batch_size,
                                     batch_size=global_batch)
        cpus = self.cpus_per_worker or (TRAIN_CPUS_GPU if self.gpus_per_worker else TRAIN_CPUS)
        return dataclasses.replace(self.config, solver=solver), per_worker, cpus



@dataclass
class LabelJob:
    """One labeling job, checked when it is made. Paths may be local or filesystem URIs."""

    model: str                          # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., a checkpoint file
    input: str                          # folder, list file or shards
    out: str
    tracking_uri: str | None = None
    workers: int = 1                    # model actors
    batch_size: int = 8                 # images per model call
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None   # and torch threads of a CPU actor (default: LABEL_CPUS or a share)
    gt_json: str | None = None          # ground truth for PQ (folders and lists; shards carry theirs)
    gt_dir: str | None = None
    coco_panoptic: bool = False         # OUT/_coco/panoptic/*.png + _coco/predictions.json
    coco_instances: bool = False        # OUT/_coco/instances.json (thing segments, RLE)
    overlays: int = 0                   # panels of the first N images
    review: int = 1000                  # the N least confident images in OUT/_review.csv
    amp: bool = True                    # bfloat16 autocast on CUDA
    compile: bool = False               # torch.compile of the network on CUDA
    retry_rejected: bool = False        # label the rejected images of finished tasks again
    task_images: int = 1024             # images per task (and output shard), fixed by the first run
    stall_timeout: float = 300.0        # fail after this long without progress on a cluster that lost what the job holds

    def __post_init__(self):
        refuse_credentials("tracking URI", self.tracking_uri)
        if self.workers < 1 or self.batch_size < 1 or self.task_images < 1:
            raise ValueError("workers, batch_size and task_images must be >= 1")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 seconds, got {self.stall_timeout:g}")
        if self.gpus_per_worker < 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0) \
                or self.overlays < 0 or self.review < 0:
            raise ValueError("gpus_per_worker, overlays and review must be >= 0, cpus_per_worker > 0")
        if (self.gt_json is None) != (self.gt_dir is None):
            raise ValueError("give both gt_json and gt_dir, or neither")
        import os

        from pipeline.data.storage import absolute

        for f in ("input", "out", "gt_json", "gt_dir"):
            setattr(self, f, absolute(getattr(self, f)))   # actors run elsewhere
        if os.path.exists(self.model):                     # a local checkpoint or model folder
            self.model = os.path.abspath(self.model)
