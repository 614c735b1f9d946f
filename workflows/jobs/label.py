"""Batch labeling with a registered model, shaped for millions of images: a streaming Ray Data job
whose stages are ``pipeline.label.stages``'s, writing Parquet shards exactly once.

1. The model is fetched once (``workflows.tracking.sources.fetch``: a registered model, a run's artifact,
   an MLflow model folder or a checkpoint file); the driver reads its test size from the
   checkpoint's config (its weights not deserialized: ``ModelSource.config``) and puts the
   checkpoint's bytes into Ray's object store once, for the actors. No actor imports MLflow.
2. The input (folder, list file or shards; local or URI) is planned once into tasks of
   consecutive images (``pipeline.label.sources``; re-runs reuse the plan).
3. Ray Data streams the unfinished images of the pending tasks through ``chunks`` -> ``decode``
   (CPU tasks) -> ``Labeler`` (``workers`` model actors, ``gpus_per_worker`` and
   ``cpus_per_worker`` each; fewer when the job is too small to give each a batch: a job of
   fewer tasks than actors has its tasks split so that each actor gets input) -> ``encode``
   (CPU tasks, writing parts).
4. The driver counts finished images on a progress bar (with the running PQ), seals each task
   into its shard (and summary) once all its images are in, and at the end writes the exports
   (``pipeline.label.exports``; counts, rejects, review list and PQ from the shards' summary,
   ``LabelStore.summary``: a finished job's re-run reads no shard for them).

Exactly once, whatever is killed: see ``pipeline.label.store``. The driver holds one plan task
of bookkeeping per task in flight, never a record per image.
"""

from __future__ import annotations

import math
import time

from ciae.data.panoptic import CategoryTable, DatasetError
from pipeline.data.storage import public_uri
from pipeline.label import exports
from pipeline.label import store as ls
from pipeline.label.sources import Plan, categories_of, load_plan, make_plan
from pipeline.label.stages import Labeler, actor_rows, chunks, decode, decode_memory, encode, input_items
from workflows.jobs.specs import LABEL_CPUS, LABEL_DATA_CPUS, LabelJob


def model_input(source):
    """The ``ciae.config.InputConfig`` (test size) of a fetched ``workflows.tracking.sources.ModelSource``'s
    checkpoint, read without deserializing its weights (``ModelSource.config``); ValueError when
    it holds no trained ciae model."""
    return source.config().input


def actor_cpus(job: LabelJob, cluster_cpus: float, workers: int | None = None) -> tuple[float, str | None]:
    """(CPUs per model actor, a line saying how they were chosen or None), for ``workers`` actors
    (default: the job's). The actors leave at least ``LABEL_DATA_CPUS`` of the cluster's CPUs to
    the decode and encode tasks. A share the job sets is checked (ValueError when it does not
    fit); without one, ``LABEL_CPUS`` each when that fits, else the largest share in 0.5 steps
    (or, below 0.5, in 0.05 steps) that does."""
    workers = workers or job.workers
    free = cluster_cpus - LABEL_DATA_CPUS
    if job.cpus_per_worker is not None:
        if workers * job.cpus_per_worker > free:
            raise ValueError(f"the model actors would hold {workers * job.cpus_per_worker:g} of the "
                             f"cluster's {cluster_cpus:g} CPUs, leaving less than one for decoding and "
                             "encoding; lower --workers or --cpus-per-worker (0.5 shares a CPU)")
        return job.cpus_per_worker, None
    share = min(LABEL_CPUS, free / workers)
    step = 0.5 if share >= 0.5 else 0.05
    share = round(math.floor(share / step + 1e-9) * step, 2)
    if share <= 0:
        raise ValueError(f"the cluster has {cluster_cpus:g} CPUs: {workers} model actors and the "
                         "decoding and encoding tasks (one CPU) do not fit; lower --workers or add CPUs")
    if share == LABEL_CPUS:
        return share, None
    return share, (f"label: {workers} model actors x {share:g} CPU (the cluster has {cluster_cpus:g}; one "
                   "is left to decoding and encoding); --cpus-per-worker sets it")


