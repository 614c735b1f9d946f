"""Requests that follow the work on S3 (moto's server, ``s3_server``; its requests counted from its
log, ``s3_server.Requests``): ``pipeline.data.storage``, and ``ciae label`` and ``ciae prepare`` from
S3 to S3, read each input with one GET and no HEAD before it, write each object with one PUT (no
multipart upload for a small one) and write no folder-marker objects (keys ending in ``/``)."""

from __future__ import annotations

import os
from collections import Counter
from urllib.parse import urlsplit

import pytest
from s3_server import create_bucket, upload

from pipeline.data import storage
from pipeline.data.prepare import prepare
from pipeline.data.shards import Source
from workflows.jobs.label import label
from workflows.jobs.specs import LabelJob

BUCKET = "ciae-test-requests"     # a bucket of its own: moto scans a whole bucket per LIST


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    create_bucket(BUCKET)
    return BUCKET


def requests_of(s3_server, run) -> list[tuple[str, str]]:
    """(kind, path) of each request the server answered while ``run()`` ran."""
    start = s3_server["requests"].mark()
    run()
    return [(kind, urlsplit(target).path) for kind, target in s3_server["requests"].targets(start)]


def keys(prefix: str) -> list[str]:
    """Every key under ``s3://BUCKET/prefix/`` as the server holds it (folder markers included)."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def check_writes(requests: list[tuple[str, str]], prefix: str) -> None:
    """Each object written with one PUT, none of them a folder marker."""
    multipart = [(k, p) for k, p in requests if k == "POST"]        # a multipart upload's start and end
    assert not multipart, multipart
    puts = Counter(p for k, p in requests if k == "PUT")
    assert puts and max(puts.values()) == 1, puts
    assert not [p for p in puts if p.endswith("/")] and not [k for k in keys(prefix) if k.endswith("/")]


def check_reads(requests: list[tuple[str, str]], inputs: list[str]) -> None:
    """Each input read with one GET, and no HEAD asked of it."""
    gets = Counter(p for k, p in requests if k == "GET")
    assert {p: gets[p] for p in inputs} == dict.fromkeys(inputs, 1)
    assert not {p for k, p in requests if k == "HEAD"} & set(inputs)


def test_storage_on_s3_makes_one_request_per_file(s3_server, bucket):
    """A read is one GET (a missing file FileNotFoundError after it; a Parquet file read whole),
    a write one PUT; no marker object is written for a folder created, nor left by deletes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = storage.resolve(f"s3://{bucket}/storage")

    def run():
        storage.create_folder(fs, f"{base}/a/b")
        storage.write_uri(f"s3://{bucket}/storage/a/b/x.bin", b"x")
        with storage.open_atomic(fs, f"{base}/a/t.parquet") as f:
            pq.write_table(pa.table({"v": [1, 2]}), f)
        assert storage.read_uri(f"s3://{bucket}/storage/a/b/x.bin") == b"x"
        assert storage.read_parquet(f"s3://{bucket}/storage/a/t.parquet")["v"].to_pylist() == [1, 2]
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(fs, f"{base}/a/missing")
        storage.delete_folder(fs, f"{base}/a/b")
        storage.delete_file(fs, f"{base}/a/t.parquet")

    requests = requests_of(s3_server, run)
    assert [k for k, _ in requests] == ["PUT", "PUT", "GET", "GET", "GET", "LIST", "DELETE", "DELETE"], requests
    assert keys("storage") == []


def test_label_s3_to_s3_reads_each_image_once_and_writes_each_object_once(s3_server, bucket, synth_small,
                                                                          registered_untrained, tmp_path, ray_local):
    n = 16
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted(os.listdir(synth_small["images"]))
    for k in range(n):
        os.link(os.path.join(synth_small["images"], sources[k % len(sources)]), folder / f"{k:08d}.jpg")
    images = upload(str(folder), f"s3://{bucket}/label/images")
    out = f"s3://{bucket}/label/out"
    job = LabelJob(model=registered_untrained["checkpoint"], input=images, out=out, batch_size=4, task_images=8,
                   coco_panoptic=True, coco_instances=True)
    summary = {}
    requests = requests_of(s3_server, lambda: summary.update(label(job, progress=False)))
    assert (summary["labeled"], summary["rejected"]) == (n, 0)
    check_reads(requests, [f"/{bucket}/label/images/{k:08d}.jpg" for k in range(n)])
    check_writes(requests, "label/out")
    png = f"/{bucket}/label/out/_coco/panoptic/"
    assert sorted(p for k, p in requests if k == "PUT" and p.startswith(png)) == [f"{png}{k:08d}.png" for k in range(n)]
    assert not [p for k, p in requests if k == "HEAD" and p.startswith(png)]
    predictions = storage.read_uri(f"{out}/_coco/predictions.json")

    # a re-run reads no shard (the COCO exports are recorded with the shards they were made from)
    # and writes no PNG; an export cut short after the first task
    # (its records gone but the first task's) writes the second task's PNGs only
    again = requests_of(s3_server, lambda: label(job, progress=False))
    assert not [p for k, p in again if k == "GET" and "/label/out/labels/" in p], again
    assert not [p for k, p in again if k in ("PUT", "HEAD") and p.startswith(png)], again
    for record in ("coco-panoptic", "task-000001.pngs"):
        storage.write_uri(f"{out}/_summaries/{record}.json", b"{}")      # not made from these shards
    cut = requests_of(s3_server, lambda: label(job, progress=False))
    assert sorted(p for k, p in cut if k == "PUT" and p.startswith(png)) == [f"{png}{k:08d}.png" for k in range(8, n)]
    assert storage.read_uri(f"{out}/_coco/predictions.json") == predictions


def test_prepare_s3_to_s3_reads_each_image_and_png_once_and_writes_each_shard_once(s3_server, bucket,
                                                                                   synth_small):
    root = upload(synth_small["root"], f"s3://{bucket}/prepare/src")
    source = Source(f"{root}/images", f"{root}/panoptic.json", f"{root}/panoptic")
    manifest = {}
    requests = requests_of(s3_server, lambda: manifest.update(
        prepare(source, f"s3://{bucket}/prepare/out", rows_per_shard=4, progress=False, in_process=True)))
    assert manifest["counts"]["images"] == 6 and manifest["counts"]["shards"] == 2
    names = sorted(os.listdir(synth_small["images"]))
    pngs = sorted(os.listdir(synth_small["panoptic_dir"]))
    check_reads(requests, [f"/{bucket}/prepare/src/panoptic.json"]
                + [f"/{bucket}/prepare/src/images/{name}" for name in names]
                + [f"/{bucket}/prepare/src/panoptic/{name}" for name in pngs])
    check_writes(requests, "prepare/out")
