"""PQ: equal to panopticapi (the real package) to 1e-9 on random cases, mergeable, and clear on bad input.

Random cases are small maps (6-20 pixels a side) so that ties and edge cases are frequent:
crowd regions (several of one category, where panopticapi keeps the last), void on both sides,
unmatched segments on both sides, category confusions, empty predictions, images without a
ground-truth segment, ids up to 256**3 - 1, IoU exactly 0.5.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from ciae.data.panoptic import CategoryTable, DatasetError, RecordError
from pipeline.data.panoptic_png import MAX_SEGMENT_ID, decode_id_png, id_to_rgb
from pipeline.evaluation.pq import PQAccumulator, format_table

panopticapi = pytest.importorskip("panopticapi.evaluation")

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 18, "name": "dog", "isthing": 1}, {"id": 92, "name": "banner", "isthing": 0},
              {"id": 149, "name": "road", "isthing": 0}, {"id": 200, "name": "sky", "isthing": 0}]
TABLE = CategoryTable.from_json(CATEGORIES)
CATEGORY_IDS = [c["id"] for c in CATEGORIES]


# ------------------------------------------------------------------------------ random cases


def _paint_boxes(rng, labels: np.ndarray, values) -> None:
    h, w = labels.shape
    for v in values:
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        labels[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = v


def _random_ids(rng, n: int) -> list[int]:
    """n distinct ids mixing small ones, ones next to 256**3 - 1 and any in between."""
    pool = np.concatenate([rng.integers(1, 40, 2 * n), MAX_SEGMENT_ID - rng.integers(0, 40, 2 * n),
                           rng.integers(1, MAX_SEGMENT_ID + 1, 2 * n)])
    ids = np.unique(pool)
    rng.shuffle(ids)
    return ids[:n].tolist()


def random_case(rng) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """Ground-truth id map [H, W] uint32 + segments, predicted id map + segments."""
    h, w = rng.integers(6, 21, size=2)
    gt = np.zeros((h, w), dtype=np.int64)
    _paint_boxes(rng, gt, range(1, rng.integers(0, 9) + 1))  # 0 segments: an image without any
    if rng.random() < 0.7:
        _paint_boxes(rng, gt, [0] * rng.integers(1, 3))
    gt_labels = [int(v) for v in np.unique(gt) if v]
    gt_cat = {v: int(rng.choice(CATEGORY_IDS)) for v in gt_labels}
    crowd = {v: int(rng.random() < 0.25) for v in gt_labels}

    if rng.random() < 0.1:
        pred = np.zeros_like(gt)  # an empty prediction
    else:
        pred = gt.copy() if rng.random() < 0.8 else np.zeros_like(gt)
        _paint_boxes(rng, pred, range(100, 100 + rng.integers(0, 5)))
        if rng.random() < 0.5:
            _paint_boxes(rng, pred, [0] * rng.integers(1, 3))
    pred_labels = [int(v) for v in np.unique(pred) if v]
    pred_cat = {v: gt_cat[v] if v in gt_cat and rng.random() < 0.7 else int(rng.choice(CATEGORY_IDS))
                for v in pred_labels}

    def to_ids(labels, present, category, crowd_of):
        ids = dict(zip(present, _random_ids(rng, len(present))))
        out = np.zeros(labels.shape, dtype=np.uint32)
        for v, i in ids.items():
            out[labels == v] = i
        segs = [{"id": ids[v], "category_id": category[v], "iscrowd": crowd_of.get(v, 0),
                 "area": int((labels == v).sum())} for v in present]
        rng.shuffle(segs)
        return out, segs

    return (*to_ids(gt, gt_labels, gt_cat, crowd), *to_ids(pred, pred_labels, pred_cat, {}))


def to_index(ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    """[H, W] ids -> [H, W] int32 segment-index map (0 = void, i = segments[i - 1])."""
    index = np.zeros(ids.shape, dtype=np.int32)
    for k, s in enumerate(segments):
        index[ids == s["id"]] = k + 1
    return index


def write_png(path, ids: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(ids)).save(path)


def write_dataset(root, cases, name: str) -> tuple[str, str]:
    """COCO panoptic JSON + PNG folder for one side of ``cases`` (0: ground truth, 1: prediction)."""
    side = 0 if name == "gt" else 2
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    doc = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i, case in enumerate(cases):
        ids, segs = case[side], case[side + 1]
        write_png(os.path.join(folder, f"{i}.png"), ids)
        doc["images"].append({"id": i, "file_name": f"{i}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        doc["annotations"].append({"image_id": i, "file_name": f"{i}.png", "segments_info": segs})
    with open(folder + ".json", "w") as f:
        json.dump(doc, f)
    return folder + ".json", folder


def panopticapi_stat(tmp_path, case) -> "panopticapi.PQStat":
    """panopticapi's per-category statistics of one case, from PNG files."""
    gt_ids, gt_segs, pred_ids, pred_segs = case
    write_png(tmp_path / "gt.png", gt_ids)
    write_png(tmp_path / "pred.png", pred_ids)
    pair = ({"image_id": 0, "file_name": "gt.png", "segments_info": gt_segs},
            {"image_id": 0, "file_name": "pred.png", "segments_info": copy.deepcopy(pred_segs)})
    with contextlib.redirect_stdout(io.StringIO()):
        return panopticapi.pq_compute_single_core(0, [pair], str(tmp_path), str(tmp_path),
                                                  {c["id"]: c for c in CATEGORIES})


