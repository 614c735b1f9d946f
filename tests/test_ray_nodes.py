"""Two Ray nodes on one machine (issue 26 item 4): a head and a second node started with
``ray start`` (each its own ports, temp dir and CPUs; the second with a custom resource
``second``), drivers that steer their Ray Data work onto the second node (``ray_nodes.py``: a
soft node affinity), and the second node lost mid-job (SIGKILL to its raylet, workers and other
processes, by the pids its ``ray start`` session holds). It never comes back: the jobs finish on
the head, every image exactly once; or, where the model actors restarted on the head hold every
CPU (the tasks that feed them starve), fail with one line and finish when run again. Training
with a worker on the lost node resumes from its last checkpoint on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest
from ray_nodes import FAST_FAILURE_DETECTION, REPO, RayNode, driver_cmd
from test_label import _written, check_outputs

from pipeline.data.synth import SynthSpec, write_dataset


@pytest.fixture(scope="module")
def head(s3_env):
    """The head: 2 CPUs, a 200 MiB object store, lost nodes noticed in ~2 s; its processes (and
    the second node's) see the S3 server's environment, as a cluster's nodes see S3's."""
    node = RayNode.start(num_cpus=2, env=FAST_FAILURE_DETECTION)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def second(head):
    """A second node joining ``head`` (2 CPUs, resource ``second``), one per test: a test loses it."""
    node = RayNode.start(head.gcs_address, num_cpus=2, resources={"second": 1})
    try:
        assert node.info()["resources"]["second"] == 1
        yield node
    finally:
        node.stop()


def run_and_lose(second, cmd: list[str], ready, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Start the driver ``cmd``; once ``ready()`` holds, lose ``second``; returns the finished
    driver (its output) and what was killed (``RayNode.kill``'s pids; "ready": ``ready()`` just
    before; "noticed_s", "finished_s": when the head saw the node dead, when the job ended,
    after the kill). Fails if the driver ends before the loss or runs
    past ``timeout`` (a hang)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:   # no pipe to fill
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, text=True)

        def output(f) -> str:
            f.seek(0)
            return f.read()

        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, output(err)[-3000:]
                assert time.monotonic() < deadline, "the job never got going"
                time.sleep(0.02)
            started, seen = time.monotonic(), ready()
            killed = second.kill()
            killed["ready"] = seen
            assert proc.poll() is None, "the job ended before the node was lost"
            second.wait_dead()
            killed["noticed_s"] = time.monotonic() - started
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the job hung after losing the node: {output(err)[-3000:]}")
            killed["finished_s"] = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout, stderr = output(out), output(err)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), killed


def test_labeling_loses_the_second_node_mid_job_and_labels_every_image_once(head, second, registered_untrained,
                                                                           tmp_path):
    src = tmp_path / "src"
    write_dataset(str(src), 24, seed=21, spec=SynthSpec(height=64, width=96))
    out = tmp_path / "out"
    cmd = driver_cmd(second.node_id, "label", "--model", registered_untrained["checkpoint"],
                     "--input", str(src / "images"), "--out", str(out), "--batch-size", "1", "--task-images", "4",
                     "--coco-panoptic", "--address", head.gcs_address)
    done, killed = run_and_lose(second, cmd, lambda: _written(out) >= 1)
    assert killed["raylet"] and any("Labeler" in t for t in killed["tasks"]), killed   # the model ran there
    assert done.returncode == 0, done.stderr[-3000:]
    assert "24 of 24 images labeled (0 finished before" in done.stdout, done.stdout
    check_outputs(str(out), {f"synth_0021_{i:06d}": (64, 96) for i in range(24)})


def shard_tables(out) -> dict[str, list[dict]]:
    return {n: pq.read_table(os.path.join(out, n)).to_pylist()
            for n in sorted(os.listdir(out)) if n.endswith(".parquet")}


def test_prepare_loses_the_second_node_mid_job_and_writes_the_same_shards(head, second, tmp_path):
    from pipeline.data.prepare import prepare
    from pipeline.data.shards import Source

    src = tmp_path / "src"
    write_dataset(str(src), 32, seed=22, spec=SynthSpec(height=256, width=256))
    paths = [str(src / "images"), str(src / "panoptic.json"), str(src / "panoptic")]
    reference = tmp_path / "reference"
    prepare(Source(*paths), str(reference), rows_per_shard=2, progress=False, in_process=True)

    out = tmp_path / "out"
    shards = lambda: [n for n in os.listdir(out) if n.endswith(".parquet")] if out.is_dir() else []  # noqa: E731
    cmd = driver_cmd(second.node_id, "prepare", "--images", paths[0], "--panoptic-json", paths[1],
                     "--panoptic-dir", paths[2], "--out", str(out), "--rows-per-shard", "2",
                     "--address", head.gcs_address)
    done, killed = run_and_lose(second, cmd, lambda: len(shards()))
    assert killed["raylet"] and killed["workers"] and 1 <= killed["ready"] < 16, killed   # lost mid-job
    assert done.returncode == 0, done.stderr[-3000:]
    assert "32 images in 16 shards (0 already written)" in done.stdout, done.stdout
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))        # no temporaries left
    assert shard_tables(out) == shard_tables(reference)
    manifest, expected = (json.loads((d / "_manifest.json").read_text()) for d in (out, reference))
    assert manifest["shards"] == expected["shards"] and manifest["counts"] == expected["counts"]


def test_training_loses_the_second_node_and_resumes_from_its_checkpoint_on_s3(head, second, s3_server, synth_small,
                                                                              make_shards, mlflow_db, tmp_path):
    """``ciae train`` with its two workers spread over the nodes (``--placement spread``), data,
    checkpoints (every 2 of its 16 steps) and MLflow artifacts on S3; the second node lost after
    a checkpoint: Ray Train restarts the workers on the head from the last checkpoint on S3,
    into the one MLflow run, and the steps go on from there to the end."""
    import mlflow
    from s3_server import upload
    from test_s3 import listing

    root = f"s3://{s3_server['bucket']}/test_ray_nodes_train"
    upload(make_shards(synth_small, 3), f"{root}/shards")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"solver": {"checkpoint_every": 2, "warmup_iters": 1},
                                  "input": {"shorter_sides": [96], "test_shorter_side": 96, "flip_prob": 0.0}}))
    cmd = [sys.executable, "-m", "workflows.cli", "train", "--data", f"{root}/shards", "--val", f"{root}/shards",
           "--config", str(config), "--iterations", "16", "--workers", "2", "--batch-per-worker", "1",
           "--placement", "spread", "--storage", f"{root}/ray_results", "--artifact-root", f"{root}/mlflow",
           "--tracking-uri", mlflow_db, "--experiment", "two-nodes", "--name", "two-nodes", "--pictures", "0",
           "--address", head.gcs_address]
    # two checkpoints uploaded: the first is surely registered with Ray Train by then
    checkpoints = lambda: len([n for n in listing(f"{root}/ray_results/two-nodes") if n.endswith("checkpoint.pt")]) >= 2  # noqa: E731
    done, killed = run_and_lose(second, cmd, checkpoints)
    assert any("RayTrainWorker" in t for t in killed["tasks"]), killed      # a worker ran there
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished at step 16" in done.stdout, done.stdout
    client = mlflow.MlflowClient(mlflow_db)
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = [int(m.value) for m in client.get_metric_history(runs[0].info.run_id, "resumed_at_step")]
    assert len(resumed) == 1 and resumed[0] in range(2, 16, 2), resumed     # from a checkpoint on S3
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert set(steps) == set(range(1, 17)) and max(steps) == 16


def test_labeling_loses_the_node_of_every_model_actor_and_never_hangs(head, registered_untrained, tmp_path):
    """Both model actors (1 CPU each) on a second node of 3 CPUs, which is lost: Ray restarts
    them on the head, whose 2 CPUs they can fill, starving the decoding and encoding they wait
    for. The job either finishes, or stops with one line (status 3) once nothing has finished
    for ``--stall-timeout`` on a cluster left with less than it holds; run again, it picks the
    actors' share for the head and labels the rest: every image exactly once."""
    src = tmp_path / "src"
    write_dataset(str(src), 24, seed=23, spec=SynthSpec(height=64, width=96))
    out = tmp_path / "out"
    args = ["label", "--model", registered_untrained["checkpoint"], "--input", str(src / "images"), "--out", str(out),
            "--batch-size", "1", "--task-images", "4", "--workers", "2", "--stall-timeout", "5", "--coco-panoptic",
            "--address", head.gcs_address]
    node = RayNode.start(head.gcs_address, num_cpus=3, resources={"second": 1})
    try:
        def labelers() -> int:
            return sum("Labeler" in " ".join(p.cmdline()) for p in node.processes())

        done, killed = run_and_lose(node, driver_cmd(node.node_id, *args),
                                    lambda: _written(out) >= 1 and labelers() == 2)
    finally:
        node.stop()
    assert sum("Labeler" in t for t in killed["tasks"]) == 2, killed          # both actors were there
    if done.returncode != 0:
        assert done.returncode == 3, done.stderr[-3000:]
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("ciae label: nothing finished for ") and "node was lost" in line, line
        assert "Traceback" not in done.stderr, done.stderr
        done = subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    assert "24 of 24 images labeled" in done.stdout, done.stdout
    check_outputs(str(out), {f"synth_0023_{i:06d}": (64, 96) for i in range(24)})


def test_watched_rows_fail_in_one_line_only_when_stalled_on_a_shrunk_cluster(monkeypatch):
    """``pipeline.cluster.ray_runtime.watched``: slow rows on a cluster with what the job needs all
    come; rows that stop on a cluster short of CPUs end in ``ClusterShrank`` naming what is
    left; an error of the rows is raised as it is."""
    import ray

    from pipeline.cluster.ray_runtime import ClusterShrank, watched

    def slow(n, pause, fail=None):
        for i in range(n):
            time.sleep(pause)
            yield i
        if fail:
            raise fail
        time.sleep(3600)                                 # then nothing more (the stall)

    need = {"CPU": 3.0, "GPU": 0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    rows = watched(slow(3, 0.3), need, stall_s=0.2, what="the share", poll_s=0.05)
    assert [next(rows) for _ in range(3)] == [0, 1, 2]     # slower than stall_s, but nothing is short
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    start = time.monotonic()
    with pytest.raises(ClusterShrank, match=r"left with 2 CPUs for the 3 it needs \(the share\): a node was lost"):
        next(rows)
    assert time.monotonic() - start < 5
    with pytest.raises(KeyError, match="boom"):
        list(watched(slow(2, 0, fail=KeyError("boom")), need, stall_s=60, what="x"))
