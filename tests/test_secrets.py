"""No secret recorded anywhere (issue 34): credentials in the tracking URI or the artifact root,
which MLflow keeps where anyone who reads the tracking server sees them, are refused with one
line; every other URI may carry ``KEY:SECRET@``, and after every command that takes one has run
with such URIs, no file the run wrote holds a secret, neither the URIs' nor the environment's:
the objects on S3, the local outputs, MLflow's database and artifacts, Ray Train's storage and
Ray's session folder (logs, job files), Label Studio's folder (``ciae review``: its database and
the uploaded images), and what the commands printed."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from s3_server import S3_ENV, upload

from pipeline.data import storage
from workflows.cli import main

KEY, SECRET = "AKIDsecretsTEST42", "uriSECRETplanted4242"     # planted in URIs (moto takes any key)
SECRETS = {"the URIs' key id": KEY, "the URIs' secret": SECRET,
           "AWS_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": S3_ENV["AWS_SECRET_ACCESS_KEY"]}


def creds(uri: str) -> str:
    return uri.replace("s3://", f"s3://{KEY}:{SECRET}@", 1)


def leaks(name: str, data: bytes) -> list[str]:
    """The secrets in a file's bytes (a Parquet file's compressed pages: in its rows as text)."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        file = pq.ParquetFile(pa.BufferReader(data))
        data += f"{file.read().to_pylist()} {file.schema_arrow.metadata}".encode()
    return [f"{what} in {name}" for what, s in SECRETS.items() if s.encode() in data]


def local_leaks(root: str) -> list[str]:
    found = []
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    found += leaks(path, fh.read())
    return found


def s3_leaks(uri: str) -> tuple[int, list[str]]:
    """(objects read, leaks) under ``uri``."""
    fs, base = storage.resolve(uri)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File]
    return len(infos), [x for i in infos for x in leaks(f"s3://{i.path}", storage.read_bytes(fs, i.path))]


@pytest.mark.parametrize("argv, what", [
    (["train", "--data", "x", "--artifact-root", creds("s3://b/mlflow")], "artifact root s3://***@b/mlflow"),
    (["train", "--data", "x", "--tracking-uri", f"http://{KEY}:{SECRET}@mlflow:5000"],
     "tracking URI http://***@mlflow:5000"),
    (["label", "--model", "m", "--input", "i", "--out", "o",
      "--tracking-uri", f"postgresql://{KEY}:{SECRET}@db/mlflow"], "tracking URI postgresql://***@db/mlflow"),
])
def test_credentials_in_tracking_and_artifact_uris_are_refused(argv, what, capsys, monkeypatch):
    """One line, exit status 2, the secret not shown, what to do instead; the same ValueError
    from the jobs and ``Tracking.resolve`` (also for ``$MLFLOW_TRACKING_URI``)."""
    from workflows.jobs.specs import LabelJob, TrainJob
    from workflows.tracking.location import Tracking

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ciae {argv[0]}: the {what}: ") and err.count("\n") == 1, err
    assert "AWS_ACCESS_KEY_ID" in err and KEY not in err and SECRET not in err, err
    for make in (lambda: TrainJob(data="x", artifact_root=creds("s3://b/m")),
                 lambda: TrainJob(data="x", tracking_uri=f"http://u:{SECRET}@h"),
                 lambda: LabelJob(model="m", input="i", out="o", tracking_uri=f"http://u:{SECRET}@h"),
                 lambda: Tracking.resolve("sqlite:///x.db", creds("s3://b/m")),
                 lambda: Tracking.resolve(f"https://u:{SECRET}@h")):
        with pytest.raises(ValueError, match="credentials") as e:
            make()
        assert SECRET not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://u:{SECRET}@h")
    with pytest.raises(ValueError, match=r"https://\*\*\*@h"):
        Tracking.resolve()


def test_plans_hold_uris_without_credentials(tmp_path):
    """A plan row's URI is written as ``***@`` and read back with the job's credentials for its
    place (unknown ones: none, the environment's); a list file's line with credentials of its
    own is refused."""
    from ciae.data.panoptic import DatasetError
    from pipeline.label.sources import credentials, make_plan, with_credentials

    job = credentials(creds("s3://b/images"), None, "s3://c/gt", "/local")
    assert job == {"s3://***@b": f"s3://{KEY}:{SECRET}@b"}
    assert with_credentials("s3://***@b/images/x.jpg", job) == creds("s3://b/images/x.jpg")
    assert with_credentials("s3://***@c/gt/x.png", job) == "s3://c/gt/x.png"
    assert with_credentials("/local/x.jpg", job) == "/local/x.jpg" and with_credentials(None, job) is None
    listed = tmp_path / "list.txt"
    listed.write_text(f"a.jpg\n{creds('s3://b/x.jpg')}\n")
    with pytest.raises(DatasetError, match=r"s3://\*\*\*@b/x.jpg: credentials") as e:
        make_plan(str(listed), str(tmp_path / "plan"))
    assert SECRET not in str(e.value) and KEY not in str(e.value)


