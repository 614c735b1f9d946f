"""Ray Train training: one model whatever the worker count, MLflow tracking, registration, and
recovery from a killed worker."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import mlflow
import pytest
import ray.cloudpickle
import torch
from ray.train import UserCallback

from ciae.config import Config
from ciae.model import CIAEModel
from pipeline.prepare import prepare
from pipeline.shards import Source, read_manifest, read_table
from pipeline.targets import TargetConfig, TargetMaker, collate
from workflows.train import TrainJob, train

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers import nothing from tests


@pytest.fixture(scope="module")
def shards(synth_small, ray_local, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("train_shards") / "shards")
    prepare(Source(synth_small["images"], synth_small["panoptic_json"], synth_small["panoptic_dir"]), out,
            rows_per_shard=3, progress=False)
    return out


def tiny_config(**solver) -> Config:
    cfg = Config.small()
    cfg.solver = dataclasses.replace(cfg.solver, **solver)
    cfg.input = dataclasses.replace(cfg.input, shorter_sides=(96,), test_shorter_side=96, flip_prob=0.0)
    return cfg


def _equivalence_loop(c: dict) -> None:
    """Worker: take c["steps"] steps on fixed global batches, this rank's slice of each."""
    import ray.train

    from workflows.train_loop import distributed_trainer

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    cfg = Config.from_dict(c["config"])
    torch.manual_seed(0)
    model = CIAEModel(cfg, c["stuff_ids"], c["thing_ids"])
    trainer = distributed_trainer(model, cfg.solver, torch.device("cpu"))
    b = c["batch_per_worker"]
    for items in c["batches"]:
        trainer.train_step(collate(items[rank * b:(rank + 1) * b]))
    if rank == 0:
        torch.save(model.state_dict(), c["out"])
    ray.train.report({"step": trainer.step})


def _run_equivalence(workers: int, batches, manifest, cfg, out: str, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stuff = [int(k) for k in sorted(manifest["stuff_index"], key=manifest["stuff_index"].get)]
    things = [int(k) for k in sorted(manifest["thing_index"], key=manifest["thing_index"].get)]
    TorchTrainer(_equivalence_loop,
                 train_loop_config={"config": cfg.to_dict(), "stuff_ids": stuff, "thing_ids": things,
                                    "batches": batches, "batch_per_worker": len(batches[0]) // workers,
                                    "out": out},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=f"equivalence-{workers}", storage_path=storage)).fit()
    return torch.load(out, weights_only=True)


def test_two_workers_take_the_step_of_one_worker_with_their_joint_batch(shards, tmp_path):
    """1 worker with batch 4 and 2 workers with batch 2 each: same memory, nearly same weights."""
    cfg = tiny_config(warmup_iters=1, lr=0.02)
    manifest = read_manifest(shards)
    maker = TargetMaker.from_manifest(manifest, config=TargetConfig(shorter_sides=(96,), flip_prob=0.0),
                                      train=False)
    rows = read_table(shards).to_pylist()
    targets = [maker(r) for r in rows]
    batches = [[targets[(4 * s + k) % len(targets)] for k in range(4)] for s in range(3)]
    one = _run_equivalence(1, batches, manifest, cfg, str(tmp_path / "one.pt"), str(tmp_path / "rt"))
    two = _run_equivalence(2, batches, manifest, cfg, str(tmp_path / "two.pt"), str(tmp_path / "rt"))

    torch.manual_seed(0)
    initial = CIAEModel(cfg, [0] * len(manifest["stuff_index"]), [0] * len(manifest["thing_index"])).state_dict()
    mem = "memory.memory"
    assert mem in one, sorted(one)[:5]
    assert not torch.allclose(one[mem], initial[mem]), "the memory never moved"
    torch.testing.assert_close(two[mem], one[mem], atol=1e-5, rtol=0)
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one if one[k].is_floating_point())
    diff = max(float((one[k] - two[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3 and diff < 1e-3 * moved, (moved, diff)


class KillRankOneAfterFirstCheckpoint(UserCallback):
    """Runs in the Ray Train controller: SIGKILLs worker 1 right after the first checkpoint."""

    def __init__(self):
        self.killed = False

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and not self.killed:
            self.killed = True
            os.kill(metrics[1]["pid"], signal.SIGKILL)


def test_killed_worker_resumes_from_checkpoint_into_one_mlflow_run(shards, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = TrainJob(data=f"file://{shards}", val=shards, config=tiny_config(checkpoint_every=4), workers=2,
                   batch_per_worker=1, iterations=12, storage=f"file://{tmp_path}/ray_results", name="killed",
                   tracking_uri=uri, experiment="ft", register="ciae-test", pictures=1, max_failures=2)
    summary = train(job, callbacks=(KillRankOneAfterFirstCheckpoint(),), progress=False)

    assert summary["step"] == 12
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["run_id"]
    assert runs[0].info.status == "FINISHED"
    resumed = client.get_metric_history(summary["run_id"], "resumed_at_step")
    assert [m.value for m in resumed] == [4.0]                 # resumed from the step-4 checkpoint
    steps = {m.step for m in client.get_metric_history(summary["run_id"], "loss")}
    assert steps == set(range(1, 13))
    for key in ("loss_cae", "loss_iae", "loss_cls", "lr", "images_per_s"):
        assert client.get_metric_history(summary["run_id"], key), key
    run = client.get_run(summary["run_id"])
    assert run.data.params["solver.iterations"] == "12" and "val_pq" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config.json", "checkpoint", "pictures", "val_pq.json"} <= artifacts
    assert summary["model_version"] == "1" and summary["alias_moved"]
    champion = client.get_model_version_by_alias("ciae-test", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["val_pq"]) == pytest.approx(run.data.metrics["val_pq"], abs=1e-6)
