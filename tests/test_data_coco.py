"""Reading COCO panoptic: every bad-input case gives a clear error naming the image and problem."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciae.data.panoptic import DatasetError, RecordError, measure_segments
from pipeline.data import coco, storage
from pipeline.data.panoptic_png import decode_id_png, encode_id_png, id_to_rgb
from pipeline.data.shards import convert_record


def _load(src: dict) -> coco.CocoPanoptic:
    return coco.load_panoptic_json(src["panoptic_json"])


def _convert_all(src: dict) -> tuple[list[dict], list[RecordError]]:
    """Validate every record of a dataset the way the data stage does."""
    ds = _load(src)
    images, panoptic = storage.resolve(src["images"]), storage.resolve(src["panoptic_dir"])
    rows, errors = [], list(ds.rejects)
    for rec in ds.records:
        try:
            rows.append(convert_record(rec, images, panoptic))
        except RecordError as e:
            errors.append(e)
    return rows, errors


def _edit_json(src: dict, fn) -> None:
    with open(src["panoptic_json"]) as f:
        doc = json.load(f)
    fn(doc)
    with open(src["panoptic_json"], "w") as f:
        json.dump(doc, f)


def _png_path(src: dict, k: int) -> str:
    with open(src["panoptic_json"]) as f:
        return os.path.join(src["panoptic_dir"], json.load(f)["annotations"][k]["file_name"])


def _only_error(src: dict) -> RecordError:
    rows, errors = _convert_all(src)
    assert len(errors) == 1, [str(e) for e in errors]
    assert len(rows) == 5  # the other images of the 6-image set still convert
    return errors[0]


def test_clean_dataset_has_no_errors(synth_small):
    rows, errors = _convert_all(synth_small)
    assert errors == [] and len(rows) == 6


def test_rgb_id_roundtrip():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**24, size=(7, 9)).astype(np.uint32)
    ids[0, 0] = 2**24 - 1
    assert np.array_equal(decode_id_png(encode_id_png(ids)), ids)
    assert id_to_rgb(np.array([[1 + 256 * 2 + 256 * 256 * 3]])).tolist() == [[[1, 2, 3]]]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint16])
def test_id_to_rgb_splits_every_id_into_its_three_bytes(dtype):
    rng = np.random.default_rng(1)
    top = min(2**24 - 1, np.iinfo(dtype).max)
    ids = rng.integers(0, top + 1, size=(37, 53)).astype(dtype)
    ids[0, 0], ids[-1, -1] = top, 0
    for a in (ids, ids.T, ids[::-1, ::2]):                 # contiguous, transposed, strided
        rgb = id_to_rgb(a)
        wide = a.astype(np.int64)
        assert rgb.shape == (*a.shape, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
        assert np.array_equal(rgb, np.stack([wide & 255, wide >> 8 & 255, wide >> 16 & 255], -1))
        png = encode_id_png(a)                             # rows filtered "Up": read by libspng and PIL alike
        assert np.array_equal(decode_id_png(png), wide)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)
    assert id_to_rgb(np.zeros((0, 4), dtype)).shape == (0, 4, 3)
    with pytest.raises(ValueError, match="segment ids must lie in"):
        id_to_rgb(np.full((2, 2), -1 if np.issubdtype(dtype, np.signedinteger) else 2**24, np.int64))


def test_png_decoding_without_pyspng_gives_the_same_ids(synth_small, monkeypatch):
    """Where pyspng is not installed (the GPU suite's machine), PIL decodes: same ids, and a
    damaged file is still one ValueError."""
    import pipeline.data.panoptic_png as codec

    data = [p.read_bytes() for p in sorted(Path(synth_small["panoptic_dir"]).glob("*.png"))[:3]]
    fast = [decode_id_png(d) for d in data]
    monkeypatch.setattr(codec, "pyspng", None)
    for d, ids in zip(data, fast):
        assert np.array_equal(decode_id_png(d), ids)
    with pytest.raises(ValueError, match="unreadable PNG"):
        decode_id_png(data[0][:200])


def test_png_id_missing_from_json(synth_copy):
    path = _png_path(synth_copy, 2)
    ids = decode_id_png(open(path, "rb").read())
    ids[:3, :3] = 4242
    open(path, "wb").write(encode_id_png(ids))
    e = _only_error(synth_copy)
    assert "image 3 (synth_0007_000002.jpg)" in str(e) and "missing from segments_info" in str(e)
    assert "4242" in str(e)


def test_json_id_missing_from_png(synth_copy):
    _edit_json(synth_copy, lambda d: d["annotations"][1]["segments_info"].append(
        {"id": 777, "category_id": 1, "iscrowd": 0}))
    e = _only_error(synth_copy)
    assert "image 2 " in str(e) and "not in the panoptic PNG" in str(e) and "777" in str(e)


def test_unknown_category(synth_copy):
    _edit_json(synth_copy, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=9999))
    e = _only_error(synth_copy)
    assert "image 1 " in str(e) and "unknown category_id 9999" in str(e)


def test_png_size_differs_from_image(synth_copy):
    path = _png_path(synth_copy, 4)
    ids = decode_id_png(open(path, "rb").read())
    open(path, "wb").write(encode_id_png(ids[:, :100]))
    e = _only_error(synth_copy)
    assert "image 5 " in str(e) and "panoptic PNG is 100x96 but the image is 128x96" in str(e)


def test_image_size_differs_from_json(synth_copy):
    path = os.path.join(synth_copy["images"], "synth_0007_000003.jpg")
    Image.open(path).resize((64, 48)).save(path)
    e = _only_error(synth_copy)
    assert "image 4 " in str(e) and "image is 64x48 but the JSON says 128x96" in str(e)


def _tag_as_phone(path: str, orientation: int = 6) -> bytes:
    """Re-save an image as a phone would store it: the pixels turned back a quarter (stored
    taller than wide) with EXIF ``orientation`` 6, so that viewers show the original. Returns
    the file's bytes."""
    stored = np.rot90(np.asarray(Image.open(path).convert("RGB")), k=1)   # viewers turn it back clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)
    return open(path, "rb").read()


def test_an_exif_oriented_image_is_checked_and_converted_at_its_shown_size(synth_copy):
    """A photo stored 96 wide and 128 high, tagged 6: the JSON (128x96) and the panoptic PNG
    are in the orientation viewers show, so it converts; the shard keeps the file's bytes and
    training decodes it at the PNG's size. The JSON's size is checked against the shown size."""
    from pipeline.feed.targets import decode_row

    data = _tag_as_phone(os.path.join(synth_copy["images"], "synth_0007_000002.jpg"))
    assert Image.open(io.BytesIO(data)).size == (96, 128)
    assert coco.check_image("image 3", data, 96, 128) == "JPEG"
    with pytest.raises(RecordError, match=r"image 3: image is 128x96 as shown \(EXIF orientation 6 "
                                          r"applied; 96x128 as stored\) but the JSON says 96x128"):
        coco.check_image("image 3", data, 128, 96)
    rows, errors = _convert_all(synth_copy)
    assert errors == [] and len(rows) == 6
    row = next(r for r in rows if r["image_id"] == 3)
    assert row["image"] == data and (row["height"], row["width"]) == (96, 128)
    image, index, _ = decode_row(row)
    assert image.shape == (96, 128, 3) and index.shape == (96, 128)


def test_a_panoptic_png_in_the_stored_orientation_is_rejected_clearly(synth_copy):
    """Ground truth drawn on the stored pixels of an EXIF-turned photo does not fit the image
    as shown: the record is rejected, naming the image and the turn."""
    _tag_as_phone(os.path.join(synth_copy["images"], "synth_0007_000002.jpg"))
    path = _png_path(synth_copy, 2)
    ids = decode_id_png(open(path, "rb").read())
    open(path, "wb").write(encode_id_png(np.ascontiguousarray(np.rot90(ids, k=1))))
    e = _only_error(synth_copy)
    assert str(e).startswith("image 3 (synth_0007_000002.jpg): panoptic PNG is 96x128 but the image is "
                             "128x96 (turned: panoptic PNGs are taken in the image's orientation as "
                             "viewers show it, its EXIF orientation applied)")


@pytest.mark.parametrize("which", ["image", "panoptic"])
@pytest.mark.parametrize("damage, index, problem", [("truncate", 1, "unreadable or truncated"),
                                                    ("remove", 5, "is missing")])
def test_truncated_and_missing_files(synth_copy, which, damage, index, problem):
    path = (os.path.join(synth_copy["images"], f"synth_0007_{index:06d}.jpg") if which == "image"
            else _png_path(synth_copy, index))
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        os.remove(path)
    e = _only_error(synth_copy)
    assert f"image {index + 1} " in str(e) and problem in str(e)
    assert damage == "truncate" or os.path.basename(path) in str(e)


def test_unreadable_garbage_file(synth_copy):
    open(_png_path(synth_copy, 0), "wb").write(b"this is not a png")
    e = _only_error(synth_copy)
    assert "image 1 " in str(e) and "panoptic PNG is unreadable" in str(e)


def test_duplicate_segment_ids(synth_copy):
    def dup(d):
        infos = d["annotations"][2]["segments_info"]
        infos.append(dict(infos[0]))
    _edit_json(synth_copy, dup)
    e = _only_error(synth_copy)
    assert "image 3 " in str(e) and "duplicate segment ids" in str(e)


def test_duplicate_image_ids_rejects_every_copy(synth_copy):
    _edit_json(synth_copy, lambda d: d["images"].append(dict(d["images"][3])))
    rows, errors = _convert_all(synth_copy)
    assert len(rows) == 5 and len(errors) == 1
    assert "image 4 " in str(errors[0]) and "duplicate image id" in str(errors[0])


def test_void_segment_id_and_annotation_mismatches(synth_copy):
    def edit(d):
        d["annotations"][0]["segments_info"][0]["id"] = 0
        d["annotations"].append({"image_id": 99, "file_name": "x.png", "segments_info": []})
        d["images"].append({"id": 100, "file_name": "y.jpg", "height": 1, "width": 1})
    _edit_json(synth_copy, edit)
    rows, errors = _convert_all(synth_copy)
    msgs = sorted(str(e) for e in errors)
    assert len(rows) == 5 and len(msgs) == 3
    assert any("image 1 " in m and "segment id 0 is outside" in m for m in msgs)
    assert any("image 99" in m and "missing from 'images'" in m for m in msgs)
    assert any("image 100 (y.jpg)" in m and "no annotation" in m for m in msgs)


def test_area_and_bbox_must_match_png(synth_copy):
    _edit_json(synth_copy, lambda d: d["annotations"][3]["segments_info"][0].update(area=1))
    e = _only_error(synth_copy)
    assert "image 4 " in str(e) and "JSON area 1" in str(e)


def test_dataset_level_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: cannot read panoptic JSON"):
        coco.load_panoptic_json(str(bad))
    with pytest.raises(DatasetError, match="file not found"):
        coco.load_panoptic_json(str(tmp_path / "absent.json"))
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}]}))
    with pytest.raises(DatasetError, match=r"duplicate category ids \[1\]"):
        coco.load_panoptic_json(str(bad))


