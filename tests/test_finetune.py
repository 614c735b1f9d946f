"""Fine-tuning (``ciae train --init``): from a registered model, a run's artifact, a checkpoint or
torchvision ResNet weights, onto a dataset with other categories; shared categories keep their
rows; the run records its lineage; clear errors; and a killed fine-tuning run resumes.

Two Ray Train runs serve every test: one fine-tuning run from the registered model, killed after
its first checkpoint (``finetuned``: its start, lineage and resumption), and the CLI's run onto
the COCO sample from that run's checkpoint artifact."""

from __future__ import annotations

import dataclasses
import io
import json
import sys

import mlflow
import pytest
import ray
import torch
from ray_callbacks import KillRankOneAfterFirstCheckpoint

from ciae import checkpoint
from ciae.checkpoint import read_source
from ciae.config import Config
from ciae.engine.finetune import memory_rows, transfer
from ciae.modeling.backbone import ResNet
from ciae.modeling.model import CIAEModel
from pipeline.evaluation.validation import evaluate
from pipeline.feed.stream import model_for_shards
from workflows.jobs.specs import TrainJob
from workflows.jobs.train import train
from workflows.tracking.location import Tracking
from workflows.tracking.sources import fetch

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers import nothing from tests


def source_of(trained_small):
    return fetch(trained_small["uri"], Tracking.resolve(trained_small["tracking"]))


def test_onto_the_coco_categories_backbone_and_fpn_are_carried_exactly(trained_small, coco_sample, make_shards):
    src = source_of(trained_small)
    assert src.model_version == "ciae-trained/1" and src.run_id
    source = src.source()
    torch.manual_seed(1)
    model = model_for_shards(Config.small(), make_shards(coco_sample))        # 53 stuff, 80 things
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = transfer(model, source)
    state = model.state_dict()
    moved = [k for k in source.state if k.startswith(("backbone.", "fpn."))]
    assert moved and all(torch.equal(state[k], source.state[k]) for k in moved)
    assert set(moved) <= set(report["carried"])
    # the synthetic categories are COCO's: their rows come along, the others start afresh
    shared = set(source.stuff_ids) | set(source.thing_ids)
    assert set(report["shared_categories"]) == shared
    for k, cid in enumerate(model.thing_ids):
        row = state["head.cls_logits.weight"][k]
        expect = (source.state["head.cls_logits.weight"][list(source.thing_ids).index(cid)] if cid in shared
                  else fresh["head.cls_logits.weight"][k])
        assert torch.equal(row, expect), cid
    rows = memory_rows(model.stuff_ids, model.thing_ids, "merged")
    src_rows = memory_rows(source.stuff_ids, source.thing_ids, "merged")
    for k, key in enumerate(rows):
        expect = source.state["memory.memory"][src_rows.index(key)] if key in src_rows else fresh["memory.memory"][k]
        assert torch.equal(state["memory.memory"][k], expect), key
    assert report["partly_carried"] == {"head.cls_logits.bias": "4 of 80 rows",
                                        "head.cls_logits.weight": "4 of 80 rows",
                                        "memory.memory": "5 of 54 rows"}
    assert report["dropped"] == [] and "head.cls_logits.weight" not in report["reinitialised"]


def test_every_kind_of_model_source_gives_the_same_checkpoint(trained_small):
    """A registered version, its alias, the run's logged model, the model's local folder and the
    checkpoint file itself: one file, with the lineage each can tell."""
    tracking = Tracking.resolve(trained_small["tracking"])
    with open(trained_small["checkpoint"], "rb") as f:
        data = f.read()
    version = fetch("models:/ciae-trained/1", tracking)
    alias = fetch("models:/ciae-trained@champion", tracking)
    logged = fetch(f"runs:/{version.run_id}/model", tracking)
    folder = fetch(tracking.download("models:/ciae-trained/1"), None)
    plain = fetch(trained_small["checkpoint"], None)
    assert version.data == alias.data == logged.data == folder.data == plain.data == data
    assert version.model_version == alias.model_version == "ciae-trained/1"
    assert logged.run_id == alias.run_id and plain.run_id is None and plain.model_version is None
    assert version.checkpoint()["step"] == 140


def test_same_names_are_required_where_both_know_them(trained_small, make_shards, synth_small):
    source = source_of(trained_small).source()
    model = model_for_shards(Config.small(), make_shards(synth_small))
    person = model.thing_ids[0]
    model.category_names[person] = "somebody else"
    report = transfer(model, source)
    assert person not in report["shared_categories"] and len(report["shared_categories"]) == 7


def test_torchvision_weights_and_errors(trained_small, tmp_path, make_shards, synth_small):
    shards = make_shards(synth_small)
    bn = Config.small().merged({"backbone": {"norm": "bn"}})
    resnet = ResNet(18, width=16, norm="bn").state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet, path)
    source = fetch(str(path), None).source()
    assert source.kind == "torchvision"
    model = model_for_shards(bn, shards)
    report = transfer(model, source)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in resnet.items()
               if not k.endswith("num_batches_tracked"))
    assert report["carried"] and all(k.startswith("backbone.") for k in report["carried"])

    tracking = Tracking.resolve(trained_small["tracking"])
    with pytest.raises(ValueError, match=f"models:/ciae-trained/9: no such registered model version in {tracking.uri}"):
        fetch("models:/ciae-trained/9", tracking)
    with pytest.raises(ValueError, match=f"models:/nothing@champion: no such registered model version in {tracking.uri}"):
        fetch("models:/nothing@champion", tracking)
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        fetch("models:/ciae-trained", tracking)
    with pytest.raises(FileNotFoundError, match="nowhere.pt: no such file"):
        fetch(str(tmp_path / "nowhere.pt"), tracking)
    torch.save({"weights": torch.zeros(3), "epoch": 4}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"neither a ciae checkpoint .* it holds \['epoch', 'weights'\]"):
        fetch(str(tmp_path / "foreign.pt"), tracking).source()
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt: not a loadable checkpoint or state dict"):
        fetch(str(tmp_path / "cut.pt"), None).source()
    with pytest.raises(ValueError, match="a folder but not an MLflow model"):
        fetch(str(tmp_path), None)
    paper = Config().merged({"backbone": {"norm": "gn", "freeze_at": 0}})
    with pytest.raises(ValueError, match="does not fit this config: its model is a resnet18 width 16 .* "
                                         "this config's a resnet50 width 64"):
        transfer(model_for_shards(paper, shards), source_of(trained_small).source())