def _plan(job: LabelJob, store: ls.LabelStore) -> Plan:
    """The output's plan: the one written by an earlier run (which must be of this input), or a
    new one."""
    plan = load_plan(store.plan_uri, job.input, job.gt_dir)
    if plan is None:
        return make_plan(job.input, store.plan_uri, job.gt_json, job.gt_dir, job.task_images)
    if plan.input != public_uri(job.input) or (plan.ground_truth == "json") != (job.gt_json is not None):
        raise DatasetError(f"{job.out} holds the labels of {plan.input} "
                           f"({'with' if plan.ground_truth == 'json' else 'without'} ground-truth JSON); "
                           "use another --out")
    return plan


def label(job: LabelJob, address: str | None = None, progress: bool = True, labeler=Labeler) -> dict:
    """Run ``job`` on the Ray at ``address`` (default: a local Ray). Re-running resumes.
    ``labeler``: the model stage's actor class (benchmarks replace it with a trivial one; it is
    made as ``labeler(checkpoint, name, threads, amp, compile, batch_size)`` and called with
    ``actor_rows`` rows, several model batches of ``batch_size``).

    Returns {"out", "images" (in the input), "labeled", "rejected", "skipped" (finished before
    this run), "processed" (by this run), "seconds", "images_per_second" (this run's labeling),
    "overlays" (drawn by this run), "review" (rows of the review list), "metrics" (PQ summary
    with ground truth, else None), "timings" (seconds: plan, scan of what is done, labeling, the
    exports at the end), "stages" (Ray Data's statistics of each stage, text; None when nothing
    was left to label)}."""
    from workflows.tracking.location import Tracking
    from workflows.tracking.sources import fetch

    # without --tracking-uri, fetch resolves the default only for models:/ and runs:/ (a checkpoint
    # file creates no mlruns/ folder)
    source = fetch(job.model, Tracking.resolve(job.tracking_uri) if job.tracking_uri else None)
    input_cfg = model_input(source)
    store = ls.LabelStore(job.out)
    store.check_writable()
    clock = time.perf_counter()
    plan = _plan(job, store)
    timings = {"plan": time.perf_counter() - clock}
    categories = categories_of(plan)
    table = CategoryTable.from_json(categories)
    store.remove_temporaries()
    if job.retry_rejected:
        for task in store.rejected_tasks():     # from the tasks' summaries: no shard read for the others
            store.unseal_rejected(task)
    sealed = store.sealed()
    partial = {}
    for task in store.unsealed_tasks():
        if task in sealed:          # killed between its seal and the removal of its parts
            store.remove_parts(task)
        else:
            partial[task] = store.part_keys(task)
    for task in list(partial):
        if len(partial[task]) == plan.task_sizes[task]:      # killed between its last part and its seal
            store.seal(task, plan.task_sizes[task], table, job.review)
            sealed.add(task)
            del partial[task]
    pending = [t for t in range(len(plan.task_sizes)) if t not in sealed]
    todo = sum(plan.task_sizes[t] - len(partial.get(t, ())) for t in pending)
    start = time.perf_counter()
    timings["scan"] = start - clock - timings["plan"]
    stages = None
    if todo:
        stages = _run(job, source, input_cfg, plan, store, table, pending, partial, todo, address, progress,
                      labeler)
        store.remove_temporaries()      # the torn writes of workers lost mid-job (a node gone), retried
    seconds = time.perf_counter() - start
    timings["label"] = seconds

    done = store.summary(job.review, table)      # job.json: no shard read once the job has finished
    summary = {"out": job.out, "images": plan.images, "labeled": done.labeled, "rejected": done.rejected,
               "skipped": plan.images - todo, "processed": todo, "seconds": seconds,
               "images_per_second": todo / seconds if todo and seconds > 0 else None,
               "metrics": None, "overlays": 0, "stages": stages}
    if job.coco_panoptic:
        exports.export_coco_panoptic(store, categories)
    if job.coco_instances:
        exports.export_coco_instances(store, categories)
    exports.export_rejects(store, done, job.input)
    summary["review"] = exports.export_review(store, done, job.review)
    if plan.ground_truth:
        summary["metrics"] = exports.export_metrics(store, done, table, plan.images)
    summary["overlays"] = exports.draw_overlays(store, plan, categories, job.overlays)
    summary["timings"] = timings | {"exports": time.perf_counter() - start - seconds}
    return summary


