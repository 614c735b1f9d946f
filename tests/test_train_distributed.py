"""Ray Train training: one model whatever the worker count; what DDP needs of the model (no
unused parameter, synchronised BatchNorm) and of the hooks (validation that stalls no rank), the
latter in two gloo processes. (MLflow tracking, registration and recovery from a killed worker:
``test_s3.py``, on S3 against the same job on local folders.)"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from datetime import timedelta

import pytest
import ray.cloudpickle
import torch
import torch.multiprocessing

from ciae.config import Config
from ciae.modeling.model import CIAEModel
from pipeline.data.shards import read_manifest
from workflows.jobs.specs import TrainJob

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers import nothing from tests


@pytest.fixture(scope="module")
def shards(synth_small, make_shards) -> str:
    return make_shards(synth_small, 3)      # row groups that straddle the workers' parts


def tiny_config(**solver) -> Config:
    cfg = Config.small()
    cfg.solver = dataclasses.replace(cfg.solver, **solver)
    cfg.input = dataclasses.replace(cfg.input, shorter_sides=(96,), test_shorter_side=96, flip_prob=0.0)
    return cfg


def two_worker_job(**kw) -> TrainJob:
    """The job of ``two_worker_run`` (conftest.py: on local folders, once per session) and of
    test_s3.py's killed-worker run on S3: ``tiny_config`` without box embeddings (Table III's
    ablation), lr 0.02 after one warm-up step, a checkpoint every 2 steps; 2 workers of batch 1,
    6 steps, one restart allowed, one picture. ``kw``: the places (data, val, storage,
    tracking, names)."""
    cfg = tiny_config(warmup_iters=1, lr=0.02, iterations=6, checkpoint_every=2).merged(
        {"embedding": {"box_embedding": False}})
    return TrainJob(config=cfg, workers=2, batch_per_worker=1, iterations=6, pictures=1, max_failures=1, **kw)


def train_here(job: TrainJob) -> tuple[dict, float | None]:
    """What ``train(job)`` trains with one CPU worker, in this process without Ray: the final
    weights and the validation PQ. The worker's model, trainer, batches (``batch_stream``: the
    plan ``stream_batches`` splits between workers) and torch threads, so byte for byte its
    weights (``test_s3_faults.py`` compares them with a ``ciae train`` run)."""
    from pipeline.evaluation.validation import evaluate
    from pipeline.feed.stream import batch_stream, model_for_shards
    from workflows.jobs.train_worker import distributed_trainer

    cfg, _, cpus = dataclasses.replace(job, workers=1).resolved()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        torch.manual_seed(cfg.solver.seed)
        model = model_for_shards(cfg, job.data)
        distributed_trainer(model, torch.device("cpu")).fit(batch_stream(job.data, cfg), cfg.solver.iterations)
        pq = evaluate(model, job.val)["All"]["pq"] if job.val else None
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, pq


def test_two_workers_take_the_steps_of_one_worker_with_their_joint_batch(two_worker_run):
    """``ciae train`` end to end with 2 workers of batch 1 (``two_worker_run``, 6 steps) and one
    process with batch 2 (``train_here``: what a 1-worker run trains, byte for byte): the plan
    gives them the same images per step, so the memory is the same and the weights nearly so.
    Trained without box embeddings, Table III's ablation (a Ray Train run less than a test of its
    own; test_ray_nodes.py's and test_finetune.py's two workers train with them): the head
    computes none, so DDP finds every parameter used (an unused one fails the second step:
    "Expected to have finished reduction")."""
    job, summary = two_worker_run["job"], two_worker_run["summary"]
    assert summary["step"] == 6 and job.workers == 2 and job.batch_per_worker == 1
    two = torch.load(summary["checkpoint"], weights_only=True)["model"]
    one, _ = train_here(dataclasses.replace(job, data=two_worker_run["shards"], val=None, workers=1,
                                            batch_per_worker=2))
    assert not [k for k in two if "box_embed" in k]

    cfg = job.resolved()[0]
    manifest = read_manifest(two_worker_run["shards"])
    torch.manual_seed(cfg.solver.seed)
    initial = CIAEModel(cfg, [0] * len(manifest["stuff_index"]), [0] * len(manifest["thing_index"])).state_dict()
    mem = "memory.memory"
    assert mem in one, sorted(one)[:5]
    assert not torch.allclose(one[mem], initial[mem]), "the memory never moved"
    torch.testing.assert_close(two[mem], one[mem], atol=1e-5, rtol=0)
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one if one[k].is_floating_point())
    diff = max(float((one[k] - two[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3 and diff < 1e-3 * moved, (moved, diff)


# ---- two gloo processes, without Ray ---------------------------------------------------------

def spawn_ranks(fn, *args, setup=None, timeout_s: float = 120, world: int = 2) -> None:
    """``fn(rank, world, prepared, *args)`` in ``world`` processes joined in a gloo group whose
    collectives time out after ``timeout_s``; ``prepared = setup(rank, *args)`` (or None) is made
    before the group exists, so that it does not count against the timeout. A rank's exception
    fails the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(world, port, timeout_s, fn, setup, args), nprocs=world)