def test_reads_through_uris(synth_small):
    """file:// goes through pyarrow's filesystem, memory:// through fsspec."""
    import fsspec

    ds = coco.load_panoptic_json("file://" + synth_small["panoptic_json"])
    assert len(ds.records) == 6
    mem = fsspec.filesystem("memory")
    with open(synth_small["panoptic_json"], "rb") as f:
        mem.pipe("/ciae-test/panoptic.json", f.read())
    for name in os.listdir(synth_small["panoptic_dir"]):
        mem.pipe(f"/ciae-test/panoptic/{name}", open(os.path.join(synth_small["panoptic_dir"], name), "rb").read())
    for name in os.listdir(synth_small["images"]):
        mem.pipe(f"/ciae-test/images/{name}", open(os.path.join(synth_small["images"], name), "rb").read())
    rows, errors = _convert_all({"images": "memory://ciae-test/images",
                                 "panoptic_json": "memory://ciae-test/panoptic.json",
                                 "panoptic_dir": "memory://ciae-test/panoptic"})
    assert errors == [] and len(rows) == 6


def test_measure_segments_matches_masks():
    rng = np.random.default_rng(1)
    index = rng.integers(0, 5, size=(13, 17)).astype(np.int32)
    index[index == 3] = 0  # segment 3 is empty
    areas, boxes = measure_segments(index, 4)
    for i in range(1, 5):
        ys, xs = np.nonzero(index == i)
        assert areas[i - 1] == len(ys)
        expect = [0, 0, 0, 0] if len(ys) == 0 else [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                      ys.max() - ys.min() + 1]
        assert boxes[i - 1].tolist() == expect


