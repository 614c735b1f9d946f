"""Batch labeling: a registered model (or its checkpoint file, without MLflow) over a list, a folder
(nested) or shards, as a streaming Ray Data job; Parquet shards that pandas and pyarrow read as
one row per image, and COCO files that panopticapi and pycocotools read; streaming PQ; confidence
scores and the review list; bad images rejected with their reason; a job killed anywhere (driver
or model actor) and run again labels every image exactly once; an output of the earlier layout
resumes and exports in it; model actors that fit the machine by default."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ciae import checkpoint
from ciae.data.panoptic import DatasetError
from ciae.modeling.backbone import ResNet
from ciae.modeling.model import CIAEModel
from pipeline.data import storage
from pipeline.data.panoptic_png import decode_id_png
from pipeline.data.synth import SynthSpec, write_dataset
from pipeline.label import store as ls
from pipeline.label.sources import load_plan, make_plan
from workflows.jobs.label import actor_cpus, label
from workflows.jobs.specs import LabelJob


@pytest.fixture(scope="module")
def model(registered_untrained) -> dict:
    return registered_untrained


def load_json(path):
    with open(path) as f:
        return json.load(f)


def job(model, input, out, **kw) -> LabelJob:
    return LabelJob(model=model["uri"], input=str(input), out=str(out), tracking_uri=model["tracking"], **kw)


def shard_rows(out) -> list[dict]:
    store = ls.LabelStore(str(out))
    return list(store.rows(["index", "key", "image_id", "file_name", "height", "width", "status", "reason",
                            "png", "segments", "quality", "pq"]))


def check_outputs(out, images: dict[str, tuple[int, int]], coco: bool = True, layout: ls.Layout = ls.LAYOUT) -> list[dict]:
    """Every expected key has one labeled row (and, with ``coco``, one whole PNG and one
    annotation) at its image's size, agreeing with its segments; nothing else is there (no
    temporaries, no parts, no duplicates). ``images``: key -> (h, w). Returns the rows."""
    assert ls.LabelStore(str(out)).layout == layout
    rows = [r for r in shard_rows(out) if r["status"] == "labeled"]
    assert sorted(r["key"] for r in rows) == sorted(images)
    assert [r["index"] for r in shard_rows(out)] == sorted(r["index"] for r in shard_rows(out))
    for r in rows:
        ids = decode_id_png(r["png"])
        assert ids.shape == images[r["key"]] == (r["height"], r["width"])
        assert r["segments"] and sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in r["segments"])
        assert all(0 <= s["score"] <= 1 for s in r["segments"]) and 0 <= r["quality"] <= 1
    for root, _, files in os.walk(out):
        assert not [n for n in files if ".tmp-" in n], root
    parts = os.path.join(out, layout.parts)
    assert not os.path.isdir(parts) or not any(os.scandir(parts))
    if coco:
        pred = load_json(os.path.join(out, layout.predictions))
        anns = {a["file_name"][:-4]: a for a in pred["annotations"]}
        assert len(anns) == len(pred["annotations"]) == len(pred["images"]) == len(images)
        folder = os.path.join(out, layout.panoptic)
        pngs = [os.path.relpath(os.path.join(d, n), folder)[:-4] for d, _, files in os.walk(folder) for n in files]
        assert sorted(pngs) == sorted(images)
        for r in rows:
            assert open(os.path.join(folder, r["key"] + ".png"), "rb").read() == r["png"]
            assert [s["id"] for s in anns[r["key"]]["segments_info"]] == [s["id"] for s in r["segments"]]
    return rows


# ------------------------------------------------------------------------ the plan: ids, keys


def test_plans_follow_the_documented_key_and_id_rules(tmp_path):
    def plan(input, name, **kw):
        p = make_plan(str(input), str(tmp_path / name), **kw)
        rows = [r for t in range(len(p.task_sizes)) for r in pq.read_table(p.task_path(t)).to_pylist()]
        return p, rows

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.jpg"):
        (folder / name).write_bytes(b"")
    p, rows = plan(folder, "p1", task_images=2)
    assert p.kind == "folder" and p.task_sizes == (2, 1) and load_plan(str(tmp_path / "p1")) == p
    assert [(r["key"], r["file_name"], r["image_id"], r["index"]) for r in rows] == \
        [("a", "a.PNG", 1, 0), ("b", "b.jpg", 2, 1), ("sub/c", "sub/c.jpg", 3, 2)]
    assert [p.locate(i) for i in range(3)] == [(0, 0), (0, 1), (1, 0)]

    numeric = tmp_path / "coco"
    (numeric / "x").mkdir(parents=True)
    for name in ("000000000285.jpg", "000000000139.jpg", "x/000000000007.jpg"):
        (numeric / name).write_bytes(b"")
    assert [r["image_id"] for r in plan(numeric, "p2")[1]] == [139, 285, 7]
    (numeric / "x" / "000000000139.png").write_bytes(b"")    # a stem twice: ids by order instead
    assert [r["image_id"] for r in plan(numeric, "p3")[1]] == [1, 2, 3, 4]

    (tmp_path / "list.txt").write_text(f"# images\nimgs/b.jpg\n\n{folder}/a.PNG\n")
    p, rows = plan(tmp_path / "list.txt", "p4")
    assert p.kind == "list" and [r["uri"] for r in rows] == [f"{tmp_path}/imgs/b.jpg", f"{folder}/a.PNG"]
    assert [r["key"] for r in rows] == ["imgs/b", "a"]

    gt = {"images": [{"id": 7, "file_name": "b.jpg", "height": 1, "width": 1},
                     {"id": 9, "file_name": "q.jpg", "height": 1, "width": 1}],
          "annotations": [{"image_id": 7, "file_name": "b.png", "segments_info": []},
                          {"image_id": 9, "file_name": "q.png", "segments_info": []}],
          "categories": [{"id": 1, "name": "a", "isthing": 1}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    p, rows = plan(folder, "p5", gt_json=str(tmp_path / "gt.json"), gt_dir="gt")
    assert [r["image_id"] for r in rows] == [10, 7, 11] and rows[1]["gt_png"].endswith("gt/b.png")
    assert p.ground_truth == "json" and p.categories[0]["name"] == "a"

    (tmp_path / "clash.txt").write_text("imgs/b.jpg\nimgs/b.png\n")
    with pytest.raises(DatasetError, match="keys .* occur twice, e.g. imgs/b"):
        plan(tmp_path / "clash.txt", "p6")
    (tmp_path / "twice.txt").write_text("imgs/b.jpg\nother/b.jpg\n")
    with pytest.raises(DatasetError, match="image ids .* occur twice, e.g. 7"):
        plan(tmp_path / "twice.txt", "p7", gt_json=str(tmp_path / "gt.json"), gt_dir="gt", task_images=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        plan(tmp_path / "empty", "p8")
    with pytest.raises(DatasetError, match="no such file"):
        plan(tmp_path / "missing", "p9")


def test_external_sort_holds_one_run(tmp_path):
    from pipeline.label.sources import external_sort

    values = list(np.random.default_rng(0).integers(0, 1000, 5000).tolist())
    assert list(external_sort(iter(values), str(tmp_path), run=64)) == sorted(values)
    assert len(os.listdir(tmp_path)) == -(-5000 // 64)


def test_model_actors_fit_the_machine_by_default():
    """Without --cpus-per-worker: 1 CPU per actor where that leaves one to the tasks, else the
    largest share that does (0.5 steps, finer below 0.5), said in one line; a share the user
    sets is checked; a cluster with nothing to spare is refused."""
    def cpus(workers, cluster, set_=None):
        return actor_cpus(LabelJob(model="m", input="i", out="o", workers=workers, cpus_per_worker=set_), cluster)

    assert cpus(1, 2) == (1.0, None) and cpus(2, 8) == (1.0, None)
    share, note = cpus(2, 2)
    assert share == 0.5 and note.startswith("label: 2 model actors x 0.5 CPU (the cluster has 2; one is left")
    assert cpus(3, 4)[0] == 1.0 and cpus(4, 4)[0] == 0.5 and cpus(3, 2)[0] == 0.3
    assert cpus(2, 2, set_=0.5) == (0.5, None)
    with pytest.raises(ValueError, match="would hold 2 of the cluster's 2 CPUs.*lower --workers or --cpus-per-worker"):
        cpus(2, 2, set_=1)
    with pytest.raises(ValueError, match="the cluster has 1 CPUs: 1 model actors and the decoding"):
        cpus(1, 1)


# ------------------------------------------------------------------- labeled once, read often


@pytest.fixture(scope="module")
def listed(model, synth_small, tmp_path_factory, ray_local) -> dict:
    """A list of the 6 synthetic images, a truncated JPEG and a missing file, labeled once with
    the ground truth, COCO exports and 2 panels in tasks of 3: {"out", "summary", "listing",
    "names", "keys" (key -> (h, w)), "job" (its LabelJob arguments)}."""
    root = tmp_path_factory.mktemp("listed")
    names = sorted(os.listdir(synth_small["images"]))
    corrupt = root / "corrupt.jpg"
    data = open(os.path.join(synth_small["images"], names[0]), "rb").read()
    corrupt.write_bytes(data[: len(data) // 3])                 # truncated JPEG
    listing = root / "inputs.txt"
    listing.write_text("\n".join([os.path.join(synth_small["images"], n) for n in names]
                                 + [str(corrupt), str(root / "gone.jpg")]) + "\n")
    kw = dict(batch_size=3, task_images=3, gt_json=synth_small["panoptic_json"], gt_dir=synth_small["panoptic_dir"],
              overlays=2, coco_panoptic=True, coco_instances=True)
    out = root / "out"
    s = label(job(model, listing, out, **kw), progress=False)
    gt = load_json(synth_small["panoptic_json"])
    keys = {os.path.splitext(im["file_name"])[0]: (im["height"], im["width"]) for im in gt["images"]}
    return {"out": out, "summary": s, "listing": listing, "names": names, "keys": keys, "job": kw}


def test_label_list_with_ground_truth_rejects_exports_and_panels(listed, synth_small):
    panopticapi = pytest.importorskip("panopticapi.evaluation")
    from pycocotools import mask as rle

    s, out, names, keys = listed["summary"], listed["out"], listed["names"], listed["keys"]
    assert (s["labeled"], s["rejected"], s["processed"], s["overlays"], s["review"]) == (6, 2, 8, 2, 6)
    assert len(os.listdir(out / "labels")) == 3                 # 8 images in tasks of 3
    gt = load_json(synth_small["panoptic_json"])
    rows = check_outputs(str(out), keys)
    pred = load_json(out / "_coco" / "predictions.json")
    assert sorted((im["id"], im["file_name"]) for im in pred["images"]) == \
        sorted((im["id"], im["file_name"]) for im in gt["images"])          # ids from the ground truth
    rejects = {os.path.basename(r["file"]): r for r in load_json(out / "_rejects.json")["rejected"]}
    assert set(rejects) == {"corrupt.jpg", "gone.jpg"}
    assert "unreadable image" in rejects["corrupt.jpg"]["reason"]
    assert "not found" in rejects["gone.jpg"]["reason"]
    assert {r["image_id"] for r in rejects.values()} == {7, 8}             # after the GT's 1..6

    panels = sorted(os.listdir(out / "_overlays"))
    assert panels == [os.path.splitext(n)[0] + ".png" for n in names[:2]]
    assert Image.open(out / "_overlays" / panels[0]).size[0] == 3 * 128 + 2 * 4   # image | pred | GT

    # streaming PQ equals panopticapi on the exported COCO files
    metrics = load_json(out / "_metrics.json")
    assert metrics["images"] == {"evaluated": 6, "input": 8}
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi.pq_compute(synth_small["panoptic_json"], str(out / "_coco" / "predictions.json"),
                                        synth_small["panoptic_dir"], str(out / "_coco" / "panoptic"))
    for group in ("All", "Things", "Stuff"):
        assert metrics[group]["pq"] == pytest.approx(theirs[group]["pq"], abs=1e-9)
        assert metrics[group]["n"] == theirs[group]["n"]

    # COCO instances: pycocotools decodes each RLE into its segment's mask
    instances = load_json(out / "_coco" / "instances.json")
    things = {c["id"] for c in instances["categories"]}
    by_key = {r["image_id"]: r for r in rows}
    for ann in instances["annotations"]:
        r = by_key[ann["image_id"]]
        seg = next(s for s in r["segments"] if s["bbox"] == ann["bbox"] and s["category_id"] == ann["category_id"])
        assert np.array_equal(rle.decode(ann["segmentation"]).astype(bool), decode_id_png(r["png"]) == seg["id"])
    assert {a["category_id"] for a in instances["annotations"]} <= things
    assert len(instances["annotations"]) == sum(s["category_id"] in things for r in rows for s in r["segments"])

    # the review list: least confident first
    review = (out / "_review.csv").read_text().splitlines()
    qualities = [float(line.split(",")[4]) for line in review[1:]]
    assert len(qualities) == 6 and qualities == sorted(qualities)

    # `ciae export` writes the same COCO files from the shards
    from workflows.cli import main

    first = (out / "_coco" / "predictions.json").read_bytes()
    os.remove(out / "_coco" / "predictions.json")
    os.remove(out / "_coco" / "panoptic" / (rows[0]["key"] + ".png"))
    assert main(["export", "--labels", str(out), "--coco-panoptic"]) == 0
    assert (out / "_coco" / "predictions.json").read_bytes() == first
    check_outputs(str(out), keys)


def test_an_output_reads_as_a_dataset_of_one_row_per_image(listed):
    """pandas and pyarrow.dataset read the output folder as the shards only (the plan, parts,
    COCO files and the rest are named with a leading _)."""
    import pandas
    import pyarrow.dataset as pads

    out = str(listed["out"])
    expected = sorted(r["key"] for r in shard_rows(out))
    assert len(expected) == 8
    frame = pandas.read_parquet(out)
    assert sorted(frame["key"]) == expected and len(frame) == 8
    dataset = pads.dataset(out, format="parquet")
    assert sorted(dataset.to_table(columns=["key"])["key"].to_pylist()) == expected
    assert all(os.path.relpath(f, out).startswith("labels/") for f in dataset.files)
    assert sorted(storage.read_parquet(out, columns=["key"])["key"].to_pylist()) == expected
    assert sorted(n for n in os.listdir(out) if not n.startswith("_")) == ["labels"]


LEGACY_NAMES = {"_plan": "plan", "_parts": "parts", "_coco/panoptic": "panoptic",
                "_coco/predictions.json": "predictions.json", "_coco/instances.json": "instances.json",
                "_rejects.json": "rejects.json", "_review.csv": "review.csv", "_metrics.json": "metrics.json",
                "_overlays": "overlays"}


def test_an_output_of_the_earlier_layout_resumes_and_exports_in_it(listed, model, tmp_path, ray_local):
    """A folder as the earlier layout wrote it (a new one's files renamed back), with one task
    unfinished: `ciae label` finishes it and `ciae export` exports, both under the old names."""
    from workflows.cli import main

    old = tmp_path / "old"
    shutil.copytree(listed["out"], old)
    shutil.rmtree(old / "_summaries")                          # made from the shards, as summaries/
    for new, name in LEGACY_NAMES.items():
        if (old / new).exists():
            os.rename(old / new, old / name)
    os.rmdir(old / "_coco")
    os.remove(old / "labels" / "task-000001.parquet")          # its 3 images are labeled again
    os.remove(old / "predictions.json")
    assert ls.LabelStore(str(old)).layout == ls.LEGACY_LAYOUT
    s = label(job(model, listed["listing"], old, **listed["job"]), progress=False)
    assert (s["labeled"], s["rejected"], s["processed"], s["skipped"]) == (6, 2, 3, 5)
    assert not [n for n in os.listdir(old) if n.startswith("_")]
    assert sorted(os.listdir(old / "summaries")) == ["coco-instances.json", "coco-panoptic.json", "job.json"] + [
        f"task-00000{t}{record}.json" for t in range(3) for record in ("", ".pngs")]
    check_outputs(str(old), listed["keys"], layout=ls.LEGACY_LAYOUT)
    assert load_json(old / "metrics.json")["images"] == {"evaluated": 6, "input": 8}
    assert (old / "predictions.json").read_bytes() == (listed["out"] / "_coco" / "predictions.json").read_bytes()
    os.remove(old / "instances.json")
    assert main(["export", "--labels", str(old), "--coco-instances", "--review", "2"]) == 0
    assert (old / "instances.json").read_bytes() == (listed["out"] / "_coco" / "instances.json").read_bytes()
    assert len((old / "review.csv").read_text().splitlines()) == 3
    assert not [n for n in os.listdir(old) if n.startswith("_")]


@pytest.fixture(scope="module")
def folder_labeled(model, synth_small, tmp_path_factory, ray_local) -> dict:
    """The synthetic images' folder labeled once with the registered model in batches of 3, 3
    model actors asked for (``test_a_job_smaller_than_its_actors_...``'s job): {"out", "summary",
    "printed" (the job's output), "warnings" (the messages of the warnings it gave)}."""
    import warnings

    out = tmp_path_factory.mktemp("folder") / "out"
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        summary = label(job(model, synth_small["images"], out, batch_size=3, workers=3), progress=False)
    return {"out": out, "summary": summary, "printed": printed.getvalue(),
            "warnings": [str(w.message) for w in caught]}


def test_label_shards_scores_as_the_local_evaluation(model, synth_shards, tmp_path, ray_local, capsys):
    """Two model actors without --cpus-per-worker: a share that fits the machine, said in one line."""
    import ray

    from pipeline.data.shards import read_manifest
    from pipeline.evaluation.validation import evaluate

    j = job(model, synth_shards, tmp_path / "out", batch_size=3, workers=2)
    s = label(j, progress=False)
    note = actor_cpus(j, ray.cluster_resources()["CPU"])[1]
    assert capsys.readouterr().out.strip() == (note or "")
    assert (s["labeled"], s["rejected"]) == (6, 0)
    rows = shard_rows(tmp_path / "out")
    manifest = read_manifest(synth_shards)
    assert sorted(r["image_id"] for r in rows) == list(range(1, manifest["counts"]["images"] + 1))
    reference = evaluate(CIAEModel.from_checkpoint(checkpoint.load(model["checkpoint"], "model.pt")), synth_shards)
    for group in ("All", "Things", "Stuff"):
        assert s["metrics"][group]["pq"] == pytest.approx(reference[group]["pq"], abs=1e-12)
    assert all(r["pq"] is not None for r in rows)


def test_odd_images_are_labeled_and_bad_ones_rejected_with_their_reason(model, tmp_path, ray_local):
    """Grey, palette, CMYK and 16-bit images become RGB and are labeled; a phone photo stored
    240 wide and 160 high with EXIF orientation 6 is labeled as viewers show it, 160 wide and
    240 high; missing, empty, non-image, truncated and over-large files are rejected, each with
    its reason; nested folders are keyed by their relative paths."""
    import struct
    import zlib

    from pycocotools import mask

    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(src / "a" / "0001.png")
    Image.fromarray(rgb).convert("P").save(src / "b" / "0001.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "a" / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6                                           # viewers turn it a quarter clockwise
    Image.new("RGB", (240, 160), (40, 90, 160)).save(src / "a" / "phone.jpg", exif=exif)
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(src / "a" / "deep.png")   # 16-bit grey
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_bytes(b"not an image at all")
    good = io.BytesIO()
    Image.fromarray(rgb).save(good, format="JPEG")
    (src / "cut.jpg").write_bytes(good.getvalue()[:200])

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    (src / "bomb.png").write_bytes(bomb)                       # 400 MP declared

    out = tmp_path / "out"
    s = label(job(model, src, out, batch_size=4), progress=False)
    assert (s["labeled"], s["rejected"]) == (5, 4)
    rows = {r["key"]: r for r in shard_rows(out)}
    assert {k for k, r in rows.items() if r["status"] == "labeled"} == {"a/0001", "b/0001", "a/cmyk", "a/deep",
                                                                        "a/phone"}
    assert all(rows[k]["height"] == 40 and rows[k]["width"] == 56 for k in ("a/0001", "b/0001", "a/deep"))
    assert (rows["a/phone"]["height"], rows["a/phone"]["width"]) == (240, 160)
    phone = decode_id_png(rows["a/phone"]["png"])
    assert phone.shape == (240, 160)
    for seg in rows["a/phone"]["segments"]:                    # thing masks' RLE at that size too
        if seg["rle"] is not None:
            assert np.array_equal(mask.decode({"size": [240, 160], "counts": seg["rle"]}), phone == seg["id"])
    assert sorted(r["image_id"] for r in rows.values()) == list(range(1, 10))   # "0001" twice: by order
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "rejected"}
    assert reasons["empty"] == "empty file"
    assert "cannot identify image file" in reasons["text"]
    assert "unreadable image" in reasons["cut"]
    assert "over the 100 MP limit (a decompression bomb?)" in reasons["bomb"]
    rejects = load_json(out / "_rejects.json")["rejected"]
    assert sorted(r["key"] for r in rejects) == sorted(reasons)


def test_unwritable_output_and_missing_model_fail_at_once(model, synth_small, tmp_path, capsys):
    from workflows.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["label", "--model", model["uri"], "--input", synth_small["images"], "--tracking-uri", model["tracking"]]
    assert main(args + ["--out", str(blocker / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"ciae label: {blocker}/out: cannot write the output there")
    assert main(["label", "--model", "models:/nope@champion", "--input", synth_small["images"],
                 "--out", str(tmp_path / "o"), "--tracking-uri", model["tracking"]]) == 2
    assert "ciae label: models:/nope@champion: no such registered model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_file_labels_as_its_registered_model_without_mlflow(model, synth_small, folder_labeled,
                                                                        tmp_path, ray_local):
    """``--model`` given the checkpoint file: the same labels as the registered model, from a
    driver that cannot import MLflow, on this session's Ray (the job's workers find the same
    blocking package first: Ray puts the driver's working folder on their path)."""
    import ray

    blocker = tmp_path / "mlflow"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('MLflow is blocked in this test')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = tmp_path / "from_checkpoint"
    done = subprocess.run([sys.executable, "-m", "workflows.cli", "label", "--model", model["checkpoint"],
                           "--input", synth_small["images"], "--out", str(out), "--batch-size", "3",
                           "--address", ray.get_runtime_context().gcs_address],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    by_checkpoint, registered = shard_rows(out), shard_rows(folder_labeled["out"])
    assert len(registered) == 6 and all(r["status"] == "labeled" for r in registered)
    assert [(r["key"], r["png"], r["segments"]) for r in by_checkpoint] == \
        [(r["key"], r["png"], r["segments"]) for r in registered]
    resnet = tmp_path / "resnet.pt"
    torch.save(ResNet(depth=18).state_dict(), resnet)
    with pytest.raises(ValueError, match="resnet.pt: a torchvision ResNet state dict, not a trained ciae model"):
        label(LabelJob(model=str(resnet), input=synth_small["images"], out=str(tmp_path / "o")), progress=False)


def test_an_output_folder_belongs_to_one_input(model, folder_labeled, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (32, 32)).save(other / "x.jpg")
    with pytest.raises(DatasetError, match="holds the labels of .*use another --out"):
        label(job(model, other, folder_labeled["out"]), progress=False)


def test_retry_rejected_labels_a_fixed_file_once(model, synth_small, tmp_path, ray_local):
    src = tmp_path / "in"
    src.mkdir()
    names = sorted(os.listdir(synth_small["images"]))[:3]
    for n in names:
        (src / n).write_bytes(open(os.path.join(synth_small["images"], n), "rb").read())
    broken = src / names[1]
    good = broken.read_bytes()
    broken.write_bytes(good[:100])
    out = tmp_path / "out"
    assert label(job(model, src, out), progress=False)["rejected"] == 1
    broken.write_bytes(good)
    assert label(job(model, src, out), progress=False)["processed"] == 0        # finished: not retried
    s = label(job(model, src, out, retry_rejected=True), progress=False)
    assert (s["labeled"], s["rejected"], s["processed"]) == (3, 0, 1)
    check_outputs(str(out), {os.path.splitext(n)[0]: (96, 128) for n in names}, coco=False)


def _wait_for(path, enough, proc, seconds=180):
    deadline = time.monotonic() + seconds
    while not enough():
        assert proc is None or proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"nothing appeared in {path} in time"
        time.sleep(0.02)


def _written(out) -> int:
    """Parts and sealed shards on disk."""
    return sum(len([f for f in files if f.endswith(".parquet") and ".tmp-" not in f])
               for folder in ("_parts", "labels") for _, _, files in os.walk(out / folder))


def test_killed_driver_resumes_and_labels_every_image_exactly_once(model, tmp_path, ray_local):
    import ray

    src = tmp_path / "src"
    total = 24                                  # the driver is killed at its first part: ample
    write_dataset(str(src), total, seed=11, spec=SynthSpec(height=64, width=96))
    images, out = str(src / "images"), tmp_path / "out"
    cmd = [sys.executable, "-m", "workflows.cli", "label", "--model", model["checkpoint"], "--input", images,
           "--out", str(out), "--batch-size", "1", "--task-images", "4",        # the registered model's file:
           "--coco-panoptic", "--address", ray.get_runtime_context().gcs_address]  # a driver without MLflow
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(out, lambda: _written(out) >= 1, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    sealed_before = {n: (out / "labels" / n).read_bytes() for n in os.listdir(out / "labels")} \
        if (out / "labels").is_dir() else {}
    (out / "_coco" / "panoptic").mkdir(parents=True, exist_ok=True)
    torn = f".synth_0011_{total - 1:06d}.png.tmp-99-dead"                 # a torn write
    (out / "_coco" / "panoptic" / torn).write_bytes(b"\x89PNG half")

    s = label(job(model, images, out, batch_size=4, coco_panoptic=True), progress=False)
    assert s["labeled"] == total and s["rejected"] == 0 and 0 < s["skipped"] < total
    assert s["skipped"] + s["processed"] == total
    keys = {f"synth_0011_{i:06d}": (64, 96) for i in range(total)}
    check_outputs(str(out), keys)
    for n, data in sealed_before.items():                       # sealed shards untouched
        assert (out / "labels" / n).read_bytes() == data
    first = (out / "_coco" / "predictions.json").read_bytes()
    again = label(job(model, images, out, coco_panoptic=True), progress=False)
    assert again["processed"] == 0 and (out / "_coco" / "predictions.json").read_bytes() == first


def test_a_killed_model_actor_is_replaced_and_nothing_is_lost(model, tmp_path, ray_local):
    """SIGKILL one model actor mid-run: Ray restarts it and retries its batch; every image is
    labeled once."""
    import threading

    import psutil
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    src = tmp_path / "src"
    write_dataset(str(src), 12, seed=12, spec=SynthSpec(height=64, width=96))
    out = tmp_path / "out"
    killed = []

    def kill_an_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if _written(out) >= 1:
                for p in raylet.children(recursive=True):      # this test session's Ray only
                    if "MapWorker(MapBatches(Labeler))" in " ".join(p.cmdline()):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_an_actor)
    killer.start()
    s = label(job(model, src / "images", out, batch_size=2, task_images=4), progress=False)
    killer.join()
    assert killed, "no model actor was found to kill"
    assert (s["labeled"], s["rejected"]) == (12, 0)
    check_outputs(str(out), {f"synth_0012_{i:06d}": (64, 96) for i in range(12)}, coco=False)


def test_label_command_has_help(capsys):
    from workflows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["label", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--gpus-per-worker" in text and "example:" in text and "exactly once" in text


def test_a_job_smaller_than_its_actors_gives_each_actor_input_and_no_warning(folder_labeled):
    """One task of 6 images in batches of 3 with 3 model actors asked for (``folder_labeled``'s
    job): the task is split so that 2 actors get input of their own (a third would get none: the
    line says so), and Ray Data's warning of an actor pool larger than its inputs ("The minimum
    number of concurrent actors ... only received 1 input(s)", which a job of one task with 2
    actors gave) is not given."""
    s = folder_labeled["summary"]
    assert (s["labeled"], s["rejected"]) == (6, 0)
    assert not [w for w in folder_labeled["warnings"] if "concurrent" in w]
    assert "label: 2 of the 3 model actors asked for (6 images, a batch of 3 or more for each)" \
        in folder_labeled["printed"]
