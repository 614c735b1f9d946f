"""The Ray Data job: COCO panoptic -> shards, exact, reporting rejects, idempotent and atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ciae.data.panoptic import DatasetError
from pipeline.data import storage
from pipeline.data.prepare import prepare
from pipeline.data.shards import (LEGACY_MANIFEST, MANIFEST, Source, decode_panoptic_row, read_manifest,
                                  read_table, shard_paths)

pytestmark = pytest.mark.usefixtures("ray_local")


def _source(d: dict) -> Source:
    return Source(d["images"], d["panoptic_json"], d["panoptic_dir"])


def _direct_ids(png_path: str) -> np.ndarray:
    """COCO id map straight from the PNG, as the COCO panoptic format defines it."""
    rgb = np.asarray(Image.open(png_path), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def test_real_coco_sample_reproduced_exactly(coco_sample, make_shards):
    shards = make_shards(coco_sample)           # the session's, shared with other tests
    m = read_manifest(shards)
    assert m["counts"] == {"source_records": 2, "images": 2, "rejected": 0, "shards": 1}
    assert len(m["categories"]) == 133
    assert len(m["stuff_index"]) == 53 and len(m["thing_index"]) == 80
    assert sorted(m["stuff_index"].values()) == list(range(53))
    doc = json.load(open(coco_sample["panoptic_json"]))
    anns = {a["image_id"]: a for a in doc["annotations"]}
    rows = read_table(shards).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(anns)
    for row in rows:
        ann = anns[row["image_id"]]
        assert row["segments"] == [
            {"id": s["id"], "category_id": s["category_id"], "iscrowd": s["iscrowd"],
             "area": s["area"], "bbox": s["bbox"]} for s in ann["segments_info"]]
        assert row["image"] == open(os.path.join(coco_sample["images"], row["file_name"]), "rb").read()
        index, segments = decode_panoptic_row(row)
        ids = _direct_ids(os.path.join(coco_sample["panoptic_dir"], ann["file_name"]))
        lut = np.array([0] + [s["id"] for s in segments])
        assert np.array_equal(lut[index], ids)


def test_bad_records_are_rejected_and_reported(synth_copy, tmp_path):
    os.remove(os.path.join(synth_copy["panoptic_dir"], "synth_0007_000001.png"))
    doc = json.load(open(synth_copy["panoptic_json"]))
    doc["annotations"][4]["segments_info"][0]["category_id"] = 4321
    json.dump(doc, open(synth_copy["panoptic_json"], "w"))
    m = prepare(_source(synth_copy), str(tmp_path / "out"), rows_per_shard=2, progress=False)
    assert m["counts"]["images"] == 4 and m["counts"]["rejected"] == 2
    reasons = {r["image"]: r["reason"] for r in m["rejected"]}
    assert "is missing" in reasons["image 2 (synth_0007_000001.jpg)"]
    assert "unknown category_id 4321" in reasons["image 5 (synth_0007_000004.jpg)"]
    on_disk = json.load(open(tmp_path / "out" / MANIFEST))
    assert on_disk["rejected"] == m["rejected"]
    ids = sorted(read_table(str(tmp_path / "out")).column("image_id").to_pylist())
    assert ids == [1, 3, 4, 6]


def test_rerun_is_idempotent_and_resumes(synth_small, tmp_path):
    out = tmp_path / "out"
    first = prepare(_source(synth_small), str(out), rows_per_shard=2, progress=False)
    files = sorted(s["file"] for s in first["shards"])
    assert first["skipped_shards"] == 0 and len(files) == 3
    again = prepare(_source(synth_small), str(out), rows_per_shard=2, progress=False)
    assert again["skipped_shards"] == 3 and again["shards"] == first["shards"]

    # An interrupted run: one shard never landed, a temporary file and a shard of older input remain.
    os.remove(out / files[1])
    (out / f".{files[1]}.tmp-123-abcd").write_bytes(b"half a shard")
    (out / "part-00009-000000000000.parquet").write_bytes(b"stale")
    resumed = prepare(_source(synth_small), str(out), rows_per_shard=2, progress=False)
    assert resumed["skipped_shards"] == 2
    assert sorted(os.listdir(out)) == sorted(files + [MANIFEST])
    table = read_table(str(out))
    assert sorted(table.column("image_id").to_pylist()) == [1, 2, 3, 4, 5, 6]
    for f in files:  # every shard is whole and self-describing
        assert pq.read_metadata(out / f).num_rows == 2


def test_output_to_uri_and_reading_with_ray_data(synth_small, tmp_path):
    import ray.data

    uri = "file://" + str(tmp_path / "uri_out")
    m = prepare(_source(synth_small), uri, rows_per_shard=4, progress=False)
    assert read_manifest(uri)["counts"] == m["counts"]
    ds = ray.data.read_parquet(shard_paths(uri))
    assert sorted(r["image_id"] for r in ds.select_columns(["image_id"]).iter_rows()) == [1, 2, 3, 4, 5, 6]


def test_cli_prepare(synth_small, tmp_path, capsys):
    from workflows.cli import main

    out = str(tmp_path / "cli_out")
    assert main(["prepare", "--images", synth_small["images"], "--panoptic-json",
                 synth_small["panoptic_json"], "--panoptic-dir", synth_small["panoptic_dir"],
                 "--out", out, "--rows-per-shard", "3"]) == 0
    assert "6 images in 2 shards (0 already written), 0 rejected" in capsys.readouterr().out


def test_in_process_writes_what_the_ray_job_writes(synth_copy, tmp_path):
    """``in_process=True`` (a plain loop, for machines without Ray) gives the Ray Data job's
    shards, rows, rejects and manifest; it runs in a process where importing ray fails."""
    os.remove(os.path.join(synth_copy["panoptic_dir"], "synth_0007_000003.png"))
    by_ray = prepare(_source(synth_copy), str(tmp_path / "ray"), rows_per_shard=4, progress=False)
    code = ("import sys; sys.modules['ray'] = None\n"
            "from pipeline.data.prepare import prepare\nfrom pipeline.data.shards import Source\n"
            f"prepare(Source(**{json.dumps(_source(synth_copy).__dict__)}), "
            f"{str(tmp_path / 'local')!r}, rows_per_shard=4, progress=False, in_process=True)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[1])
    local = read_manifest(str(tmp_path / "local"))
    assert by_ray["counts"]["rejected"] == 1 and by_ray["counts"]["shards"] == 2
    assert ({k: v for k, v in local.items() if k != "created"}
            == {k: v for k, v in by_ray.items() if k not in ("created", "skipped_shards")})
    assert sorted(os.listdir(tmp_path / "local")) == sorted(os.listdir(tmp_path / "ray"))
    assert (read_table(str(tmp_path / "local")).to_pylist()
            == read_table(str(tmp_path / "ray")).to_pylist())


def test_parquet_tools_read_the_folder_as_one_row_per_image(synth_shards, tmp_path):
    """pandas, pyarrow.dataset (and Spark, which shares the rule) skip names starting with '_'
    or '.': the manifest and the temporaries of a write under way."""
    import shutil

    import pandas
    import pyarrow.dataset

    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    (out / ".part-00009-000000000000.parquet.tmp-123-abcd").write_bytes(b"half a shard")
    assert sorted(pandas.read_parquet(out, columns=["image_id"])["image_id"]) == [1, 2, 3, 4, 5, 6]
    table = pyarrow.dataset.dataset(str(out), format="parquet").to_table(columns=["image_id", "file_name"])
    assert sorted(table.column("image_id").to_pylist()) == [1, 2, 3, 4, 5, 6]
    assert table.to_pylist() == read_table(str(out)).select(["image_id", "file_name"]).to_pylist()
    assert sorted(storage.read_parquet(str(out), columns=["image_id"])["image_id"].to_pylist()) == [1, 2, 3, 4, 5, 6]


def test_folders_of_the_old_layout_are_read_and_a_rerun_renames_their_manifest(synth_small, synth_shards,
                                                                               tmp_path):
    import shutil

    import pandas

    out = tmp_path / "old"
    shutil.copytree(synth_shards, out)
    os.rename(out / MANIFEST, out / LEGACY_MANIFEST)              # as prepared before the rename
    assert read_manifest(str(out)) == read_manifest(synth_shards)
    assert read_table(str(out)).to_pylist() == read_table(synth_shards).to_pylist()
    again = prepare(_source(synth_small), str(out), rows_per_shard=4, progress=False, in_process=True)
    assert again["skipped_shards"] == again["counts"]["shards"] == 2
    assert sorted(os.listdir(out)) == sorted([s["file"] for s in again["shards"]] + [MANIFEST])
    assert len(pandas.read_parquet(out, columns=["image_id"])) == 6

    with pytest.raises(DatasetError, match=f"{tmp_path}: no {MANIFEST}; run `ciae prepare` first"):
        read_manifest(str(tmp_path))


def test_records_on_s3_are_read_concurrently_with_the_shards_of_a_serial_run(s3_server, synth_copy, tmp_path,
                                                                             monkeypatch):
    """A shard's files behind URIs are read several at a time (each read made to wait as for a
    distant store), giving the shards of one read at a time (``READ_THREADS`` = 1) byte for byte,
    rejects included (a missing PNG, a truncated image); local files are read one at a time."""
    import threading
    import time

    from s3_server import upload

    from pipeline.data import coco
    from pipeline.data import prepare as prepare_module

    os.remove(os.path.join(synth_copy["panoptic_dir"], "synth_0007_000001.png"))
    jpeg = Path(synth_copy["images"]) / "synth_0007_000003.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    root = upload(synth_copy["root"], f"s3://{s3_server['bucket']}/test_data_prepare_concurrent")
    source = Source(f"{root}/images", f"{root}/panoptic.json", f"{root}/panoptic")
    peak, active, lock = {}, {}, threading.Lock()
    read = coco.read_bytes

    def slow_read(fs, path):
        kind = fs.type_name
        with lock:
            active[kind] = active.get(kind, 0) + 1
            peak[kind] = max(peak.get(kind, 0), active[kind])
        try:
            time.sleep(0.05)
            return read(fs, path)
        finally:
            with lock:
                active[kind] -= 1

    def run(where: Source, out: str) -> dict:
        peak.clear()
        m = prepare(where, str(tmp_path / out), rows_per_shard=3, progress=False, in_process=True)
        return {"peak": dict(peak), "rejected": m["rejected"],
                "shards": {s["file"]: (tmp_path / out / s["file"]).read_bytes() for s in m["shards"]}}

    monkeypatch.setattr(coco, "read_bytes", slow_read)
    assert run(_source(synth_copy), "local")["peak"] == {"local": 1}
    concurrent = run(source, "concurrent")
    monkeypatch.setattr(prepare_module, "READ_THREADS", 1)
    serial = run(source, "serial")
    assert serial["peak"] == {"s3": 1} and concurrent["peak"]["s3"] > 1, concurrent["peak"]
    assert len(serial["shards"]) == 2 and len(serial["rejected"]) == 2
    assert {k: v for k, v in concurrent.items() if k != "peak"} == {k: v for k, v in serial.items() if k != "peak"}


def test_the_manifest_keeps_each_shards_portrait_rows(synth_copy, tmp_path):
    """Two of six images turned to portraits (image, PNG, sizes and boxes transposed): each
    shard's footer and manifest entry list the rows taller than wide, which training groups by
    (``pipeline.feed.stream.aspect_groups``); a re-run reads them back from the footers."""
    from pipeline.data.shards import decode_portraits, read_shard_summary

    doc = json.load(open(synth_copy["panoptic_json"]))
    turned = {doc["images"][k]["id"] for k in (1, 4)}
    flip = Image.Transpose.TRANSPOSE
    for im in doc["images"]:
        if im["id"] in turned:
            im["height"], im["width"] = im["width"], im["height"]
            path = Path(synth_copy["images"]) / im["file_name"]
            Image.open(path).transpose(flip).save(path, quality=95)
    for ann in doc["annotations"]:
        if ann["image_id"] in turned:
            path = Path(synth_copy["panoptic_dir"]) / ann["file_name"]
            Image.open(path).transpose(flip).save(path)
            for s in ann["segments_info"]:
                x, y, w, h = s["bbox"]
                s["bbox"] = [y, x, h, w]
    json.dump(doc, open(synth_copy["panoptic_json"], "w"))
    out = str(tmp_path / "out")
    m = prepare(_source(synth_copy), out, rows_per_shard=4, progress=False, in_process=True)
    assert m["counts"]["images"] == 6 and m["counts"]["rejected"] == 0
    want = [[r["height"] > r["width"] for r in pq.read_table(p, columns=["height", "width"]).to_pylist()]
            for p in shard_paths(out)]
    assert [decode_portraits(s["portrait"], s["rows"]).tolist() for s in m["shards"]] == want
    assert sum(map(sum, want)) == 2
    assert [read_shard_summary(p)["portrait"] for p in shard_paths(out)] == [s["portrait"] for s in m["shards"]]
    again = prepare(_source(synth_copy), out, rows_per_shard=4, progress=False, in_process=True)
    assert again["skipped_shards"] == 2 and again["shards"] == m["shards"]

    # training reads them: each step of 2 holds one orientation, 4 // 2 + 2 // 2 steps an epoch
    from ciae.config import Config
    from pipeline.feed.stream import local_batches

    cfg = Config.small().merged({"input": {"shorter_sides": (64,), "max_size": 96}, "solver": {"batch_size": 2}})
    steps = [b for _, (_, b) in zip(range(6), local_batches(out, cfg))]
    tall = [{h > w for h, w in b["image_sizes"]} for b in steps]
    assert all(len(t) == 1 for t in tall) and sum(t == {True} for t in tall) == 2
    assert sorted(i for b in steps[:3] for i in b["image_ids"]) == [1, 2, 3, 4, 5, 6]