def test_record_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(RecordError("image 5 (x.jpg)", "panoptic PNG is missing")))
    assert isinstance(e, RecordError) and str(e) == "image 5 (x.jpg): panoptic PNG is missing"
    assert (e.image, e.problem) == ("image 5 (x.jpg)", "panoptic PNG is missing")


def test_segment_rles_are_pycocotools_strings_from_one_pass():
    """``segment_rles`` gives, for each id, the counts pycocotools encodes for its full-image
    mask: on random and blocky maps (runs that go on past a column's end), segments at the
    first and last pixel, one covering the whole map, 1-pixel maps, an id the map lacks, none."""
    from pycocotools import mask

    from pipeline.data.coco import segment_rles

    def expected(ids, wanted):
        return [mask.encode(np.asfortranarray(ids == k))["counts"].decode("ascii") for k in wanted]

    rng = np.random.default_rng(0)
    maps = [np.full((3, 4), 5, np.int32), np.array([[2]], np.int32), np.array([[0]], np.int32)]
    for _ in range(60):
        h, w = rng.integers(1, 30, 2)
        maps.append(rng.integers(0, 6, (h, w)).astype(np.int32))
        blocks = rng.integers(0, 6, ((h + 4) // 5, (w + 2) // 3))
        maps.append(np.repeat(np.repeat(blocks, 5, 0), 3, 1)[:h, :w].astype(np.int32))
    for ids in maps:
        wanted = [1, 2, 3, 4, 5, 9]
        assert segment_rles(ids, wanted) == expected(ids, wanted), ids
    ids = maps[3]
    assert segment_rles(ids, []) == []
    assert segment_rles(ids, [int(ids[-1, -1]), int(ids[0, 0])]) == expected(ids, [ids[-1, -1], ids[0, 0]])


def test_png_encoding_without_zlib_ng_gives_the_same_ids(monkeypatch):
    """zlib-ng deflates the PNGs where it is installed; zlib, the same format, where not."""
    import zlib

    from pipeline.data import panoptic_png

    ids = np.random.default_rng(2).integers(0, 40, size=(60, 80)).repeat(3, axis=0).astype(np.int32)
    fast = encode_id_png(ids)
    monkeypatch.setattr(panoptic_png, "deflate", zlib)
    slow = encode_id_png(ids)
    assert panoptic_png.deflate is zlib and fast != slow
    for png in (fast, slow):
        assert np.array_equal(decode_id_png(png), ids)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), id_to_rgb(ids))
