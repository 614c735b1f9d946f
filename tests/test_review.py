"""``ciae review`` against a real Label Studio server (``tests/label_studio_server.py``, started
once per session from ``.ls-venv``: conftest's ``label_studio``): push the least confident images of a labeling output with
their segments as predictions, idempotently; pull them back as COCO panoptic, exactly; one-line
errors for a user's mistakes.

The labeling output is written directly with ``pipeline.label.store`` (no model, no Ray): each
image "labeled" with its ground truth, so that what comes back can be compared with it pixel for
pixel, crowd flags included."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from ciae.data.panoptic import CategoryTable
from pipeline.data.panoptic_png import decode_id_png
from pipeline.label import store as ls
from pipeline.label.sources import make_plan
from workflows.cli import main

N = 5


@pytest.fixture
def client(label_studio):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token)


@pytest.fixture
def token(label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    return label_studio.token


@pytest.fixture(scope="module")
def labeled(synth_dataset, tmp_path_factory) -> dict:
    """A labeling output of 8 synthetic 60x80 images in 2 tasks, 7 labeled with their ground
    truth (one thing segment made a crowd), 1 rejected, qualities shuffled: {"out", "rows" (key
    -> row), "order" (the labeled keys, least confident first), "categories"}."""
    data = synth_dataset(8, 11, 60, 80)
    out = tmp_path_factory.mktemp("review") / "out"
    store = ls.LabelStore(str(out))
    plan = make_plan(data["images"], store.plan_uri, gt_json=data["panoptic_json"], gt_dir=data["panoptic_dir"],
                     task_images=4)
    table = CategoryTable.from_json(plan.categories)
    things = set(table.thing_ids)
    rng = np.random.default_rng(3)
    quality = rng.permutation(8) / 10 + 0.05
    rows, crowd_made = {}, False
    for task, size in enumerate(plan.task_sizes):
        part = []
        for e in plan.read_task(plan.dir, task):
            png = open(e["gt_png"], "rb").read()
            segments = []
            for s in json.loads(e["gt_segments"]):
                crowd = s["iscrowd"]
                if s["category_id"] in things and not crowd_made and e["index"] % 2 == 0:
                    crowd, crowd_made = 1, True
                segments.append({"id": s["id"], "category_id": s["category_id"], "iscrowd": crowd,
                                 "area": s["area"], "bbox": s["bbox"], "score": float(rng.uniform(0.3, 1.0)),
                                 "rle": None})
            rejected = e["index"] == 3
            part.append({"index": e["index"], "key": e["key"], "image_id": e["image_id"],
                         "file_name": e["file_name"], "height": 60, "width": 80,
                         "status": "rejected" if rejected else "labeled", "reason": "bad" if rejected else "",
                         "png": b"" if rejected else png, "segments": [] if rejected else segments,
                         "quality": float(quality[e["index"]]), "pq": None, "pq_stats": None})
            rows[e["key"]] = part[-1]
        store.write_part(task, part)
        store.seal(task, size, table, review=100)
    order = sorted((r for r in rows.values() if r["status"] == "labeled"), key=lambda r: (r["quality"], r["index"]))
    return {"out": str(out), "rows": rows, "order": [r["key"] for r in order], "categories": plan.categories}


def tasks_of(client, title: str) -> list:
    project = next(p for p in client.projects.list(title=title) if p.title == title)
    return list(client.tasks.list(project=project.id, fields="all", resolve_uri=False))


def push(labeled, label_studio, project, n=N, capsys=None) -> str:
    assert main(["review", "push", "--labels", labeled["out"], "--url", label_studio.url, "--project", project,
                 "--n", str(n), "--no-progress"]) == 0
    return capsys.readouterr().out if capsys else ""


def test_push_sends_the_least_confident_with_their_segments_once(labeled, label_studio, client, token, capsys):
    from label_studio_sdk.converter.brush import decode_rle

    out = push(labeled, label_studio, "push-test", capsys=capsys)
    assert f"{N} images pushed to project 'push-test'" in out
    tasks = tasks_of(client, "push-test")
    assert sorted(t.data["ciae_key"] for t in tasks) == sorted(labeled["order"][:N])
    names = {c["id"]: c["name"] for c in labeled["categories"]}
    for t in tasks:
        row = labeled["rows"][t.data["ciae_key"]]
        assert len(t.predictions) == 1
        pred = t.predictions[0] if isinstance(t.predictions[0], dict) else t.predictions[0].dict()
        assert pred["score"] == pytest.approx(row["quality"], abs=1e-5)
        ids = decode_id_png(row["png"])
        regions = {r["id"]: r for r in pred["result"] if r["type"] == "brushlabels"}
        crowd = {r["id"] for r in pred["result"] if r["type"] == "choices" and r["value"]["choices"] == ["crowd"]}
        assert len(regions) == len(row["segments"])
        for s in row["segments"]:
            r = regions[f"s{s['id']}"]
            assert (r["original_height"], r["original_width"]) == (60, 80)
            mask = decode_rle(r["value"]["rle"]).reshape(60, 80, 4)[:, :, 3] == 255
            assert np.array_equal(mask, ids == s["id"]), (t.data["ciae_key"], s["id"])
            assert r["value"]["brushlabels"] == [names[s["category_id"]]]
            assert r["score"] == pytest.approx(s["score"], abs=1e-5)
            assert (f"s{s['id']}" in crowd) == bool(s["iscrowd"])
        # the image is served by the tool, as uploaded
        image = client._client_wrapper.httpx_client.request(t.data["image"].lstrip("/"), method="GET")
        assert image.status_code == 200 and len(image.content) > 100

    out = push(labeled, label_studio, "push-test", capsys=capsys)
    assert "0 images pushed to project 'push-test' (id" in out and f"{N} already there" in out
    assert len(tasks_of(client, "push-test")) == N
    out = push(labeled, label_studio, "push-test", n=N + 1, capsys=capsys)        # one more: only it is added
    assert "1 images pushed" in out and len(tasks_of(client, "push-test")) == N + 1


def canonical(ids: np.ndarray, segments: list[dict]) -> tuple:
    """A panoptic map as (void mask, sorted (category, iscrowd, mask bytes)), whatever its ids."""
    return (((ids == 0).tobytes()),
            sorted((s["category_id"], s["iscrowd"], (ids == s["id"]).tobytes()) for s in segments))


def test_a_pushed_map_pulls_back_identical(labeled, label_studio, token, tmp_path, capsys):
    push(labeled, label_studio, "round-trip", n=7)
    assert main(["review", "pull", "--labels", labeled["out"], "--url", label_studio.url, "--project", "round-trip",
                 "--out", str(tmp_path), "--from", "predictions", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "panoptic.json").read_text())
    assert len(doc["annotations"]) == 7 and doc["categories"] == labeled["categories"]
    assert any(s["iscrowd"] for a in doc["annotations"] for s in a["segments_info"])
    by_id = {im["id"]: im for im in doc["images"]}
    for a in doc["annotations"]:
        row = next(r for r in labeled["rows"].values() if r["image_id"] == a["image_id"])
        assert by_id[a["image_id"]]["file_name"] == row["file_name"]
        pulled = decode_id_png((tmp_path / "panoptic" / a["file_name"]).read_bytes())
        assert canonical(pulled, a["segments_info"]) == canonical(decode_id_png(row["png"]), row["segments"])
        for s in a["segments_info"]:
            assert s["area"] == int((pulled == s["id"]).sum())


def test_an_exif_turned_image_keeps_its_viewer_orientation_through_push_and_pull(label_studio, client, token,
                                                                                 tmp_path):
    """A JPEG stored 240 wide and 160 high with EXIF orientation 6 (turn 90 degrees clockwise to
    view) is labeled as viewers show it, 160 wide and 240 high (``decode_rgb``). Pushed as its
    bytes are (the tag kept), its regions say 160x240, which is what the image the tool serves
    shows once the tag is applied (Label Studio draws it in the browser's <img>, which applies
    it, and takes the sizes of regions drawn there from it); pulled back, the map is the same."""
    from PIL import Image, ImageOps

    from ciae.data.transform import decode_rgb
    from pipeline.data.panoptic_png import encode_id_png
    from pipeline.data.synth import select_categories

    table = select_categories()
    ids = np.ones((240, 160), np.uint32)                    # viewer orientation: 240 high, 160 wide
    ids[:, 100:] = 2
    ids[20:120, 10:60] = 3                                  # a thing in the top left corner only
    segments = []
    for sid, cat in ((1, table.stuff_ids[0]), (2, table.stuff_ids[1]), (3, table.thing_ids[0])):
        ys, xs = np.nonzero(ids == sid)
        segments.append({"id": sid, "category_id": cat, "iscrowd": 0, "area": int(len(ys)),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "panoptic").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.rot90(np.where(ids[..., None] == 3, 200, 60).astype(np.uint8).repeat(3, 2))  # 160 high, 240 wide
    Image.fromarray(np.ascontiguousarray(stored)).save(data / "images" / "turned.jpg", exif=exif)
    view = decode_rgb((data / "images" / "turned.jpg").read_bytes())
    assert view.shape == (240, 160, 3) and view[70, 35].mean() > 150 > view[200, 35].mean()
    (data / "panoptic" / "turned.png").write_bytes(encode_id_png(ids))
    (data / "panoptic.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "turned.jpg", "height": 240, "width": 160}],
        "annotations": [{"image_id": 1, "file_name": "turned.png", "segments_info": segments}],
        "categories": table.to_json()}))
    store = ls.LabelStore(str(tmp_path / "labels"))
    plan = make_plan(str(data / "images"), store.plan_uri, gt_json=str(data / "panoptic.json"),
                     gt_dir=str(data / "panoptic"))
    (e,) = plan.read_task(plan.dir, 0)
    store.write_part(0, [{"index": e["index"], "key": e["key"], "image_id": e["image_id"], "file_name": "turned.jpg",
                          "height": 240, "width": 160, "status": "labeled", "reason": "",
                          "png": encode_id_png(ids), "segments": [s | {"score": 0.5, "rle": None} for s in segments],
                          "quality": 0.5, "pq": None, "pq_stats": None}])
    store.seal(0, 1, table, review=1)
    labeled = {"out": store.uri}

    push(labeled, label_studio, "turned", n=1)
    (task,) = tasks_of(client, "turned")
    pred = task.predictions[0] if isinstance(task.predictions[0], dict) else task.predictions[0].dict()
    assert {(r["original_width"], r["original_height"]) for r in pred["result"]} == {(160, 240)}
    served = client._client_wrapper.httpx_client.request(task.data["image"].lstrip("/"), method="GET")
    with Image.open(io.BytesIO(served.content)) as im:
        assert im.size == (240, 160) and im.getexif()[0x0112] == 6      # the bytes as uploaded
        assert ImageOps.exif_transpose(im).size == (160, 240)           # as a browser shows them

    assert main(["review", "pull", "--labels", labeled["out"], "--url", label_studio.url, "--project", "turned",
                 "--out", str(tmp_path / "pulled"), "--from", "predictions", "--workers", "1", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "pulled" / "panoptic.json").read_text())
    assert [(im["height"], im["width"]) for im in doc["images"]] == [(240, 160)]
    (a,) = doc["annotations"]
    pulled = decode_id_png((tmp_path / "pulled" / "panoptic" / a["file_name"]).read_bytes())
    assert pulled.shape == (240, 160)
    assert canonical(pulled, a["segments_info"]) == canonical(ids, segments)


def test_pull_reads_the_latest_annotations_and_lists_skipped_images(labeled, label_studio, client, token, tmp_path):
    push(labeled, label_studio, "reviewed", n=3)
    tasks = sorted(tasks_of(client, "reviewed"), key=lambda t: t.id)
    first = tasks[0].predictions[0]
    first = first if isinstance(first, dict) else first.dict()
    stuff_only = [r for r in first["result"] if r["type"] == "brushlabels"][:1]
    client.annotations.create(id=tasks[0].id, result=first["result"])
    client.annotations.create(id=tasks[0].id, result=stuff_only)             # the latest wins
    client.annotations.create(id=tasks[1].id, result=[], was_cancelled=True)
    assert main(["review", "pull", "--labels", labeled["out"], "--url", label_studio.url, "--project", "reviewed",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "panoptic.json").read_text())
    assert [a["image_id"] for a in doc["annotations"]] == [tasks[0].data["ciae_image_id"]]
    assert len(doc["annotations"][0]["segments_info"]) == 1
    skipped = json.loads((tmp_path / "skipped.json").read_text())["skipped"]
    assert {s["key"]: s["why"] for s in skipped} == {tasks[1].data["ciae_key"]: "skipped by the reviewer",
                                                     tasks[2].data["ciae_key"]: "no annotation"}


def test_user_mistakes_end_in_one_line(labeled, label_studio, tmp_path, monkeypatch, capsys):
    def run(*extra, labels=labeled["out"], url=label_studio.url):
        code = main(["review", "push", "--labels", labels, "--url", url, "--project", "x", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    assert "no Label Studio token: set LABEL_STUDIO_API_KEY" in run()
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    assert "no labels there" in run(labels=str(tmp_path))
    assert "cannot reach Label Studio" in run(url="http://127.0.0.1:9")
    assert "not an http(s) URL" in run(url="localhost:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef")
    assert "token was refused" in run()
    assert os.environ["LABEL_STUDIO_API_KEY"] == "0123456789abcdef"


def test_review_command_has_help(capsys):
    for argv in (["review", "--help"], ["review", "push", "--help"], ["review", "pull", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "LABEL_STUDIO_API_KEY" in capsys.readouterr().out
