"""A flaky S3 (``s3_faults.FaultProxy`` in front of moto's server): with 5% of the requests
answered 503 SlowDown, 500 InternalError or a dropped connection, ``ciae prepare``, ``train`` and
``label`` on S3 go on through the retries chosen in ``pipeline.data.storage`` (pyarrow, botocore,
MLflow's boto3, Ray Train's storage). Each job meets a store that fails for good halfway, and
ends with one line naming the object and the error; run again once the store has recovered (5%
faults still) it resumes, and gives what a clean run gives, byte for byte, every output once.
Every request of a job thus meets the faults, in two runs (a whole run under faults besides
would cost a third).

Each command runs in a process of its own, as a user runs it, on the session's Ray. Its S3 is
the proxy: the driver's through ``AWS_ENDPOINT_URL``, its Ray workers' through the job's runtime
environment (``RAY_JOB_CONFIG_JSON_ENV_VAR``, what ``ray job submit --runtime-env-json`` sets),
while the workers of the session's own jobs keep moto's endpoint. The checks read moto directly.
A job meeting a store that keeps failing runs with ``AWS_MAX_ATTEMPTS=3`` (the knob a user has),
so that a request is given up in a second or two rather than half a minute; three attempts
still carry it through the 5% faults before the store fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from s3_faults import FAULTS, FaultProxy, wrote
from s3_server import upload
from test_s3 import listing, manifest_of, rows

from pipeline.data import storage
from pipeline.data.shards import MANIFEST

RATE = 0.05

pytestmark = pytest.mark.usefixtures("lean_ray_train")


@pytest.fixture(scope="module")
def proxy(s3_server):
    p = FaultProxy(s3_server["endpoint"]).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def data(synth_dataset) -> dict:
    """24 small synthetic images: enough requests for a few of each fault."""
    return synth_dataset(24, 21, 48, 64)


@pytest.fixture(scope="module")
def root(s3_server, data) -> str:
    """``data`` on S3 (uploaded to moto directly) under s3://bucket/test_s3_faults/synth."""
    root = f"s3://{s3_server['bucket']}/test_s3_faults"
    upload(data["root"], f"{root}/synth")
    return root


def ciae(proxy: FaultProxy, *args: str, attempts: int | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """``ciae ARGS`` on the session's Ray with the proxy as its S3 (``attempts``: its
    ``AWS_MAX_ATTEMPTS``): the finished process and its requests by outcome, with ``seconds``."""
    import ray

    s3 = {"AWS_ENDPOINT_URL": proxy.endpoint, **({"AWS_MAX_ATTEMPTS": str(attempts)} if attempts else {})}
    env = {**os.environ, **s3, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": s3}})}
    proxy.reset_counts()
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "workflows.cli", *args, "--address",
                           ray.get_runtime_context().gcs_address], env=env, capture_output=True, text=True,
                          timeout=600)
    counts = dict(proxy.reset_counts(), seconds=round(time.monotonic() - start, 1))
    store = f"{RATE:.0%} faults" + (", then a failing store" if proxy.before_failing is not None else "")
    print(f"\nciae {args[0]} ({store}): exit {done.returncode}, {counts}")
    return done, counts


def injected(counts: dict) -> int:
    return sum(counts.get(f, 0) for f in FAULTS)


# what any run of the command writes to stderr besides: its progress bar, and Ray's notice that
# the model actors' constructor takes an object reference (``ciae label``)
OTHER_OUTPUT = re.compile(r"\w+: +\d+%\||.*core_worker.cc.*has constructor arguments in the object store")


