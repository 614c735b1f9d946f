"""Batch labeling: a registered model over a list, a folder or shards, as a Ray Data job; COCO
panoptic output that panopticapi reads; PQ; unreadable images rejected; and a job killed
mid-way and run again labels every image exactly once."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ciae.config import Config
from ciae.model import CIAEModel
from ciae.train import Trainer, model_from_checkpoint
from pipeline.coco import DatasetError
from pipeline.image_sources import InputImage, assign_ids, open_source
from pipeline.panoptic_png import decode_id_png
from pipeline.predictions import PredictionStore
from pipeline.synth import SynthSpec, select_categories, write_dataset
from workflows.label import label
from workflows.registry import register_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """An untrained Config.small() model on the synthetic categories, registered @champion."""
    root = tmp_path_factory.mktemp("label_model")
    cats = select_categories()
    torch.manual_seed(0)
    ckpt = str(root / "model.pt")
    Trainer(CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)).save(ckpt)
    tracking = f"sqlite:///{root}/mlflow.db"
    uri = register_checkpoint(ckpt, tracking_uri=tracking, model_name="ciae-label")
    return {"uri": uri, "tracking": tracking, "checkpoint": ckpt}


def load_json(path):
    with open(path) as f:
        return json.load(f)


def check_outputs(out: str, images: dict[str, tuple[int, int]]) -> dict:
    """Every expected key has one whole PNG at its image's size agreeing with its annotation,
    and nothing else is there (no temporaries, no duplicates). ``images``: key -> (h, w)."""
    pred = load_json(os.path.join(out, "predictions.json"))
    anns = {a["file_name"][:-4]: a for a in pred["annotations"]}
    assert len(anns) == len(pred["annotations"]) == len(pred["images"]) == len(images)
    assert len({a["image_id"] for a in pred["annotations"]}) == len(images)
    assert sorted(os.listdir(os.path.join(out, "panoptic"))) == sorted(k + ".png" for k in images)
    for folder in ("", "panoptic", "records", "overlays"):
        assert not [n for n in os.listdir(os.path.join(out, folder)) if ".tmp-" in n]
    sizes = {im["id"]: (im["height"], im["width"]) for im in pred["images"]}
    for key, (h, w) in images.items():
        ids = decode_id_png(open(os.path.join(out, "panoptic", key + ".png"), "rb").read())
        assert ids.shape == (h, w) == sizes[anns[key]["image_id"]]
        segs = anns[key]["segments_info"]
        assert sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in segs)
    return pred


# ------------------------------------------------------------------------- inputs and ids


def test_image_ids_follow_the_documented_rules(tmp_path):
    assert assign_ids(["000000000139.jpg", "000000000285.jpg"]) == [139, 285]
    assert assign_ids(["b.jpg", "a.png", "12.jpg"]) == [1, 2, 3]
    assert assign_ids(["x.jpg", "y.jpg", "z.jpg"], {"y.jpg": 7, "q.jpg": 9}) == [10, 7, 11]

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (folder / name).write_bytes(b"")
    source = open_source(str(folder))
    assert source.kind == "folder" and [im.file_name for im in source.images] == ["a.PNG", "b.jpg"]
    assert [im.image_id for im in source.images] == [1, 2]

    (tmp_path / "list.txt").write_text(f"# images\nimgs/b.jpg\n\n{folder}/a.PNG\n")
    source = open_source(str(tmp_path / "list.txt"))
    assert source.kind == "list"
    assert [im.uri for im in source.images] == [f"{tmp_path}/imgs/b.jpg", f"{folder}/a.PNG"]

    (tmp_path / "clash.txt").write_text("imgs/b.jpg\nother/b.png\n")
    with pytest.raises(DatasetError, match="share a file stem"):
        open_source(str(tmp_path / "clash.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no such file"):
        open_source(str(tmp_path / "missing"))


def test_store_keeps_one_entry_per_image_and_drops_temporaries(tmp_path):
    store = PredictionStore(str(tmp_path / "out"))
    store.create()
    a = {"key": "a", "image_id": 1, "file_name": "a.jpg", "height": 2, "width": 3, "segments_info": []}
    store.commit([a], [{"key": "b", "image_id": 2, "file": "b.jpg", "reason": "bad"}])
    store.commit([{**a, "height": 5}], [])                      # a retried batch, another batching
    store.commit([{**a, "key": "b", "image_id": 2, "file_name": "b.jpg"}], [])  # b fixed, labeled
    (tmp_path / "out" / "panoptic" / "c.png.tmp-1-ab").write_bytes(b"half")
    images = [InputImage("a", 1, "a.jpg"), InputImage("b", 2, "b.jpg"), InputImage("c", 3, "c.jpg")]
    assert store.finalize(images, []) == {"labeled": 2, "rejected": 0, "pending": 1}
    pred = load_json(tmp_path / "out" / "predictions.json")
    assert [a["file_name"] for a in pred["annotations"]] == ["a.png", "b.png"]
    assert load_json(tmp_path / "out" / "rejects.json") == []
    assert os.listdir(tmp_path / "out" / "panoptic") == []


# --------------------------------------------------------------------------------- jobs


def test_label_list_with_ground_truth_rejects_and_overlays(model, synth_small, tmp_path, ray_local):
    panopticapi = pytest.importorskip("panopticapi.evaluation")
    gt = load_json(synth_small["panoptic_json"])
    names = sorted(os.listdir(synth_small["images"]))
    corrupt = tmp_path / "corrupt.jpg"
    data = open(os.path.join(synth_small["images"], names[0]), "rb").read()
    corrupt.write_bytes(data[: len(data) // 3])                 # truncated JPEG
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([os.path.join(synth_small["images"], n) for n in names]
                                 + [str(corrupt), str(tmp_path / "gone.jpg")]) + "\n")
    out = str(tmp_path / "out")

    s = label(model["uri"], str(listing), out, tracking_uri=model["tracking"], batch_size=4,
              gt_json=synth_small["panoptic_json"], gt_dir=synth_small["panoptic_dir"], overlays=2,
              progress=False)
    assert (s["labeled"], s["rejected"], s["pending"], s["processed"], s["overlays"]) == (6, 2, 0, 8, 2)

    pred = check_outputs(out, {os.path.splitext(im["file_name"])[0]: (im["height"], im["width"])
                               for im in gt["images"]})
    assert sorted((im["id"], im["file_name"]) for im in pred["images"]) == \
        sorted((im["id"], im["file_name"]) for im in gt["images"])          # ids from the ground truth
    rejects = {os.path.basename(r["file"]): r for r in load_json(os.path.join(out, "rejects.json"))}
    assert set(rejects) == {"corrupt.jpg", "gone.jpg"}
    assert "unreadable image" in rejects["corrupt.jpg"]["reason"]
    assert "not found" in rejects["gone.jpg"]["reason"]
    assert {r["image_id"] for r in rejects.values()} == {7, 8}             # after the GT's 1..6

    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    assert overlays == [os.path.splitext(n)[0] + ".png" for n in names[:2]]
    assert Image.open(os.path.join(out, "overlays", overlays[0])).size == (128, 96)

    # panopticapi reads the output and agrees with metrics.json
    metrics = load_json(os.path.join(out, "metrics.json"))
    assert metrics["images"] == {"evaluated": 6, "ground_truth": 6, "without_prediction": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi.pq_compute(synth_small["panoptic_json"], os.path.join(out, "predictions.json"),
                                        synth_small["panoptic_dir"], os.path.join(out, "panoptic"))
    for group in ("All", "Things", "Stuff"):
        assert metrics[group]["pq"] == pytest.approx(theirs[group]["pq"], abs=1e-9)
        assert metrics[group]["n"] == theirs[group]["n"]


def test_label_shards_scores_as_the_local_evaluation(model, synth_small, tmp_path, ray_local):
    from pipeline.prepare import prepare
    from pipeline.shards import Source
    from workflows.local import evaluate

    shards = str(tmp_path / "shards")
    prepare(Source(synth_small["images"], synth_small["panoptic_json"], synth_small["panoptic_dir"]),
            shards, rows_per_shard=4, progress=False)
    out = str(tmp_path / "out")
    s = label(model["uri"], shards, out, tracking_uri=model["tracking"], batch_size=3,
              gt_json=synth_small["panoptic_json"], gt_dir=synth_small["panoptic_dir"], progress=False)
    assert (s["labeled"], s["rejected"]) == (6, 0)
    gt = load_json(synth_small["panoptic_json"])
    pred = check_outputs(out, {os.path.splitext(im["file_name"])[0]: (im["height"], im["width"])
                               for im in gt["images"]})
    assert sorted(im["id"] for im in pred["images"]) == sorted(im["id"] for im in gt["images"])
    reference = evaluate(model_from_checkpoint(model["checkpoint"]), shards)
    for group in ("All", "Things", "Stuff"):
        assert s["metrics"][group]["pq"] == pytest.approx(reference[group]["pq"], abs=1e-12)


def test_killed_job_resumes_and_labels_every_image_exactly_once(model, tmp_path, ray_local):
    import ray

    src = tmp_path / "src"
    write_dataset(str(src), 16, seed=11, spec=SynthSpec(height=64, width=96))
    images = str(src / "images")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "workflows.cli", "label", "--model", model["uri"], "--input", images,
           "--out", str(out), "--tracking-uri", model["tracking"], "--batch-size", "1",
           "--address", ray.get_runtime_context().gcs_address]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "records"
    deadline = time.monotonic() + 180
    try:
        while not (records.is_dir() and len([n for n in os.listdir(records) if n.endswith(".json")]) >= 2):
            assert job.poll() is None, job.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job finished no image in time"
            time.sleep(0.02)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
        job.stderr.close()

    done_before = PredictionStore(str(out)).records()[0]
    assert 2 <= len(done_before) < 16
    before = {k: (os.stat(out / "panoptic" / f"{k}.png").st_mtime_ns,
                  (out / "panoptic" / f"{k}.png").read_bytes()) for k in done_before}
    record_files = {n: (records / n).read_bytes() for n in os.listdir(records) if n.endswith(".json")}
    (out / "panoptic" / "synth_0011_000015.png.tmp-99-dead").write_bytes(b"\x89PNG half")  # a torn write

    s = label(model["uri"], images, str(out), tracking_uri=model["tracking"], batch_size=4, progress=False)
    assert (s["labeled"], s["skipped"], s["processed"], s["rejected"]) == \
        (16, len(done_before), 16 - len(done_before), 0)
    check_outputs(str(out), {f"synth_0011_{i:06d}": (64, 96) for i in range(16)})
    for k, (mtime, data) in before.items():                    # finished images untouched
        png = out / "panoptic" / f"{k}.png"
        assert os.stat(png).st_mtime_ns == mtime and png.read_bytes() == data
    for n, data in record_files.items():
        assert (records / n).read_bytes() == data
    # every image predicted once over both runs: in exactly one record
    keys = [r["key"] for n in os.listdir(records) for r in load_json(records / n)["labeled"]]
    assert sorted(keys) == [f"synth_0011_{i:06d}" for i in range(16)]

    first = (out / "predictions.json").read_bytes()
    again = label(model["uri"], images, str(out), tracking_uri=model["tracking"], progress=False)
    assert again["processed"] == 0 and (out / "predictions.json").read_bytes() == first


def test_label_command_has_help(capsys):
    from workflows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["label", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--gpus-per-worker" in text and "example:" in text and "exactly once" in text


def test_unknown_model_is_a_clear_error(model, tmp_path):
    with pytest.raises(ValueError, match="models:/nope@champion"):
        label("models:/nope@champion", str(tmp_path), str(tmp_path / "out"), tracking_uri=model["tracking"])