def _rank_main(rank: int, world: int, port: int, timeout_s: float, fn, setup, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    prepared = setup(rank, *args) if setup else None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, prepared, *args)
    finally:
        dist.destroy_process_group()


def batchnorms(module) -> list:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_trained_batchnorm_becomes_syncbatchnorm_and_frozen_batchnorm_stays_frozen():
    from ciae.modeling.backbone import FrozenBatchNorm2d
    from workflows.jobs.train_worker import sync_batchnorm

    torch.manual_seed(0)
    model = CIAEModel(tiny_config().merged({"backbone": {"norm": "bn", "freeze_at": 2}}), [1, 2], [3])
    before = model.state_dict()
    b = model.backbone
    trained = [m for stage in (b.layer2, b.layer3, b.layer4) for m in batchnorms(stage)]
    frozen = batchnorms(b.bn1) + batchnorms(b.layer1)
    assert sync_batchnorm(model) == len(trained) > 0
    model.train()
    for old, new in zip(trained, [m for stage in (b.layer2, b.layer3, b.layer4) for m in batchnorms(stage)]):
        assert isinstance(new, torch.nn.SyncBatchNorm) and new.training
        assert new.weight is old.weight and new.running_mean is old.running_mean   # the same tensors
    assert batchnorms(b.bn1) + batchnorms(b.layer1) == frozen                     # frozen stages untouched
    assert all(not m.training and not m.weight.requires_grad for m in frozen)
    after = model.state_dict()                                     # checkpoints keep their keys
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    frozen_bn = CIAEModel(tiny_config().merged({"backbone": {"norm": "frozen_bn"}}), [1, 2], [3])
    group_norm = CIAEModel(tiny_config(), [1, 2], [3])
    assert sync_batchnorm(frozen_bn) == sync_batchnorm(group_norm) == 0
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen_bn.modules())


def _wrap_in_ddp(rank: int, world: int, prepared, out: str) -> None:
    from workflows.jobs.train_worker import distributed_trainer

    results = {}
    for norm in ("bn", "gn"):
        model = CIAEModel(tiny_config().merged({"backbone": {"norm": norm, "freeze_at": 0}}), [1, 2], [3])
        try:
            trainer = distributed_trainer(model, torch.device("cpu"))
            results[norm] = type(trainer.module).__name__
        except ValueError as e:
            results[norm] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_two_workers_synchronise_batchnorm_before_ddp(tmp_path):
    """``distributed_trainer`` converts before wrapping in DDP; DDP accepts SyncBatchNorm on GPUs
    only, which is why ``TrainJob`` refuses ``bn`` with several CPU workers."""
    spawn_ranks(_wrap_in_ddp, str(tmp_path))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results == {"bn": "SyncBatchNorm layers only work with GPU modules",
                           "gn": "DistributedDataParallel"}, results


def test_validation_parts_add_up_to_the_whole_set(synth_shards):
    """``pipeline.evaluation.validation.accumulate``'s parts: consecutive rows, across shard boundaries (shards
    of 4 and 2 rows in 2 and 4 parts), whose merged statistics are the whole set's."""
    from pipeline.evaluation.validation import accumulate
    from pipeline.feed.stream import model_for_shards

    torch.manual_seed(0)
    model = model_for_shards(tiny_config(), synth_shards)
    whole = accumulate(model, synth_shards)
    assert whole.images == 6 and whole.fn.sum() > 0
    for world, sizes in ((2, [3, 3]), (4, [1, 2, 1, 2])):
        parts = [accumulate(model, synth_shards, part=(rank, world)) for rank in range(world)]
        assert [p.images for p in parts] == sizes
        merged = sum(parts[1:], parts[0])
        for field in ("tp", "fp", "fn"):
            assert (getattr(merged, field) == getattr(whole, field)).all(), field
        assert merged.iou == pytest.approx(whole.iou, abs=1e-12)