def _run(job: LabelJob, source, input_cfg, plan: Plan, store: ls.LabelStore, table: CategoryTable,
         pending: list[int], partial: dict[int, set[str]], todo: int, address: str | None, progress: bool,
         labeler) -> str:
    """The Ray Data job over the pending tasks' images not yet in a part; seals tasks as they
    fill. Returns Ray Data's statistics of the stages."""
    from tqdm import tqdm

    from pipeline.cluster.ray_runtime import connect, watched
    from pipeline.evaluation.pq import PQAccumulator

    done = {t: set(partial.get(t, ())) for t in pending}
    running = PQAccumulator(table)
    with connect(address):
        import ray
        import ray.data

        # one item per pending task (a job of fewer tasks than actors has them split, so that
        # each actor gets input of its own), expanded into chunks of images by short tasks: no
        # task lives for the whole job (a paced reader would hold its CPU)
        items = input_items({t: plan.task_sizes[t] - len(partial.get(t, ())) for t in pending},
                            min(job.workers, max(1, todo // job.batch_size)))
        # each item reaches the actors as one block at least; no more actors than that (Ray Data
        # warns of a pool larger than its inputs, and an actor without input is a model loaded
        # for nothing)
        actors = min(job.workers, len(items))
        if actors < job.workers:
            print(f"label: {actors} of the {job.workers} model actors asked for ({todo} images, a batch of "
                  f"{job.batch_size} or more for each)", flush=True)
        cpus, note = actor_cpus(job, ray.cluster_resources().get("CPU", 0), actors)
        if note:
            print(note, flush=True)
        rows = actor_rows(job.batch_size, todo, actors, max(plan.task_sizes))
        checkpoint = ray.put(source.data)           # once; each actor reads it from the object store
        skip = {t: keys for t, keys in partial.items() if keys}
        ds = (ray.data.from_items(items, override_num_blocks=len(items))
              .flat_map(chunks, fn_kwargs={"plan_dir": plan.dir, "skip": skip, "credentials": plan.credentials})
              .map_batches(decode, batch_size=1, fn_kwargs={"input_cfg": input_cfg},
                           memory=decode_memory(input_cfg))
              .map_batches(labeler, batch_size=rows,
                           compute=ray.data.ActorPoolStrategy(size=actors),
                           num_cpus=cpus, num_gpus=job.gpus_per_worker or None,
                           fn_constructor_kwargs={"checkpoint": checkpoint, "name": source.spec,
                                                  "threads": max(1, int(cpus)), "amp": job.amp,
                                                  "compile": job.compile, "batch_size": job.batch_size})
              .map_batches(encode, batch_size=job.batch_size,
                           fn_kwargs={"store": store, "table": table, "coco_panoptic": job.coco_panoptic}))
        need = {"CPU": actors * cpus + 1, "GPU": actors * job.gpus_per_worker}
        gpus = f" and {job.gpus_per_worker:g} GPU" if job.gpus_per_worker else ""
        what = f"{actors} model actors x {cpus:g} CPU{gpus}, and one CPU for decoding and encoding"
        with tqdm(total=todo, unit="img", desc="label", disable=not progress) as bar:
            for part in watched(ds.iter_rows(), need, job.stall_timeout, what):
                task, keys = int(part["task"]), part["keys"]
                new = set(keys) - done[task]
                if len(new) == len(keys) and part["pq"]:
                    running.add_json(part["pq"])
                    bar.set_postfix(PQ=f"{100 * running.summary()['All']['pq']:.1f}")
                done[task] |= new
                bar.update(len(new))
                if len(done[task]) == plan.task_sizes[task]:
                    store.seal(task, plan.task_sizes[task], table, job.review)
                    del done[task]
        stats = ds.stats()
    unfinished = sorted(done)
    if unfinished:
        raise RuntimeError(f"tasks {unfinished[:10]} did not finish; run the job again to resume them")
    return stats