def assert_one_line(done: subprocess.CompletedProcess, command: str, uri: str) -> None:
    """The command ended with status 3 and one line on stderr (besides ``OTHER_OUTPUT``), naming
    an object under ``uri`` and S3's error: no traceback."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not OTHER_OUTPUT.match(ln)]
    assert done.returncode == 3 and len(lines) == 1, done.stderr[:3000]
    line = lines[0]
    print(line)
    assert line.startswith(f"ciae {command}: ") and uri.removeprefix("s3://") in line, line
    assert any(e in line for e in ("SLOW_DOWN", "SlowDown", "INTERNAL_FAILURE", "InternalError", "503", "500",
                                   "NETWORK_CONNECTION", "Connection")), line


def objects(uri: str) -> dict[str, bytes]:
    fs, base = storage.resolve(uri)
    return {n: storage.read_bytes(fs, f"{base}/{n}") for n in listing(uri)}


def nth(n: int, suffix: str, under: str = ""):
    """A ``fail_after`` true for the ``n``-th object written whose name ends with ``suffix``
    (and whose path holds ``under``)."""
    seen = []

    def written(method: str, path: str) -> bool:
        if under in path and wrote(method, path, suffix):
            seen.append(path)
        return len(seen) == n

    return written


def test_prepare_survives_faults_and_resumes_after_a_failing_store(proxy, root, data, make_shards, ray_local):
    """``ciae prepare`` S3 -> S3 under 5% faults, the store failing for good once half the
    shards are up: one line. Run again once it has recovered (5% faults still), it keeps the
    shards there and writes the rest: the shards of the clean (local) run byte for byte, the
    same manifest."""
    reference = make_shards(data, 2)
    expected = {n: open(os.path.join(reference, n), "rb").read()
                for n in os.listdir(reference) if n.endswith(".parquet")}
    src = f"{root}/synth"
    args = ["prepare", "--images", f"{src}/images", "--panoptic-json", f"{src}/panoptic.json",
            "--panoptic-dir", f"{src}/panoptic", "--rows-per-shard", "2", "--out", f"{root}/prepare"]

    done, counts = ciae(proxy.set(RATE, seed=1, fail_after=nth(len(expected) // 2, ".parquet")), *args, attempts=3)
    assert_one_line(done, "prepare", root)
    assert injected(proxy.before_failing) >= 1, proxy.before_failing
    before = objects(f"{root}/prepare")
    assert len(expected) // 2 <= len(before) < len(expected) and MANIFEST not in before, sorted(before)

    done, counts = ciae(proxy.set(RATE, seed=2), *args)
    assert done.returncode == 0, done.stderr[-5000:]
    assert injected(counts) >= 2, counts
    written = objects(f"{root}/prepare")
    assert {n: b for n, b in written.items() if n != MANIFEST} == expected
    assert all(written[n] == b for n, b in before.items())
    assert manifest_of(f"{root}/prepare") == manifest_of(reference)


def test_label_survives_faults_and_resumes_after_a_failing_store(proxy, root, data, registered_untrained, tmp_path,
                                                                 ray_local):
    """``ciae label`` S3 -> S3 (ground truth on S3 too) under 5% faults, the store failing for
    good once half the tasks have a part: one line. Run again once it has recovered (5% faults
    still), it labels the rest: the rows, PQ and COCO files of the clean (local) run, every
    image once, the shards sealed before as they were."""
    from workflows.jobs.label import label
    from workflows.jobs.specs import LabelJob

    model = registered_untrained["checkpoint"]
    local = str(tmp_path / "local")
    label(LabelJob(model=model, input=data["images"], out=local, gt_json=data["panoptic_json"],
                   gt_dir=data["panoptic_dir"], coco_panoptic=True, batch_size=4, task_images=4), progress=False)
    out = f"{root}/label"
    args = ["label", "--model", model, "--input", f"{root}/synth/images", "--gt-json", f"{root}/synth/panoptic.json",
            "--gt-dir", f"{root}/synth/panoptic", "--coco-panoptic", "--batch-size", "4", "--task-images", "4",
            "--out", out]

    done, counts = ciae(proxy.set(RATE, seed=3, fail_after=nth(3, ".parquet", under="/_parts/")), *args, attempts=3)
    assert_one_line(done, "label", root)
    assert injected(proxy.before_failing) >= 1, proxy.before_failing
    assert [n for n in listing(out) if n.startswith(("_parts/", "labels/"))], listing(out)
    sealed = {n: b for n, b in objects(out).items() if n.startswith("labels/")}

    done, counts = ciae(proxy.set(RATE, seed=4), *args)
    assert done.returncode == 0, done.stderr[-5000:]
    assert injected(counts) >= 2, counts
    expected = rows(local)
    assert rows(out) == expected
    names = listing(out)
    assert sorted(n for n in names if n.startswith("_coco/panoptic/")) == sorted(
        f"_coco/panoptic/{r['key']}.png" for r in expected)
    assert not [n for n in names if n.startswith("_parts/")]
    assert all(storage.read_uri(f"{out}/{n}") == b for n, b in sealed.items())
    for name in ("_coco/predictions.json", "_metrics.json"):
        assert json.loads(storage.read_uri(f"{out}/{name}")) == json.loads(open(f"{local}/{name}").read()), name


def test_train_survives_faults_and_resumes_after_a_failing_store(proxy, root, synth_small, make_shards, mlflow_db,
                                                                 tmp_path, ray_local):
    """``ciae train`` with its data on S3, checkpoints in Ray Train storage on S3 and MLflow's
    artifacts on S3, under 5% faults, the store failing for good once Ray Train has recorded
    the first checkpoint: one line. Run again with the same name once the store has recovered
    (5% faults still), it resumes from that checkpoint and finishes the one MLflow run with the
    weights and PQ of a clean run (``train_here``: the job's one worker in this process, its
    weights byte for byte), its artifacts and model on S3."""
    import io

    import mlflow
    import torch
    from test_train_distributed import tiny_config, train_here

    from workflows.jobs.specs import TrainJob

    shards = make_shards(synth_small, 3)
    upload(shards, f"{root}/train/shards")
    cfg = tiny_config(checkpoint_every=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: cfg.to_dict()[k] for k in ("solver", "input")}))
    clean, clean_pq = train_here(TrainJob(config=cfg, data=shards, val=shards, workers=1, batch_per_worker=2,
                                          iterations=4))
    args = ["train", "--config", str(config), "--data", f"{root}/train/shards", "--val", f"{root}/train/shards",
            "--storage", f"{root}/train/ray_results", "--artifact-root", f"{root}/train/mlflow",
            "--tracking-uri", mlflow_db, "--name", "flaky", "--experiment", "flaky", "--register", "ciae-flaky",
            "--workers", "1", "--batch-per-worker", "2", "--iterations", "4", "--pictures", "1", "--max-failures", "0"]

    recorded = nth(1, "checkpoint_manager_snapshot.json")     # Ray Train's record of its checkpoints
    done, counts = ciae(proxy.set(RATE, seed=5, fail_after=recorded), *args, attempts=3)
    assert_one_line(done, "train", root)
    assert injected(proxy.before_failing) >= 2, proxy.before_failing
    done, counts = ciae(proxy.set(RATE, seed=6), *args)
    assert done.returncode == 0, done.stderr[-5000:]
    assert injected(counts) >= 2, counts

    client = mlflow.MlflowClient(mlflow_db)
    runs = client.search_runs([client.get_experiment_by_name("flaky").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "resumed_at_step")] == [2.0]
    assert runs[0].data.metrics["val_pq"] == pytest.approx(clean_pq, abs=1e-6)
    assert client.get_run(run_id).info.artifact_uri.startswith(f"{root}/train/mlflow/flaky/")
    artifacts = listing(f"{root}/train/mlflow/flaky")
    assert any("/artifacts/pictures/" in n for n in artifacts) and any(n.endswith("MLmodel") for n in artifacts)
    checkpoint = next(n for n in artifacts if n.endswith("/artifacts/checkpoint/checkpoint.pt"))
    weights = torch.load(io.BytesIO(storage.read_uri(f"{root}/train/mlflow/flaky/{checkpoint}")),
                         weights_only=True)["model"]
    assert sorted(weights) == sorted(clean)
    for key, tensor in clean.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=0, msg=key)
    assert str(client.get_model_version_by_alias("ciae-flaky", "champion").version) == "1"


def test_proxy_fails_a_fixed_seeded_share_of_requests(proxy, s3_server):
    """The proxy itself: of every ``round(1 / rate)`` requests one faulty, the kinds in turn, at
    the same places for the same seed; a failing store fails every request."""
    import http.client

    def outcomes(n: int) -> list[str]:
        got = []
        for _ in range(n):         # a connection each: a drop ends one
            conn = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=30)
            try:
                conn.request("GET", f"/{s3_server['bucket']}/no-such-key")
                response = conn.getresponse()
                body = response.read().decode()
                code = "" if response.status == 404 else body.split("<Code>")[1].split("</Code>")[0]
                got.append(f"{response.status}{code}")
            except (ConnectionError, http.client.HTTPException):
                got.append("dropped")
            finally:
                conn.close()
        return got

    runs = []
    for seed in (1, 1, 2):
        proxy.set(0.25, seed=seed).reset_counts()
        runs.append(outcomes(16))
        counts = proxy.reset_counts()
        assert counts == {"ok": 12, **{f: 1 for f in FAULTS}}, counts
        assert sorted(runs[-1]) == sorted(["404"] * 12 + ["503SlowDown", "500InternalError", "dropped", "dropped"])
        assert all(runs[-1][k:k + 4].count("404") == 3 for k in range(0, 16, 4)), runs[-1]
    assert runs[0] == runs[1] != runs[2]
    proxy.set(1.0).reset_counts()
    assert "404" not in outcomes(8) and proxy.reset_counts() == {f: 2 for f in FAULTS}
    proxy.set(0.0)
