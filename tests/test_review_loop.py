"""The labeling loop closed (issue 27, item 4), on synthetic data and a real Label Studio server:
label with a deliberately weak registered model, push the 16 least confident images, reviewers
(simulated through the tool's API) submit the ground truth as their corrected annotation, pull,
prepare (the pulled output goes through ``prepare`` unchanged), fine-tune from
``models:/NAME@champion`` on the corrections with Ray Train, relabel: the PQ on the corrected
images rises, and the new model version's MLflow lineage names the review project and the
source model.

Kept cheap: 96x96 images, Config.small() at a 96 px test size, a weak model of 10 in-process
steps, a fine-tuning run of 50 steps on one worker. Everything is seeded: the PQ on the 16
corrected images goes 0.025 -> 0.351 (2-CPU machine); the test asks for a rise of 0.15."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from ciae.config import Config
from ciae.data.panoptic import CategoryTable
from pipeline.data.panoptic_png import decode_id_png
from pipeline.data.prepare import prepare
from pipeline.data.shards import Source, decode_panoptic_row, read_manifest, read_table
from pipeline.evaluation.pq import PQAccumulator
from pipeline.label import store as ls
from workflows.jobs.label import label
from workflows.jobs.specs import LabelJob, TrainJob
from workflows.jobs.train import train
from workflows.review import sync as review
from workflows.review.convert import prediction_of

SIZE = 96
N = 16                     # images pushed for review
WEAK_STEPS = 10            # the weak model: PQ 0.025 on the 16 it is least sure of
FINETUNE_STEPS = 50        # on their 16 corrections: PQ 0.351 on them
MODEL = "ciae-weak"
PROJECT = "loop-round-1"


def config() -> Config:
    return Config.small().merged({"input": {"shorter_sides": (SIZE,), "test_shorter_side": SIZE,
                                            "max_size": 2 * SIZE, "flip_prob": 0.0}})


@pytest.fixture(scope="module")
def weak(synth_dataset, make_shards, tmp_path_factory, _empty_mlflow_db) -> dict:
    """Config.small() (96 px) trained for WEAK_STEPS steps on 16 other synthetic images in one
    process, registered as ciae-weak (@champion) in a sqlite MLflow of its own:
    {"tracking", "uri"}."""
    from conftest import write_checkpoint

    from ciae.engine.train import Trainer, scale_schedule
    from pipeline.feed.stream import batch_stream, model_for_shards
    from workflows.tracking.registry import register_checkpoint

    root = tmp_path_factory.mktemp("weak")
    shards = make_shards(synth_dataset(16, 0, SIZE, SIZE), 16)
    torch.manual_seed(0)
    cfg = config()
    cfg = dataclasses.replace(cfg, solver=scale_schedule(cfg.solver, WEAK_STEPS))
    trainer = Trainer(model_for_shards(cfg, shards))
    trainer.fit(batch_stream(shards, cfg), WEAK_STEPS)
    ckpt = write_checkpoint(trainer, root / "model.pt")
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    tracking = f"sqlite:///{root}/mlflow.db"
    register_checkpoint(ckpt, tracking_uri=tracking, model_name=MODEL)
    return {"tracking": tracking, "uri": f"models:/{MODEL}@champion"}


def pq_of(out: str, image_ids: set[int], categories: list[dict]) -> float:
    """The PQ over the images ``image_ids`` of a labeling output, from their rows' PQ statistics."""
    acc = PQAccumulator(CategoryTable.from_json(categories))
    for r in ls.LabelStore(out).rows(["image_id", "status", "pq_stats"]):
        if r["image_id"] in image_ids:
            assert r["status"] == "labeled" and r["pq_stats"], r["image_id"]
            acc.add_json(json.loads(r["pq_stats"]))
    assert acc.images == len(image_ids)
    return acc.summary()["All"]["pq"]


def canonical(ids: np.ndarray, segments: list[dict]) -> tuple:
    """A panoptic map as (void mask, sorted (category, iscrowd, mask bytes)), whatever its ids."""
    return ((ids == 0).tobytes(),
            sorted((s["category_id"], s["iscrowd"], (ids == s["id"]).tobytes()) for s in segments))