def test_no_secret_recorded_anywhere(s3_server, synth_small, registered_untrained, mlflow_db, tmp_path, ray_local,
                                     label_studio, capsys, monkeypatch, lean_ray_train):
    """``prepare``, ``train`` (``--init``, ``--storage`` and MLflow artifacts on S3), ``label``
    (a list file with a missing image, and shards), ``export``, ``evaluate`` and ``review push``
    and ``pull``, every URI with ``KEY:SECRET@``: they work, and no secret is in anything written."""
    import ray

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)

    assert all(os.environ[k] == S3_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")     # the run state a dashboard shows
    root = upload(synth_small["root"], f"s3://{s3_server['bucket']}/test_secrets/synth")
    root = root.rpartition("/")[0]
    upload(os.path.dirname(registered_untrained["checkpoint"]), f"{root}/model")
    names = sorted(os.listdir(synth_small["images"]))
    fs, base = storage.resolve(root)
    storage.write_bytes_atomic(fs, f"{base}/list.txt",
                               "".join(f"synth/images/{n}\n" for n in [*names, "missing.jpg"]).encode())
    gt = ["--gt-json", creds(f"{root}/synth/panoptic.json"), "--gt-dir", creds(f"{root}/synth/panoptic")]
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"input": {"shorter_sides": [96], "test_shorter_side": 96, "flip_prob": 0.0},
                                  "solver": {"checkpoint_every": 1}}))
    labels, labels2 = creds(f"{root}/labels"), str(tmp_path / "labels2")

    runs = [
        ["prepare", "--images", creds(f"{root}/synth/images"), "--panoptic-json", gt[1], "--panoptic-dir", gt[3],
         "--out", creds(f"{root}/shards"), "--rows-per-shard", "3"],
        ["train", "--data", creds(f"{root}/shards"), "--config", str(config),
         "--workers", "1", "--batch-per-worker", "2", "--iterations", "1", "--max-failures", "0",
         "--storage", creds(f"{root}/ray_results"), "--name", "secrets", "--tracking-uri", mlflow_db,
         "--artifact-root", f"{root}/mlflow", "--init", creds(f"{root}/model/model.pt"), "--register", "ciae-secrets"],
        ["label", "--model", creds(f"{root}/model/model.pt"), "--input", creds(f"{root}/list.txt"), "--out", labels,
         *gt, "--coco-panoptic", "--overlays", "1", "--batch-size", "3", "--task-images", "4"],
        ["label", "--model", "models:/ciae-secrets@champion", "--tracking-uri", mlflow_db,
         "--input", creds(f"{root}/shards"), "--out", labels2, "--overlays", "1", "--batch-size", "3"],
        ["export", "--labels", labels, "--coco-panoptic", "--coco-instances", "--review", "3"],
        ["evaluate", *gt, "--pred-json", f"{labels}/_coco/predictions.json", "--pred-dir", f"{labels}/_coco/panoptic",
         "--output", f"{labels}/_eval/pq.json", "--workers", "1"],
        ["review", "push", "--labels", labels, "--url", label_studio.url, "--project", "secrets", "--n", "2",
         "--no-progress"],
        ["review", "pull", "--labels", labels, "--url", label_studio.url, "--project", "secrets",
         "--out", creds(f"{root}/reviewed"), "--from", "predictions", "--no-progress"],
    ]
    printed = []
    for argv in runs:
        code = main(argv)
        out = capsys.readouterr()
        printed += leaks(f"the output of ciae {argv[0]}", (out.out + out.err).encode())
        assert code == 0, out.err[-3000:]

    summary = json.loads(storage.read_uri(f"{labels}/_rejects.json"))
    assert [r["file"] for r in summary["rejected"]] == ["synth/images/missing.jpg"]   # its reason may name its URI
    assert json.loads(storage.read_uri(f"{labels}/_eval/pq.json"))["All"]["n"] > 0
    assert len(json.loads(storage.read_uri(f"{root}/reviewed/panoptic.json"))["annotations"]) == 2
    objects, found = s3_leaks(root)
    assert objects > 40 and [n for n in storage.list_folder(fs, f"{base}/ray_results/secrets")]
    found += printed + local_leaks(str(tmp_path))
    found += local_leaks(ray._private.worker._global_node.get_session_dir_path())
    found += local_leaks(str(label_studio.root))
    # Ray Train's run state (its export API writes it to files)
    from ray.train.v2._internal.state.state_actor import get_state_actor

    state = get_state_actor()
    found += leaks("Ray Train's run state", " ".join(
        run.model_dump_json() for run in ray.get(state.get_train_runs.remote()).values()).encode())
    assert not found, "\n".join(found)
