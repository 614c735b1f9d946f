"""The training driver: Ray Train (TorchTrainer, DDP) fed by Ray tasks, tracked in MLflow.

A :class:`TrainJob` is the one typed description of a run, validated once when it is made; the
CLI reads its defaults from it. ``train(job)`` creates (or, for a run name given again, reopens)
one MLflow run and logs the resolved config; starts a TorchTrainer whose workers run
``workflows.jobs.train_worker.train_worker`` on a :class:`~workflows.jobs.train_worker.WorkerSpec` built
from the job, each streaming its part of the training plan (``pipeline.feed.stream``) with Ray
Data and validating its part of the held-out shards along the way and at the end (rank 0 logs
the PQ); then logs the final checkpoint with pictures, logs the MLflow pyfunc model, registers
it, and moves the alias when its validation PQ beats the holder's.

Failures: Ray Train restarts the worker group from the latest checkpoint (``max_failures``
times); a driver run again with the same ``name`` resumes from the run's storage and logs into
the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time

from ciae.config import Config
from pipeline.data.storage import absolute, public_uri, resolve
from workflows.jobs.specs import TrainJob
from workflows.jobs.train_worker import CHECKPOINT_FILE, STEP_TAG
from workflows.tracking.location import Tracking

NAME_TAG = "ciae.run_name"      # the Ray Train run name, to reopen the MLflow run on resume


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"solver.lr": "0.01", ...} for MLflow params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _open_run(client, experiment_id: str, name: str, params: dict) -> str:
    """The MLflow run of ``name``: reopened if a stopped one exists, else created with params."""
    from mlflow.entities import Param

    runs = client.search_runs([experiment_id], f"tags.`{NAME_TAG}` = '{name}'")
    if runs:
        run = runs[0]
        if run.info.status == "FINISHED":
            raise ValueError(f"run {name!r} already finished (MLflow run {run.info.run_id}); "
                             "choose another --name")
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={NAME_TAG: name})
    items = [Param(k, v) for k, v in params.items()]
    for k in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[k:k + 100])
    return run.info.run_id


class _Progress(threading.Thread):
    """A driver-side progress bar fed by rank 0's step tag in MLflow."""

    def __init__(self, client, run_id: str, total: int):
        super().__init__(daemon=True)
        self.client, self.run_id, self.total = client, run_id, total
        self.done = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, desc="train", unit="step") as bar:
            while not self.done.wait(1.0):
                try:
                    run = self.client.get_run(self.run_id)
                except Exception:   # the store is busy; try again next tick
                    continue
                step = int(run.data.tags.get(STEP_TAG, 0))
                bar.update(max(0, step - bar.n))
                if "loss" in run.data.metrics:
                    bar.set_postfix(loss=f"{run.data.metrics['loss']:.3f}")