VALIDATION_S_PER_IMAGE = 1.5     # 6 held-out images: 9 s on one rank, 4.5 s on each of two
GROUP_TIMEOUT_S = 5.0


def _validation_setup(rank: int, shards: str, out: str, uri: str, run_id: str):
    """The model, and rank 0's MLflow log (its client made before the group's clock runs)."""
    from pipeline.feed.stream import model_for_shards
    from workflows.jobs.train_worker import _MlflowLog
    from workflows.tracking.location import Tracking

    cfg = tiny_config(iterations=2, checkpoint_every=100)
    torch.manual_seed(cfg.solver.seed)
    return model_for_shards(cfg, shards), _MlflowLog(Tracking(uri), run_id) if rank == 0 else None


def _train_validating_every_step(rank: int, world: int, prepared, shards: str, out: str, uri: str,
                                 run_id: str) -> None:
    """Two steps under DDP with the workers' hooks, validating (slowly) after each."""
    from pipeline.feed.stream import batch_stream
    from workflows.jobs.train_worker import CHECKPOINT_FILE, StepHooks, WorkerSpec, distributed_trainer
    from workflows.tracking.location import Tracking

    model, log = prepared
    validated = []
    predict = CIAEModel.predict_on_device

    def slow_predict(self, images, *args, **kw):
        validated.append(len(images))
        time.sleep(VALIDATION_S_PER_IMAGE * len(images))
        return predict(self, images, *args, **kw)

    CIAEModel.predict_on_device = slow_predict

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            shutil.copy(os.path.join(checkpoint_dir, CHECKPOINT_FILE), os.path.join(out, CHECKPOINT_FILE))

    cfg = model.cfg
    spec = WorkerSpec(config=cfg, stuff_ids=model.stuff_ids, thing_ids=model.thing_ids,
                      category_names=model.category_names, data=shards, val=shards, batch_per_worker=2,
                      threads=1, eval_every=1, tracking=Tracking(uri), run_id=run_id)
    trainer = distributed_trainer(model, torch.device("cpu"))
    hooks = StepHooks(spec, trainer, rank, world, log, report)
    trainer.fit(batch_stream(shards, cfg), cfg.solver.iterations, on_step=hooks.on_step,
                on_checkpoint=hooks.on_checkpoint)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"validated": validated, "pq": hooks.val["All"]["pq"]}, f)


def test_validation_stalls_no_rank_and_gives_the_pq_of_one_process(shards, mlflow_db, tmp_path):
    """Validation that alone takes longer than the process group's timeout: every rank validates
    its half at the same time, so no rank waits in a collective meanwhile, and the PQ statistics
    summed over the ranks give the PQ one process measures."""
    from ciae import checkpoint
    from pipeline.evaluation.validation import evaluate
    from workflows.tracking.location import Tracking

    tracking = Tracking.resolve(mlflow_db)
    uri, client = tracking.uri, tracking.client()
    run_id = client.create_run(tracking.experiment_id("validation")).info.run_id
    images = read_manifest(shards)["counts"]["images"]
    assert images * VALIDATION_S_PER_IMAGE > GROUP_TIMEOUT_S + 3
    spawn_ranks(_train_validating_every_step, shards, str(tmp_path), uri, run_id,
                setup=_validation_setup, timeout_s=GROUP_TIMEOUT_S)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [sum(r["validated"]) for r in ranks] == [images, images]    # two validations, half each
    path = str(tmp_path / "checkpoint.pt")
    reference = evaluate(CIAEModel.from_checkpoint(checkpoint.load(path, path)), shards)["All"]["pq"]
    assert ranks[0]["pq"] == ranks[1]["pq"] == pytest.approx(reference, abs=1e-12)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_pq")}
    assert sorted(logged) == [1, 2] and logged[2] == pytest.approx(reference, abs=1e-12)
