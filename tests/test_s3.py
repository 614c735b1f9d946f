"""Every path on S3 (moto's server, ``s3_server``; credentials and endpoint from the environment
as a user gives them): ``prepare`` and ``label`` give what they give on local folders, a
killed run resumed there loses and duplicates nothing (S3 has no atomic rename: a write is one
upload under its final name), a write that fails uploads nothing, and no credential shows in an
error message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
from s3_server import upload

from pipeline.data import storage
from pipeline.data.prepare import prepare
from pipeline.data.shards import MANIFEST, Source, read_manifest, read_table
from pipeline.data.synth import SynthSpec, write_dataset
from pipeline.label import store as ls
from workflows.jobs.label import label
from workflows.jobs.specs import LabelJob


@pytest.fixture(scope="module")
def s3(s3_server, synth_small) -> dict:
    """``synth_small`` uploaded once: {"root" (s3://bucket/test_s3), "images", "panoptic_json",
    "panoptic_dir"} as URIs."""
    root = f"s3://{s3_server['bucket']}/test_s3"
    upload(synth_small["root"], f"{root}/synth")
    return {"root": root, "images": f"{root}/synth/images", "panoptic_json": f"{root}/synth/panoptic.json",
            "panoptic_dir": f"{root}/synth/panoptic"}


def listing(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it."""
    fs, path = storage.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def kill_once_written(cmd: list[str], out: str, wanted) -> list[str]:
    """Run the driver ``cmd``, SIGKILL it once an object under ``out`` is ``wanted(name)``, and
    return the listing of ``out`` once the killed job's last tasks have stopped writing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not [n for n in listing(out) if wanted(n)]:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "nothing was written in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    names = None
    while names != (names := listing(out)):
        time.sleep(1)
    return names


def test_object_store_writes_are_one_upload_and_a_failed_write_uploads_nothing(s3):
    """No temporary name, no move: the object appears whole under its name; an exception in the
    writer (pyarrow's S3 stream would commit what it had on close) leaves nothing."""
    fs, base = storage.resolve(f"{s3['root']}/writes")
    assert storage.is_object_store(fs) and not storage.is_object_store(pafs.LocalFileSystem())
    storage.write_bytes_atomic(fs, f"{base}/a.bin", b"a" * 10)
    with storage.open_atomic(fs, f"{base}/b.bin") as f:
        f.write(b"b" * 100)
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.open_atomic(fs, f"{base}/c.bin") as f:
            f.write(b"half a file")
            raise RuntimeError("writer died")
    assert listing(f"{s3['root']}/writes") == ["a.bin", "b.bin"]
    assert storage.read_bytes(fs, f"{base}/b.bin") == b"b" * 100


def test_one_filesystem_per_bucket_and_environment(s3_server, monkeypatch):
    """``storage.resolve`` makes a bucket's filesystem once (making one asks the server for the
    bucket's region): the same object for every file of a bucket, paths as pyarrow gives them, a
    new one when the credentials in the environment change."""
    bucket = s3_server["bucket"]
    fs, path = storage.resolve(f"s3://{bucket}/a%20b/c.jpg")
    assert path == f"{bucket}/a b/c.jpg" == pafs.FileSystem.from_uri(f"s3://{bucket}/a%20b/c.jpg")[1]
    assert storage.resolve(f"s3://{bucket}/other/")[0] is fs and storage.resolve(f"s3://{bucket}/other/")[1] == f"{bucket}/other"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert storage.resolve(f"s3://{bucket}/x")[0] is not fs


def manifest_of(uri: str) -> dict:
    m = read_manifest(uri)
    return {k: v for k, v in m.items() if k not in ("created", "source")}


def test_prepare_on_s3_equals_local_and_resumes_without_duplicates(s3, synth_small, make_shards, ray_local):
    """COCO images, JSON and PNGs on S3 -> shards on S3 (in this process): the same shards and
    rows as from the local folder. A killed run (a shard and the manifest lost, a torn write
    left) resumed as a Ray Data job converts only the missing shard."""
    import pandas
    import pyarrow.dataset as pads

    local = make_shards(synth_small, 2)
    source = Source(s3["images"], s3["panoptic_json"], s3["panoptic_dir"])
    out = f"{s3['root']}/shards"
    m = prepare(source, out, rows_per_shard=2, progress=False, in_process=True)
    assert m["counts"]["images"] == 6 and m["counts"]["shards"] == 3 and m["skipped_shards"] == 0
    shards = sorted(s["file"] for s in m["shards"])
    assert listing(out) == sorted([MANIFEST, *shards])            # no temporaries, ever
    assert shards == sorted(n for n in os.listdir(local) if n.endswith(".parquet"))
    assert read_table(out).equals(read_table(local))
    assert manifest_of(out) == manifest_of(local)
    assert read_manifest(out)["source"]["images"] == s3["images"]

    fs, base = storage.resolve(out)
    fs.delete_file(f"{base}/{shards[1]}")
    fs.delete_file(f"{base}/{MANIFEST}")
    storage.write_bytes_atomic(fs, f"{base}/.{shards[1]}{storage.TMP_MARK}99-dead", b"PAR1 half")
    m = prepare(source, out, rows_per_shard=2, progress=False)                    # through Ray
    assert m["skipped_shards"] == 2 and m["counts"]["images"] == 6
    assert listing(out) == sorted([MANIFEST, *shards])
    assert read_table(out).equals(read_table(local))

    ids = sorted(pads.dataset(out, format="parquet").to_table(columns=["image_id"])["image_id"].to_pylist())
    assert ids == sorted(read_table(local)["image_id"].to_pylist()) and len(ids) == 6
    frame = pandas.read_parquet(base, filesystem=fs, columns=["image_id"])
    assert sorted(frame["image_id"]) == ids


def test_killed_prepare_resumes_on_s3_and_writes_every_shard_once(s3_server, tmp_path, ray_local):
    """``ciae prepare`` from S3 to S3 SIGKILLed once a shard is there, then run again: the
    shards written before the kill are kept as they are, the rest written once; the same shards
    and rows as the uninterrupted run on the local folder, and nothing else under ``--out``."""
    import ray

    src = tmp_path / "src"
    write_dataset(str(src), 32, seed=14, spec=SynthSpec(height=64, width=64))
    paths = [str(src / "images"), str(src / "panoptic.json"), str(src / "panoptic")]
    reference = str(tmp_path / "reference")
    prepare(Source(*paths), reference, rows_per_shard=2, progress=False, in_process=True)
    root = upload(str(src), f"s3://{s3_server['bucket']}/test_s3_prepare_kill")
    source = [f"{root}/images", f"{root}/panoptic.json", f"{root}/panoptic"]
    out = f"{root}/shards"
    cmd = [sys.executable, "-m", "workflows.cli", "prepare", "--images", source[0], "--panoptic-json", source[1],
           "--panoptic-dir", source[2], "--out", out, "--rows-per-shard", "2",
           "--address", ray.get_runtime_context().gcs_address]
    names = kill_once_written(cmd, out, lambda n: n.endswith(".parquet"))
    fs, base = storage.resolve(out)
    before = {n: storage.read_bytes(fs, f"{base}/{n}") for n in names if n.endswith(".parquet")}
    assert 1 <= len(before) < 16 and MANIFEST not in listing(out), sorted(before)     # killed mid-job

    m = prepare(Source(*source), out, rows_per_shard=2, progress=False)
    assert m["counts"]["images"] == 32 and m["skipped_shards"] == len(before)
    expected = sorted(n for n in os.listdir(reference) if n.endswith(".parquet"))
    assert listing(out) == sorted([MANIFEST, *expected])              # no temporaries, no duplicates
    assert read_table(out).equals(read_table(reference))
    assert all(storage.read_bytes(fs, f"{base}/{n}") == data for n, data in before.items())


@pytest.fixture(scope="module")
def model(registered_untrained) -> dict:
    return registered_untrained


def rows(out: str) -> list[dict]:
    return list(ls.LabelStore(out).rows(["index", "key", "image_id", "status", "png", "segments", "quality", "pq"]))


def test_label_on_s3_equals_local(model, s3, synth_small, tmp_path, ray_local):
    """--input a prefix of images on S3, ground truth on S3, --out on S3: the same rows, PQ and
    COCO files as the same job on local folders; pandas and pyarrow read the S3 output as one
    row per image; ``ciae export`` and ``ciae evaluate`` of it write the same files on S3."""
    import pandas
    import pyarrow.dataset as pads

    kw = dict(model=model["checkpoint"], batch_size=3, task_images=4, coco_panoptic=True)
    out = f"{s3['root']}/labels"
    on_s3 = label(LabelJob(input=s3["images"], out=out, gt_json=s3["panoptic_json"], gt_dir=s3["panoptic_dir"],
                           **kw), progress=False)
    local = label(LabelJob(input=synth_small["images"], out=str(tmp_path / "out"), gt_json=synth_small["panoptic_json"],
                           gt_dir=synth_small["panoptic_dir"], **kw), progress=False)
    assert (on_s3["labeled"], on_s3["rejected"]) == (local["labeled"], local["rejected"]) == (6, 0)
    assert on_s3["metrics"] == local["metrics"]
    assert rows(out) == rows(str(tmp_path / "out"))
    objects = listing(out)
    assert not [n for n in objects if storage.TMP_MARK in n or n.startswith("_parts/")]
    assert sorted(n for n in objects if n.startswith("labels/")) == ["labels/task-000000.parquet",
                                                                     "labels/task-000001.parquet"]
    predictions = json.loads(storage.read_uri(f"{out}/_coco/predictions.json"))
    assert predictions == json.loads((tmp_path / "out" / "_coco" / "predictions.json").read_bytes())
    keys = sorted(r["key"] for r in rows(out))
    assert sorted(pads.dataset(out, format="parquet").to_table(columns=["key"])["key"].to_pylist()) == keys
    fs, base = storage.resolve(out)
    assert sorted(pandas.read_parquet(base, filesystem=fs, columns=["key"])["key"]) == keys
    assert sorted(storage.read_parquet(out, columns=["key"])["key"].to_pylist()) == keys

    # `ciae export` and `ciae evaluate` on S3 write what they write on the local folders
    from workflows.cli import main

    written = {}
    for o, gt in ((out, s3), (str(tmp_path / "out"), synth_small)):
        assert main(["export", "--labels", o, "--coco-panoptic", "--coco-instances", "--review", "4"]) == 0
        assert main(["evaluate", "--gt-json", gt["panoptic_json"], "--gt-dir", gt["panoptic_dir"],
                     "--pred-json", f"{o}/_coco/predictions.json", "--pred-dir", f"{o}/_coco/panoptic",
                     "--output", f"{o}/_eval/pq.json", "--workers", "1"]) == 0
        written[o] = {n: storage.read_uri(f"{o}/{n}") for n in ("_coco/instances.json", "_review.csv", "_eval/pq.json")}
    assert written[out] == written[str(tmp_path / "out")]
    assert json.loads(written[out]["_eval/pq.json"])["All"]["pq"] == pytest.approx(on_s3["metrics"]["All"]["pq"])


def test_killed_driver_resumes_on_s3_and_labels_every_image_exactly_once(model, s3_server, tmp_path, ray_local):
    """The driver SIGKILLed once a part or shard is on S3, then run again: every image once, in
    one shard row and one PNG; shards sealed before the kill untouched."""
    import ray

    src = tmp_path / "src"
    write_dataset(str(src), 24, seed=13, spec=SynthSpec(height=48, width=64))
    root = f"s3://{s3_server['bucket']}/test_s3_kill"
    images = upload(str(src / "images"), f"{root}/images")
    out = f"{root}/out"
    cmd = [sys.executable, "-m", "workflows.cli", "label", "--model", model["checkpoint"], "--input", images,
           "--out", out, "--batch-size", "1", "--task-images", "4", "--coco-panoptic",
           "--address", ray.get_runtime_context().gcs_address]
    names = kill_once_written(cmd, out, lambda n: n.endswith(".parquet") and n.startswith(("_parts/", "labels/")))
    fs, base = storage.resolve(out)
    sealed_before = {n: storage.read_bytes(fs, f"{base}/{n}") for n in names if n.startswith("labels/")}

    s = label(LabelJob(model=model["checkpoint"], input=images, out=out, batch_size=4, coco_panoptic=True),
              progress=False)
    assert (s["labeled"], s["rejected"]) == (24, 0) and 0 < s["skipped"] < 24
    assert s["skipped"] + s["processed"] == 24
    keys = [f"synth_0013_{i:06d}" for i in range(24)]
    labeled = rows(out)
    assert sorted(r["key"] for r in labeled) == keys and [r["index"] for r in labeled] == list(range(24))
    objects = listing(out)
    assert not [n for n in objects if storage.TMP_MARK in n or n.startswith("_parts/")]
    assert sorted(n for n in objects if n.startswith("_coco/panoptic/")) == [f"_coco/panoptic/{k}.png" for k in keys]
    pngs = {r["key"]: r["png"] for r in labeled}
    assert all(storage.read_bytes(fs, f"{base}/_coco/panoptic/{k}.png") == pngs[k] for k in keys)
    for n, data in sealed_before.items():
        assert storage.read_bytes(fs, f"{base}/{n}") == data
    again = label(LabelJob(model=model["checkpoint"], input=images, out=out), progress=False)
    assert again["processed"] == 0 and again["labeled"] == 24


def test_no_credential_in_error_messages(model, s3_server, tmp_path, monkeypatch, capsys):
    """A secret key planted in the environment or given in a URI never appears in what the CLI
    prints for a bad S3 path, nor in ``storage.resolve``'s errors."""
    from workflows.cli import main

    secret = "PLANTEDsecret/0123456789abcdefXYZ"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(ValueError) as e:
        storage.resolve(f"nosuchscheme://AKIDPLANTED:{secret}@bucket/x")
    assert secret not in str(e.value) and "AKIDPLANTED" not in str(e.value) and "bucket/x" in str(e.value)
    assert storage.redact(f"s3://AKIDPLANTED:{secret}@b/k and {secret}") == "s3://***@b/k and ***"

    bad = [["prepare", "--images", f"s3://AKIDPLANTED:{secret}@no-such-bucket/images",
            "--panoptic-json", f"s3://AKIDPLANTED:{secret}@no-such-bucket/p.json",
            "--panoptic-dir", "s3://no-such-bucket/p", "--out", str(tmp_path / "shards")],
           ["label", "--model", model["checkpoint"], "--input", "s3://no-such-bucket/images",
            "--out", str(tmp_path / "o")],
           ["label", "--model", model["checkpoint"], "--input", f"s3://AKIDPLANTED:{secret}@nobucket/x",
            "--out", f"s3://AKIDPLANTED:{secret}@{s3_server['bucket']}/o"]]
    for args in bad:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ciae {args[0]}: ") and secret not in err and "AKIDPLANTED" not in err, err


def test_credentials_in_uris_are_not_recorded(model, s3, tmp_path, ray_local):
    """URIs given with ``KEY:SECRET@`` work, and what the jobs record (the manifest's source,
    the plan's input) holds them as ``***@``; a re-run with the same URI is the same job."""
    secret = "PLANTEDsecret0123456789"

    def creds(uri: str) -> str:
        return uri.replace("s3://", f"s3://AKIDPLANTED:{secret}@", 1)

    assert storage.public_uri(creds("s3://b/k")) == "s3://***@b/k" and storage.public_uri(None) is None
    out = f"{s3['root']}/shards-creds"
    prepare(Source(creds(s3["images"]), creds(s3["panoptic_json"]), creds(s3["panoptic_dir"])), creds(out),
            rows_per_shard=4, progress=False, in_process=True)
    fs, base = storage.resolve(out)
    text = storage.read_bytes(fs, f"{base}/{MANIFEST}").decode()
    assert secret not in text and "AKIDPLANTED" not in text
    assert read_manifest(out)["source"]["images"] == s3["images"].replace("s3://", "s3://***@", 1)

    job = LabelJob(model=model["checkpoint"], input=creds(s3["images"]), out=str(tmp_path / "labels"))
    first = label(job, progress=False)
    plan_text = (tmp_path / "labels" / "_plan" / "plan.json").read_text()
    assert secret not in plan_text and "AKIDPLANTED" not in plan_text
    again = label(job, progress=False)
    assert first["labeled"] == again["labeled"] == 6 and again["processed"] == 0


def test_train_on_s3_resumes_from_its_checkpoint_there_and_equals_local(s3_server, two_worker_run, mlflow_db,
                                                                        tmp_path, lean_ray_train):
    """``--data``, ``--val`` and ``--storage`` on S3 and MLflow's artifacts on S3 (``--artifact-root``):
    a worker killed once the first checkpoint is up resumes from the latest one, read back from
    S3, into the one MLflow run, which ends with its metrics, artifacts and a registered model
    version holding the alias; it gives the weights and validation PQ of the same job on local
    folders (``two_worker_run``: file:// URIs, not killed), which ends with the same record; the
    S3 run's artifacts and model are on S3 only, and the model loads from there. (A killed run
    resumed from local folders: test_finetune.py.)"""
    import dataclasses

    import mlflow
    import torch
    from ray_callbacks import KillRankOneAfterFirstCheckpoint

    from workflows.jobs.train import train
    from workflows.tracking.location import Tracking

    local = two_worker_run
    root = f"s3://{s3_server['bucket']}/test_s3_train"
    upload(local["shards"], f"{root}/shards")
    job = dataclasses.replace(local["job"], data=f"{root}/shards", val=f"{root}/shards",
                              storage=f"{root}/ray_results", artifact_root=f"{root}/mlflow", name="on-s3",
                              experiment="s3", register="ciae-s3", tracking_uri=mlflow_db)
    runs = {"s3": train(job, callbacks=(KillRankOneAfterFirstCheckpoint(),), progress=False),
            "local": local["summary"]}
    registered = {"s3": job.register, "local": local["job"].register}
    for k, s in runs.items():
        client = mlflow.MlflowClient(s["tracking_uri"])
        assert s["step"] == 6
        found = client.search_runs([client.get_experiment_by_name(k).experiment_id])
        assert len(found) == 1 and found[0].info.run_id == s["run_id"] and found[0].info.status == "FINISHED"
        # on S3 the checkpoint of step 2 or, when its upload (off the training thread) was
        # registered after the next one had been made, of step 4: either way resumed once, from
        # a checkpoint; the local run was not killed
        resumed = [m.value for m in client.get_metric_history(s["run_id"], "resumed_at_step")]
        assert resumed in (([2.0], [4.0]) if k == "s3" else ([],)), (k, resumed)
        assert {m.step for m in client.get_metric_history(s["run_id"], "loss")} == set(range(1, 7))
        for key in ("loss_cae", "loss_iae", "loss_cls", "lr", "images_per_s"):
            assert client.get_metric_history(s["run_id"], key), key
        run = client.get_run(s["run_id"])
        assert run.data.params["solver.iterations"] == "6" and "val_pq" in run.data.metrics
        assert {"config.json", "checkpoint", "pictures", "val_pq.json"} <= {a.path for a in client.list_artifacts(s["run_id"])}
        assert s["model_version"] == "1" and s["alias_moved"]
        champion = client.get_model_version_by_alias(registered[k], "champion")
        assert str(champion.version) == "1"
        assert float(champion.tags["val_pq"]) == pytest.approx(run.data.metrics["val_pq"], abs=1e-6)
    weights = {k: torch.load(s["checkpoint"], weights_only=True)["model"] for k, s in runs.items()}
    for name, tensor in weights["local"].items():
        torch.testing.assert_close(weights["s3"][name], tensor, rtol=0, atol=0, msg=name)
    assert runs["s3"]["pq"] == runs["local"]["pq"]

    client = mlflow.MlflowClient(mlflow_db)
    assert client.get_run(runs["s3"]["run_id"]).info.artifact_uri.startswith(f"{root}/mlflow/s3/")
    artifacts = listing(f"{root}/mlflow/s3")
    assert any(n.endswith("/artifacts/checkpoint/checkpoint.pt") for n in artifacts), artifacts
    assert any("/artifacts/pictures/" in n for n in artifacts) and any(n.endswith("MLmodel") for n in artifacts)
    assert not (tmp_path / "artifacts" / "s3").exists()                  # nothing of it on the local disk
    assert [n for n in listing(f"{root}/ray_results/on-s3") if n.endswith("checkpoint.pt")]
    model = Tracking.resolve(mlflow_db).download("models:/ciae-s3/1", dst=str(tmp_path / "model"))
    assert os.path.exists(os.path.join(model, "MLmodel"))
