"""Ray Train training: one model whatever the worker count, MLflow tracking, registration, and
recovery from a killed worker."""

from __future__ import annotations

import dataclasses
import os
import sys

import mlflow
import pytest
import ray.cloudpickle
import torch

from ciae.config import Config
from ciae.model import CIAEModel
from pipeline.shards import read_manifest
from workflows.jobs import TrainJob
from workflows.train import train

from ray_callbacks import KillRankOneAfterFirstCheckpoint

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers import nothing from tests


@pytest.fixture(scope="module")
def shards(synth_small, make_shards) -> str:
    return make_shards(synth_small, 3)      # row groups that straddle the workers' parts


def tiny_config(**solver) -> Config:
    cfg = Config.small()
    cfg.solver = dataclasses.replace(cfg.solver, **solver)
    cfg.input = dataclasses.replace(cfg.input, shorter_sides=(96,), test_shorter_side=96, flip_prob=0.0)
    return cfg


def test_two_workers_take_the_steps_of_one_worker_with_their_joint_batch(shards, tmp_path):
    """``ciae train`` end to end, 1 worker with batch 4 and 2 workers with batch 2: the plan gives
    them the same images per step, so the memory is the same and the weights nearly so."""
    cfg = tiny_config(warmup_iters=1, lr=0.02, iterations=3)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    final = {}
    for workers in (1, 2):
        job = TrainJob(data=shards, config=cfg, workers=workers, batch_per_worker=4 // workers, iterations=3,
                       storage=str(tmp_path / "rt"), name=f"equivalence-{workers}", tracking_uri=uri,
                       experiment="equivalence", pictures=0)
        final[workers] = torch.load(train(job, progress=False)["checkpoint"], weights_only=True)["model"]
    one, two = final[1], final[2]

    manifest = read_manifest(shards)
    torch.manual_seed(cfg.solver.seed)
    initial = CIAEModel(cfg, [0] * len(manifest["stuff_index"]), [0] * len(manifest["thing_index"])).state_dict()
    mem = "memory.memory"
    assert mem in one, sorted(one)[:5]
    assert not torch.allclose(one[mem], initial[mem]), "the memory never moved"
    torch.testing.assert_close(two[mem], one[mem], atol=1e-5, rtol=0)
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one if one[k].is_floating_point())
    diff = max(float((one[k] - two[k]).abs().max()) for k in one if one[k].is_floating_point())
    assert moved > 1e-3 and diff < 1e-3 * moved, (moved, diff)


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