def job(trained_small, tmp_path, **kw) -> TrainJob:
    cfg = Config.small().merged({"input": {"shorter_sides": (96,), "test_shorter_side": trained_small["size"],
                                           "flip_prob": 0.0}})
    return TrainJob(**{"data": trained_small["shards"]["train"], "val": trained_small["shards"]["val"],
                       "config": cfg, "workers": 1, "batch_per_worker": 2, "iterations": 2,
                       "storage": str(tmp_path / "rt"), "tracking_uri": trained_small["tracking"],
                       "experiment": "finetune", "pictures": 0, "init": trained_small["uri"], **kw})


@pytest.fixture(scope="module")
def finetuned(trained_small, tmp_path_factory, ray_local, lean_ray_train) -> dict:
    """A fine-tuning run from the registered model onto the same categories, 2 workers, 6 steps,
    rank 1 killed after the step-2 checkpoint, on the session's Ray; its summary."""
    base = job(trained_small, tmp_path_factory.mktemp("finetuned"))
    cfg = dataclasses.replace(base.config, solver=dataclasses.replace(base.config.solver, checkpoint_every=2))
    return train(dataclasses.replace(base, name="killed-finetune", config=cfg, workers=2, batch_per_worker=1,
                                     iterations=6, max_failures=2),
                 callbacks=(KillRankOneAfterFirstCheckpoint(),), progress=False)


def test_fine_tuning_onto_the_same_categories_starts_from_the_source_pq(trained_small, finetuned):
    s = finetuned
    client = mlflow.MlflowClient(s["tracking_uri"])
    first = min(client.get_metric_history(s["run_id"], "val_pq"), key=lambda m: m.step)
    ckpt = checkpoint.load(trained_small["checkpoint"], "model.pt")
    reference = evaluate(CIAEModel.from_checkpoint(ckpt), trained_small["shards"]["val"])
    # the same weights, to the few pixels at a tie that the worker's kernels may flip (test_learning)
    assert first.step == 0 and first.value == pytest.approx(reference["All"]["pq"], abs=1e-3)
    assert first.value > 0.2                                     # not a model starting from zero
    run = client.get_run(s["run_id"])
    assert run.data.tags["ciae.init"] == trained_small["uri"]
    assert run.data.tags["ciae.init.model_version"] == "ciae-trained/1"
    assert run.data.tags["ciae.init.run_id"] == client.get_model_version("ciae-trained", "1").run_id
    report = json.loads(open(Tracking.resolve(s["tracking_uri"]).download(f"runs:/{s['run_id']}/init.json")).read())
    assert report["partly_carried"] == {} and report["reinitialised"] == [] and report["dropped"] == []


def test_the_cli_fine_tunes_onto_the_coco_sample_from_a_run_artifact(trained_small, finetuned, coco_sample,
                                                                     make_shards, tmp_path, ray_local,
                                                                     lean_ray_train):
    from workflows.cli import main

    artifact = f"runs:/{finetuned['run_id']}/checkpoint/checkpoint.pt"
    coco = make_shards(coco_sample)
    args = ["train", "--data", coco, "--init", artifact, "--iterations", "1", "--workers", "1",
            "--batch-per-worker", "2", "--storage", str(tmp_path / "rt2"), "--tracking-uri",
            trained_small["tracking"], "--experiment", "finetune", "--name", "to-coco", "--pictures", "0"]
    assert main(args) == 0
    tracking = Tracking.resolve(trained_small["tracking"])
    client = tracking.client()
    run = client.search_runs([client.get_experiment_by_name("finetune").experiment_id],
                             "tags.`ciae.run_name` = 'to-coco'")[0]
    assert run.data.tags["ciae.init.run_id"] == finetuned["run_id"] and run.data.params["job.init"] == artifact
    logged = fetch(f"runs:/{run.info.run_id}/checkpoint/checkpoint.pt", tracking)
    assert logged.run_id == run.info.run_id
    ckpt = logged.checkpoint()
    assert len(ckpt["stuff_ids"]) == 53 and len(ckpt["thing_ids"]) == 80
    assert ckpt["category_names"][1] == "person"


def test_a_killed_fine_tuning_run_resumes(finetuned):
    s = finetuned
    assert s["step"] == 6
    client = mlflow.MlflowClient(s["tracking_uri"])
    assert [m.value for m in client.get_metric_history(s["run_id"], "resumed_at_step")] == [2.0]
    assert client.get_run(s["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(s["run_id"], "val_pq")] == [0, 6]   # no second start


def test_read_source_refuses_a_plain_object():
    with pytest.raises(ValueError, match="neither a ciae checkpoint"):
        read_source([1, 2, 3], "x.pt")
    buf = io.BytesIO()
    torch.save({"model": {}, "stuff_ids": [], "thing_ids": [], "config": Config.small().to_dict()}, buf)
    assert read_source(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), "y.pt").kind == "ciae"