def test_reviewed_corrections_fine_tune_the_model_and_the_lineage_names_them(
        weak, synth_dataset, label_studio, ray_local, tmp_path):
    from label_studio_sdk import LabelStudio

    pool = synth_dataset(24, 5, SIZE, SIZE)
    gt = json.loads(open(pool["panoptic_json"]).read())
    by_id = {a["image_id"]: a for a in gt["annotations"]}
    names = {c["id"]: c["name"] for c in gt["categories"]}

    # 1. label with the weak model
    first = str(tmp_path / "first")
    common = dict(tracking_uri=weak["tracking"], gt_json=pool["panoptic_json"], gt_dir=pool["panoptic_dir"],
                  task_images=8, batch_size=8)
    label(LabelJob(model=weak["uri"], input=pool["images"], out=first, **common), progress=False)

    # 2. push the 16 least confident
    pushed = review.push(first, label_studio.url, label_studio.token, PROJECT, N, model_version=MODEL,
                         progress=False)
    assert (pushed.selected, pushed.pushed, pushed.present) == (N, N, 0)

    # 3. reviewers submit the ground truth as their corrected annotation (brush RLE by the tool's
    # converter, through the regions that push builds from an id map and its segments)
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    tasks = list(client.tasks.list(project=pushed.project_id, fields="all", resolve_uri=False))
    assert len(tasks) == N
    reviewed_ids = set()
    for t in tasks:
        ann = by_id[t.data["ciae_image_id"]]
        png = open(os.path.join(pool["panoptic_dir"], ann["file_name"]), "rb").read()
        truth = {"png": png, "quality": 1.0, "segments": [s | {"score": 1.0} for s in ann["segments_info"]]}
        result = [{k: v for k, v in r.items() if k != "score"}
                  for r in prediction_of(truth, names, "reviewer")["result"]]
        client.annotations.create(id=t.id, result=result)
        reviewed_ids.add(t.data["ciae_image_id"])

    # 4. pull, prepare: every corrected image goes through prepare unchanged
    reviewed = tmp_path / "reviewed"
    pulled = review.pull(first, label_studio.url, label_studio.token, PROJECT, str(reviewed), progress=False)
    assert pulled["images"] == N and pulled["skipped"] == []
    corrected = str(tmp_path / "corrected")
    manifest = prepare(Source(pool["images"], str(reviewed / "panoptic.json"), str(reviewed / "panoptic")),
                       corrected, rows_per_shard=8, progress=False, in_process=True)
    assert manifest["counts"]["images"] == N and manifest["rejected"] == []
    origin = read_manifest(corrected)["source"]["review"]
    assert (origin["project"], origin["project_id"], origin["url"]) == (PROJECT, pushed.project_id,
                                                                        label_studio.url.rstrip("/"))
    rows = read_table(corrected).to_pylist()
    assert len(rows) == N
    crowd = void = 0
    for row in rows:
        index, segments = decode_panoptic_row(row)
        ann = by_id[row["image_id"]]
        truth = decode_id_png(open(os.path.join(pool["panoptic_dir"], ann["file_name"]), "rb").read())
        mine = [{"id": k + 1, "category_id": s["category_id"], "iscrowd": s["iscrowd"]} for k, s in enumerate(segments)]
        assert canonical(index, mine) == canonical(truth, ann["segments_info"]), row["file_name"]
        crowd += sum(s["iscrowd"] for s in segments)
        void += int((index == 0).sum())
    assert crowd and void, "no crowd segment or no void pixel among the corrected images: pick another seed"

    # 5. fine-tune from the champion on the corrections (Ray Train), registered as a new version
    summary = train(TrainJob(data=corrected, val=corrected, config=config(), workers=1, cpus_per_worker=1.0,
                             batch_per_worker=4, iterations=FINETUNE_STEPS, storage=str(tmp_path / "rt"),
                             tracking_uri=weak["tracking"], experiment="review-loop", name="loop-1",
                             register=MODEL, pictures=0, init=weak["uri"]), progress=False)
    assert summary["model_version"] == "2" and summary["alias_moved"]

    # 6. relabel the corrected images with the new champion: their PQ rises
    again = str(tmp_path / "again")
    listing = tmp_path / "corrected.txt"
    listing.write_text("".join(os.path.join(pool["images"], r["file_name"]) + "\n" for r in rows))
    label(LabelJob(model=weak["uri"], input=str(listing), out=again, **common), progress=False)
    before, after = pq_of(first, reviewed_ids, gt["categories"]), pq_of(again, reviewed_ids, gt["categories"])
    print(f"\nPQ on the {N} corrected images: {before:.3f} (weak model) -> {after:.3f} (fine-tuned on their "
          f"corrections, {FINETUNE_STEPS} steps)")
    assert after > before + 0.15, (before, after)

    # 7. the new version's lineage: the review project and the source model
    import mlflow

    mlc = mlflow.MlflowClient(weak["tracking"])
    version = mlc.get_model_version(MODEL, "2")
    run = mlc.get_run(version.run_id)
    for tags in (version.tags, run.data.tags):
        assert tags["ciae.review.project"] == PROJECT
        assert tags["ciae.review.project_id"] == str(pushed.project_id)
        assert tags["ciae.review.url"] == label_studio.url.rstrip("/")
        assert tags["ciae.init"] == weak["uri"]
        assert tags["ciae.init.model_version"] == f"{MODEL}/1"
        assert tags["ciae.init.run_id"] == mlc.get_model_version(MODEL, "1").run_id
    assert run.data.params["job.init"] == weak["uri"]