def assert_same_stats(acc: PQAccumulator, stat, context="") -> None:
    for k, cid in enumerate(acc.category_ids.tolist()):
        theirs = stat.pq_per_cat[cid]
        assert (acc.tp[k], acc.fp[k], acc.fn[k]) == (theirs.tp, theirs.fp, theirs.fn), (context, cid)
        assert acc.iou[k] == pytest.approx(theirs.iou, abs=1e-9), (context, cid)


def assert_same_summary(ours: dict, theirs: dict) -> None:
    """Every figure equal to 1e-9; panopticapi's per_class also lists the classes without
    TP, FP or FN (at 0), which ours leaves out."""
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == theirs[group]["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(theirs[group][key], abs=1e-9), (group, key)
    assert len(ours["per_class"]) == ours["All"]["n"]
    for cid, r in theirs["per_class"].items():
        mine = ours["per_class"].get(cid)
        if mine is None:
            assert r == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        for key in ("pq", "sq", "rq"):
            assert mine[key] == pytest.approx(r[key], abs=1e-9), (cid, key)


# ------------------------------------------------------------------- equality with panopticapi


def test_random_images_match_panopticapi(tmp_path):
    rng = np.random.default_rng(1234)
    seen = {"crowd ignores a false positive": 0, "void ignores a false positive": 0,
            "two crowd segments of a category": 0, "IoU exactly 0.5": 0, "empty prediction": 0,
            "no ground-truth segment": 0, "id 256**3 - 1": 0, "category confusion": 0}
    for i in range(1000):
        case = random_case(rng)
        gt_ids, gt_segs, pred_ids, pred_segs = case
        stat = panopticapi_stat(tmp_path, case)
        acc = PQAccumulator(TABLE)
        acc.add(gt_ids, gt_segs, pred_ids, pred_segs, image=f"case {i}")
        assert_same_stats(acc, stat, f"case {i}")
        indexed = PQAccumulator(TABLE)
        indexed.add_indexed(to_index(gt_ids, gt_segs), gt_segs, to_index(pred_ids, pred_segs), pred_segs)
        assert_same_stats(indexed, stat, f"case {i}, indexed")

        # What this case exercised, recomputed the slow way.
        crowd_cats = [s["category_id"] for s in gt_segs if s["iscrowd"]]
        seen["two crowd segments of a category"] += len(crowd_cats) > len(set(crowd_cats))
        seen["empty prediction"] += not pred_segs
        seen["no ground-truth segment"] += not gt_segs
        seen["id 256**3 - 1"] += MAX_SEGMENT_ID in {s["id"] for s in gt_segs + pred_segs}
        for p in pred_segs:
            mask = pred_ids == p["id"]
            crowd = {s["category_id"]: s["id"] for s in gt_segs if s["iscrowd"]}
            on_void = (mask & (gt_ids == 0)).sum()
            on_crowd = (mask & (gt_ids == crowd.get(p["category_id"], -1))).sum()
            seen["void ignores a false positive"] += 2 * on_void > mask.sum()
            seen["crowd ignores a false positive"] += 2 * on_void <= mask.sum() < 2 * (on_void + on_crowd)
            for g in gt_segs:
                inter = (mask & (gt_ids == g["id"])).sum()
                union = (mask | (gt_ids == g["id"])).sum() - on_void
                seen["IoU exactly 0.5"] += inter > 0 and 2 * inter == union
                seen["category confusion"] += 2 * inter > union and g["category_id"] != p["category_id"]
    assert all(seen.values()), seen


def test_random_datasets_match_pq_compute(tmp_path, monkeypatch):
    """The file evaluator, through hotcoco (local folders) and through our accumulator (URIs,
    or when hotcoco is absent), against panopticapi."""
    import pipeline.evaluation.files as module

    hotcoco_calls = []
    monkeypatch.setattr(module, "_hotcoco", lambda *a, real=module._hotcoco: hotcoco_calls.append(1) or real(*a))
    rng = np.random.default_rng(99)
    for d in range(4):
        cases = [random_case(rng) for _ in range(50)]
        root = tmp_path / f"set{d}"
        gt_json, gt_dir = write_dataset(root, cases, "gt")
        pred_json, pred_dir = write_dataset(root, cases, "pred")
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = panopticapi.pq_compute(gt_json, pred_json, gt_dir, pred_dir)
        via_hotcoco = module.evaluate(gt_json, gt_dir, pred_json, pred_dir, workers=1)
        assert_same_summary(via_hotcoco, theirs)
        assert_same_summary(module.evaluate(gt_json, f"file://{gt_dir}", pred_json, f"file://{pred_dir}",
                                            workers=1), theirs)
        acc = PQAccumulator(TABLE)
        for k, (gt_ids, gt_segs, pred_ids, pred_segs) in enumerate(cases):
            acc.add(gt_ids, gt_segs, pred_ids, pred_segs, image=f"image {k}")
        assert_same_summary(acc.summary(), theirs)
    assert len(hotcoco_calls) == 4                            # the URI runs do not use it


def test_many_segments_match_panopticapi(tmp_path):
    """300 segments a side: the joint table is counted by sorting instead of a bincount."""
    rng = np.random.default_rng(5)
    h, w = 30, 40
    gt = rng.permutation(np.arange(h * w) % 300 + 1).reshape(h, w).astype(np.uint32) * 7
    gt[:3] = 0
    pred = gt.copy()
    pred[10:] = np.roll(gt[10:], 1, axis=1) + 5
    pred[:, :2] = 0
    gt_segs = [{"id": int(i), "category_id": int(rng.choice(CATEGORY_IDS)), "iscrowd": int(rng.random() < 0.1),
                "area": int((gt == i).sum())} for i in np.unique(gt) if i]
    pred_segs = [{"id": int(i), "category_id": int(rng.choice(CATEGORY_IDS))} for i in np.unique(pred) if i]
    case = (gt, gt_segs, pred, pred_segs)
    acc = PQAccumulator(TABLE)
    acc.add(*case)
    assert acc.tp.sum() > 0 and acc.fp.sum() > 0 and acc.fn.sum() > 0
    assert_same_stats(acc, panopticapi_stat(tmp_path, case))


def test_coco_sample_against_itself(coco_sample):
    from pipeline.evaluation.files import evaluate

    src = (coco_sample["panoptic_json"], coco_sample["panoptic_dir"])
    ours = evaluate(*src, *src, workers=1)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi.pq_compute(src[0], src[0], src[1], src[1])
    for group in ("All", "Things", "Stuff"):
        assert (ours[group]["pq"], ours[group]["sq"], ours[group]["rq"]) == (1.0, 1.0, 1.0)
    assert ours["All"]["n"] == 8
    assert_same_summary(ours, theirs)


# ---------------------------------------------------------------------------------- merging


def test_partial_states_merge_across_processes():
    rng = np.random.default_rng(3)
    cases = [random_case(rng) for _ in range(60)]
    whole = PQAccumulator(TABLE)
    parts = [PQAccumulator(TABLE) for _ in range(3)]
    for k, case in enumerate(cases):
        whole.add(*case)
        parts[k % 3].add(*case)
    parts = [pickle.loads(pickle.dumps(p)) for p in parts]  # as a process pool or Ray returns them
    before = parts[0].tp.copy()
    total = parts[0] + parts[1] + parts[2]
    assert np.array_equal(parts[0].tp, before)  # + leaves its operands alone
    merged = PQAccumulator(TABLE).merge(parts[0]).merge(parts[1]).merge(parts[2])
    for acc in (total, merged):
        assert acc.images == 60
        assert np.array_equal(acc.tp, whole.tp) and np.array_equal(acc.fp, whole.fp)
        assert np.array_equal(acc.fn, whole.fn)
        np.testing.assert_allclose(acc.iou, whole.iou, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="different category tables"):
        whole.merge(PQAccumulator(CategoryTable.from_json(CATEGORIES[:4])))


def test_summary_without_any_class_and_table():
    summary = PQAccumulator(TABLE).summary()
    assert summary["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0} and summary["per_class"] == {}
    acc = PQAccumulator(TABLE)
    ids = np.array([[5, 5], [6, 6]], dtype=np.uint32)
    segs = [{"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 6, "category_id": 92, "iscrowd": 0}]
    acc.add(ids, segs, ids, segs)
    table = format_table(acc.summary())
    assert table.splitlines()[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    assert table.splitlines()[2].split() == ["All", "|", "100.0", "100.0", "100.0", "2"]


# -------------------------------------------------------------------------------- bad input


def _good():
    gt = np.array([[0, 7, 7], [9, 9, 9]], dtype=np.uint32)
    pred = np.array([[4, 4, 4], [5, 5, 0]], dtype=np.uint32)
    gt_segs = [{"id": 7, "category_id": 1, "iscrowd": 0}, {"id": 9, "category_id": 149, "iscrowd": 0}]
    pred_segs = [{"id": 4, "category_id": 1}, {"id": 5, "category_id": 149}]
    return gt, gt_segs, pred, pred_segs


def _with(pred_segs=None, pred=None, gt_segs=None, gt=None):
    g, gs, p, ps = _good()
    return (g if gt is None else gt, gs if gt_segs is None else gt_segs,
            p if pred is None else pred, ps if pred_segs is None else pred_segs)


BAD_STREAMS = {
    "size": (_with(pred=np.zeros((3, 3), np.uint32), pred_segs=[]),
             "the prediction is 3x3 but the ground truth is 3x2"),
    "png id not listed": (_with(pred_segs=[{"id": 4, "category_id": 1}]),
                          "predicted id map has segment ids missing from the predicted segments: [5]"),
    "listed id not in png": (_with(pred_segs=_good()[3] + [{"id": 8, "category_id": 3}]),
                             "predicted segments [8] are absent from the predicted id map"),
    "gt id not listed": (_with(gt_segs=_good()[1][:1]),
                         "ground-truth id map has segment ids missing from the ground-truth segments: [9]"),
    "unknown category": (_with(pred_segs=[{"id": 4, "category_id": 1}, {"id": 5, "category_id": 999}]),
                         "predicted segment 5 has unknown category_id 999"),
    "id 0": (_with(pred_segs=_good()[3] + [{"id": 0, "category_id": 1}]),
             "predicted segment id 0 is outside [1, 16777215] (0 is void)"),
    "duplicate id": (_with(pred_segs=_good()[3] + [{"id": 5, "category_id": 1}]),
                     "duplicate predicted segment ids [5]"),
    "negative id": (_with(pred=np.array([[4, 4, 4], [5, 5, -1]])), "predicted id map has negative ids"),
    "float map": (_with(pred=np.zeros((2, 3))), "predicted id map has dtype float64"),
    "malformed segment": (_with(pred_segs=[{"id": 4}]), "predicted segment #0 is malformed"),
}


@pytest.mark.parametrize("name", BAD_STREAMS)
def test_bad_streamed_input_names_image_and_problem(name):
    case, problem = BAD_STREAMS[name]
    with pytest.raises(RecordError) as err:
        PQAccumulator(TABLE).add(*case, image="image 42 (a.jpg)")
    assert err.value.image == "image 42 (a.jpg)"
    assert problem in err.value.problem
    assert str(err.value).startswith("image 42 (a.jpg): ")


def test_bad_index_maps():
    gt, gt_segs, pred, pred_segs = _good()
    gt_index, pred_index = to_index(gt, gt_segs), to_index(pred, pred_segs)
    PQAccumulator(TABLE).add_indexed(gt_index, gt_segs, pred_index, pred_segs, image="x")
    with pytest.raises(RecordError, match=r"x: predicted index map has values outside \[0, 1\]"):
        PQAccumulator(TABLE).add_indexed(gt_index, gt_segs, pred_index, pred_segs[:1], image="x")
    with pytest.raises(RecordError, match=r"x: predicted segments \[5\] are absent"):
        PQAccumulator(TABLE).add_indexed(gt_index, gt_segs, np.minimum(pred_index, 1), pred_segs, image="x")


def test_ids_beyond_coco_range_are_reported():
    gt, gt_segs, pred, pred_segs = _good()
    pred = pred.astype(np.uint64)
    pred[0, 0] = 2**63 + 4  # would read as negative once cast to intp
    with pytest.raises(RecordError, match="predicted id map has negative ids"):
        PQAccumulator(TABLE).add(gt, gt_segs, pred, pred_segs)
    pred[0, 0] = 2**24 + 4  # clips onto the table's last entry
    with pytest.raises(RecordError, match=r"missing from the predicted segments: \[16777220\]"):
        PQAccumulator(TABLE).add(gt, gt_segs, pred, pred_segs)


# ---------------------------------------------------------------------------- file front end


@pytest.fixture
def small_dataset(tmp_path) -> dict:
    """3 random images, each with ground-truth and predicted segments, as COCO files."""
    rng = np.random.default_rng(11)
    cases = []
    while len(cases) < 3:
        case = random_case(rng)
        if len(case[1]) >= 2 and len(case[3]) >= 2:
            cases.append(case)
    gt_json, gt_dir = write_dataset(tmp_path, cases, "gt")
    pred_json, pred_dir = write_dataset(tmp_path, cases, "pred")
    return {"gt_json": gt_json, "gt_dir": gt_dir, "pred_json": pred_json, "pred_dir": pred_dir,
            "cases": cases}


def _edit(path: str, fn) -> None:
    with open(path) as f:
        doc = json.load(f)
    fn(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _segments_of_image_1(doc) -> list[dict]:
    return doc["annotations"][1]["segments_info"]


BAD_FILES = {
    "missing prediction PNG": (lambda d: os.remove(os.path.join(d["pred_dir"], "1.png")),
                               "prediction PNG file {pred_dir}/1.png is missing"),
    "missing prediction entry": (lambda d: _edit(d["pred_json"], lambda doc: doc["annotations"].pop(1)),
                                 "no prediction in {pred_json}"),
    "PNG id missing from JSON": (lambda d: _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc).pop(0)),
                                 "predicted id map has segment ids missing from the predicted segments: [{id}]"),
    "JSON id missing from PNG": (lambda d: _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc).append(
        {"id": 123456, "category_id": 1})), "predicted segments [123456] are absent from the predicted id map"),
    "unknown category": (lambda d: _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc)[0].update(
        category_id=999)), "prediction JSON: segment {id} has unknown category_id 999"),
    "segment id 0": (lambda d: _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc).append(
        {"id": 0, "category_id": 1})), "prediction JSON: segment id 0 is outside [1, 16777215] (0 is void)"),
    "duplicate segment id": (lambda d: _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc).append(
        dict(_segments_of_image_1(doc)[0]))), "prediction JSON: duplicate segment ids [{id}]"),
    "size differs": (lambda d: write_png(os.path.join(d["pred_dir"], "1.png"), d["cases"][1][2][:-1, :-1]),
                     "prediction PNG {pred_dir}/1.png is {w1}x{h1} but the image is {w}x{h}"),
    "unknown ground-truth category": (lambda d: _edit(d["gt_json"], lambda doc: _segments_of_image_1(doc)[0].update(
        category_id=999)), "ground-truth JSON: segment {gt_id} has unknown category_id 999"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_name_image_and_problem(small_dataset, name):
    from pipeline.evaluation.files import EvaluationError, evaluate

    d = small_dataset
    corrupt, problem = BAD_FILES[name]
    h, w = d["cases"][1][0].shape
    with open(d["pred_json"]) as f:
        first_pred = _segments_of_image_1(json.load(f))[0]["id"]
    with open(d["gt_json"]) as f:
        first_gt = _segments_of_image_1(json.load(f))[0]["id"]
    corrupt(d)
    with pytest.raises(EvaluationError) as err:
        evaluate(d["gt_json"], d["gt_dir"], d["pred_json"], d["pred_dir"], workers=1)
    assert len(err.value.errors) == 1
    e = err.value.errors[0]
    assert e.image == "image 1 (1.jpg)"
    assert e.problem.startswith(problem.format(id=first_pred, gt_id=first_gt, h=h, w=w, h1=h - 1, w1=w - 1,
                                               pred_dir=d["pred_dir"], pred_json=d["pred_json"]))
    assert f"image 1 (1.jpg): {e.problem}" in str(err.value)


@pytest.mark.parametrize("edit", ["PNG id missing from the JSON", "JSON segment without pixels"])
def test_inconsistent_ground_truth(small_dataset, edit):
    """Local folders (hotcoco) count a ground truth whose PNG and JSON disagree as panopticapi
    does; the accumulator (URIs) refuses the image, naming it."""
    from pipeline.evaluation.files import EvaluationError, evaluate

    d = small_dataset

    def corrupt(doc):
        segs = _segments_of_image_1(doc)
        if edit == "PNG id missing from the JSON":
            segs.pop(0)
        else:
            segs.append({"id": 123456, "category_id": segs[0]["category_id"], "iscrowd": 0, "area": 5})
    _edit(d["gt_json"], corrupt)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi.pq_compute(d["gt_json"], d["pred_json"], d["gt_dir"], d["pred_dir"])
    assert_same_summary(evaluate(d["gt_json"], d["gt_dir"], d["pred_json"], d["pred_dir"], workers=1), theirs)
    with pytest.raises(EvaluationError, match=r"image 1 \(1.jpg\): ground-truth "):
        evaluate(d["gt_json"], f"file://{d['gt_dir']}", d["pred_json"], d["pred_dir"], workers=1)


@pytest.mark.timeout(60)
def test_every_problem_is_listed_and_the_cli_fails(small_dataset, capsys):
    from workflows.cli import main

    d = small_dataset
    os.remove(os.path.join(d["pred_dir"], "0.png"))
    _edit(d["pred_json"], lambda doc: _segments_of_image_1(doc).pop(0))
    args = ["evaluate", "--gt-json", d["gt_json"], "--gt-dir", d["gt_dir"],
            "--pred-json", d["pred_json"], "--pred-dir", d["pred_dir"], "--workers", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("ciae evaluate: 2 problem(s) prevent the evaluation: image 0")
    assert "image 0 (0.jpg): prediction PNG file" in err and "image 1 (1.jpg): predicted id map" in err


def test_missing_or_broken_prediction_json(small_dataset):
    from pipeline.evaluation.files import evaluate

    d = small_dataset
    with pytest.raises(DatasetError, match="absent.json: file not found"):
        evaluate(d["gt_json"], d["gt_dir"], d["gt_dir"] + "/absent.json", d["pred_dir"], workers=1)
    with open(d["pred_json"], "w") as f:
        f.write('{"images": []}')
    with pytest.raises(DatasetError, match="expected a JSON object with an 'annotations' list"):
        evaluate(d["gt_json"], d["gt_dir"], d["pred_json"], d["pred_dir"], workers=1)


@pytest.mark.timeout(60)
def test_cli_writes_metrics_through_uris_with_workers(small_dataset, tmp_path, capsys):
    from workflows.cli import main

    d = small_dataset
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = panopticapi.pq_compute(d["gt_json"], d["pred_json"], d["gt_dir"], d["pred_dir"])
    _edit(d["pred_json"], lambda doc: doc.pop("images"))  # predictions often carry annotations only
    out = tmp_path / "out" / "metrics.json"
    out.parent.mkdir()
    assert main(["evaluate", "--gt-json", "file://" + d["gt_json"], "--gt-dir", "file://" + d["gt_dir"],
                 "--pred-json", d["pred_json"], "--pred-dir", "file://" + d["pred_dir"],
                 "--output", "file://" + str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    assert [line.split()[0] for line in printed[2:5]] == ["All", "Things", "Stuff"]
    assert printed[2].split()[2] == f"{100 * theirs['All']['pq']:5.1f}".strip()
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"All", "Things", "Stuff", "per_class"}
    assert_same_summary({**metrics, "per_class": {int(k): v for k, v in metrics["per_class"].items()}}, theirs)
    for r in [metrics[g] for g in ("All", "Things", "Stuff")] + list(metrics["per_class"].values()):
        assert all(0.0 <= r[k] <= 1.0 for k in ("pq", "sq", "rq"))


def test_cli_help():
    from workflows.cli import main

    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["evaluate", "--help"])
    assert done.value.code == 0
    assert "--gt-json" in out.getvalue() and "--workers" in out.getvalue()


def test_decode_id_png_matches_reference(coco_sample):
    from panopticapi.utils import rgb2id

    for name in os.listdir(coco_sample["panoptic_dir"]):
        data = open(os.path.join(coco_sample["panoptic_dir"], name), "rb").read()
        reference = rgb2id(np.array(Image.open(io.BytesIO(data)), dtype=np.uint32))
        assert np.array_equal(decode_id_png(data), reference)
        out = np.zeros(reference.shape, dtype=np.uint32)
        assert decode_id_png(data, out) is out and np.array_equal(out, reference)
    rng = np.random.default_rng(0)
    for mode, shape in (("RGBA", (5, 7, 4)), ("RGB", (2100, 2100, 3))):  # 2100**2 * 4 B > 16 MiB
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode).save(buf, format="PNG", compress_level=0)
        expected = pixels[..., 0] + 256 * pixels[..., 1].astype(np.uint32) + 65536 * pixels[..., 2].astype(np.uint32)
        assert np.array_equal(decode_id_png(buf.getvalue()), expected)


def test_unreadable_png_names_image_and_problem(small_dataset):
    import pipeline.evaluation.files as module

    d = small_dataset
    path = os.path.join(d["pred_dir"], "1.png")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(module.EvaluationError) as err:
        module.evaluate(d["gt_json"], d["gt_dir"], d["pred_json"], d["pred_dir"], workers=1)
    assert f"image 1 (1.jpg): prediction PNG {path} is unreadable or truncated" in str(err.value)