def train(job: TrainJob, address: str | None = None, callbacks: tuple = (), progress: bool = True) -> dict:
    """Run ``job`` on the Ray cluster at ``address`` (default: a local Ray). ``callbacks``:
    Ray Train ``UserCallback``s. Returns a summary: run_id, name, step, checkpoint (a local
    copy), pq (dict or None), model_version, alias_moved, tracking_uri."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster.ray_runtime import connect
    from pipeline.data.shards import model_categories, read_manifest
    from pipeline.feed.stream import steps_per_epoch
    from workflows.jobs.train_worker import WorkerSpec, train_worker

    cfg, per_worker, cpus = job.resolved()
    solver = cfg.solver
    manifest = read_manifest(job.data)
    steps_per_epoch(manifest["counts"]["images"], solver.batch_size)   # refuses a set smaller than a batch
    stuff_ids, thing_ids, names = model_categories(manifest)
    name = job.name or time.strftime("ciae-%Y%m%d-%H%M%S")

    tracking = Tracking.resolve(job.tracking_uri, job.artifact_root)
    client = tracking.client()
    exp_id = tracking.experiment_id(job.experiment)
    params = flat_params(cfg.to_dict())
    params.update({"job.data": job.data, "job.val": str(job.val), "job.workers": str(job.workers),
                   "job.batch_per_worker": str(per_worker), "job.gpus_per_worker": str(job.gpus_per_worker),
                   "job.init": str(job.init)})
    params = {k: public_uri(v) for k, v in params.items()}        # no credential of a URI in MLflow
    init = _init_source(job.init, tracking, cfg, stuff_ids, thing_ids, names) if job.init else None
    lineage = _lineage(init[0] if init else None, manifest["source"].get("review"))
    run_id = _open_run(client, exp_id, name, params)
    _log_lineage(client, run_id, lineage, init[1] if init else None)
    # paths the workers open: absolute, as their working directory need not be the driver's
    spec = WorkerSpec(config=cfg, stuff_ids=stuff_ids, thing_ids=thing_ids, category_names=names,
                      data=absolute(job.data),
                      val=absolute(job.val), batch_per_worker=per_worker, threads=max(1, int(cpus)),
                      eval_every=job.eval_every, tracking=tracking, run_id=run_id)
    bar = _Progress(client, run_id, solver.iterations) if progress else None
    try:
        with connect(address):
            import ray

            if init:    # the weights travel to every worker through the object store
                spec = dataclasses.replace(spec, init=(init[0].spec, ray.put(init[0].data)))
            spec = dataclasses.replace(spec, data_window=_data_window(cfg, per_worker, job.workers, cpus))
            # Ray Train records its storage path (run state, dashboard): the URI's credentials stay
            # in the filesystem
            storage_fs, storage_path = resolve(job.storage)
            trainer = TorchTrainer(
                train_worker, train_loop_config={"spec": spec},
                scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                             placement_strategy=job.placement.upper(),
                                             resources_per_worker={"CPU": cpus, **({"GPU": job.gpus_per_worker}
                                                                                   if job.gpus_per_worker else {})}),
                run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                     callbacks=list(callbacks),
                                     failure_config=FailureConfig(max_failures=job.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)))
            if bar:
                bar.start()
            result = trainer.fit()
            if bar:
                bar.done.set()
                bar.join()
            with result.checkpoint.as_directory() as d:
                with open(os.path.join(d, CHECKPOINT_FILE), "rb") as f:
                    data = f.read()
        summary = _finish(job, tracking, run_id, data, (result.metrics or {}).get("val"), lineage)
    except BaseException:
        if bar:
            bar.done.set()
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    summary.update(run_id=run_id, name=name, tracking_uri=tracking.uri)
    return summary


def _init_source(spec: str, tracking: Tracking, cfg: Config, stuff_ids, thing_ids, names) -> tuple:
    """(the fetched source, its transfer report), checked on the driver before any worker
    starts: an unknown model, a foreign or unfitting checkpoint fails here."""
    from ciae.engine.finetune import transfer
    from ciae.modeling.model import CIAEModel
    from workflows.tracking.sources import fetch

    source = fetch(spec, tracking)
    return source, transfer(CIAEModel(cfg, stuff_ids, thing_ids, names), source.source())


def _lineage(source, review: dict | None) -> dict[str, str]:
    """The run's lineage as tags: where its weights started (``ciae.init``: the ``--init`` spec,
    ``ciae.init.run_id``, ``ciae.init.model_version``) and, for shards prepared from ``ciae review
    pull`` (the manifest's ``source.review``), the review project its annotations came from
    (``ciae.review.project``, ``.project_id``, ``.url``, ``.pulled``)."""
    tags = {}
    if source is not None:
        tags["ciae.init"] = source.spec
        if source.run_id:
            tags["ciae.init.run_id"] = source.run_id
        if source.model_version:
            tags["ciae.init.model_version"] = source.model_version
    if isinstance(review, dict):
        for k in ("project", "project_id", "url", "pulled"):
            if review.get(k) is not None:
                tags[f"ciae.review.{k}"] = str(review[k])
    return tags


def _log_lineage(client, run_id: str, tags: dict[str, str], report: dict | None) -> None:
    """The lineage tags on the run, and the ``--init`` transfer report in full (``init.json``);
    the registered version gets the same tags (``_finish``)."""
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    if report is not None:
        client.log_dict(run_id, report, "init.json")


def _data_window(cfg: Config, per_worker: int, workers: int, cpus: float) -> int:
    """Steps each worker keeps in the making (``pipeline.feed.stream.data_window``) on this
    cluster; refuses workers that leave no CPU to the data tasks, which would starve."""
    import ray

    from pipeline.feed.stream import data_window

    total = ray.cluster_resources()
    free = total.get("CPU", 0) - workers * cpus
    if free < 1:
        raise ValueError(f"the workers hold {workers * cpus:g} of the cluster's {total.get('CPU', 0):g} CPUs, "
                         "leaving less than one for the data tasks; lower --cpus-per-worker or --workers")
    return data_window(cfg, per_worker, workers, free, total.get("object_store_memory", 0))


def _finish(job: TrainJob, tracking: Tracking, run_id: str, data: bytes, pq: dict | None,
            lineage: dict[str, str] | None = None) -> dict:
    """Artifacts, the pyfunc model, registration and the alias, from the final checkpoint's
    bytes, loaded here once. ``pq``: the workers' validation of the final checkpoint, as rank 0
    reported it."""
    from ciae import checkpoint
    from ciae.modeling.model import CIAEModel

    path = os.path.join(tempfile.mkdtemp(prefix="ciae-train-"), CHECKPOINT_FILE)   # the summary's copy
    with open(path, "wb") as f:
        f.write(data)
    ckpt = checkpoint.load(data, path)
    client = tracking.client()
    client.log_dict(run_id, ckpt["config"], "config.json")
    client.log_artifact(run_id, path, "checkpoint")
    if pq:
        client.log_dict(run_id, pq, "val_pq.json")
    if job.val and job.pictures:
        _log_pictures(client, run_id, CIAEModel.from_checkpoint(ckpt), job.val, job.pictures)
    version, moved = None, False
    if job.register:
        from workflows.tracking.registry import register

        version, moved = register(tracking, run_id, path, ckpt, job.register, job.alias,
                                  pq["All"]["pq"] if pq else None, tags=lineage)
    return {"step": int(ckpt["step"]), "checkpoint": path, "pq": pq, "model_version": version,
            "alias_moved": moved}


def _log_pictures(client, run_id: str, model, val_shards: str, n: int) -> None:
    """Panels (image | prediction | ground truth | embedding PCA, ``pipeline.evaluation.visualize.panel``)
    of the first ``n`` held-out images, logged under ``pictures/``."""
    from PIL import Image

    from ciae.data.transform import decode_rgb
    from ciae.engine.predictor import Predictor
    from pipeline.data.shards import decode_panoptic_row, read_manifest, read_table
    from pipeline.evaluation.visualize import panel

    categories = read_manifest(val_shards)["categories"]
    rows = read_table(val_shards).slice(0, n).to_pylist()
    images = [decode_rgb(r["image"]) for r in rows]
    preds = Predictor(model)(images, return_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        for row, image, pred in zip(rows, images, preds):
            index, segments = decode_panoptic_row(row)
            gt = (index, [{"id": k + 1, "category_id": s["category_id"]} for k, s in enumerate(segments)])
            picture = panel(image, pred["panoptic"], pred["segments_info"], categories, gt=gt,
                            embedding=pred["embedding"])
            Image.fromarray(picture).save(os.path.join(d, f"{os.path.splitext(row['file_name'])[0]}_panel.png"))
        client.log_artifacts(run_id, d, "pictures")
