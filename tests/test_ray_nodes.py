"""Two Ray nodes on one machine (issue 26 item 4): a head and a second node started with
``ray start`` (each its own ports, temp dir and CPUs; the second with a custom resource
``second``), drivers that steer their Ray Data work onto the second node (``ray_nodes.py``: a
soft node affinity), and the second node lost mid-job (SIGKILL to its raylet, workers and other
processes, by the pids its ``ray start`` session holds). It never comes back: the jobs finish on
the head, every image exactly once. (Not tested: the lost node holding every model actor; Ray
restarts them on the head, where they can fill every CPU and starve the CPU stages: a known hang.)"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import pyarrow.parquet as pq
import pytest

from pipeline.synth import SynthSpec, write_dataset
from ray_nodes import FAST_FAILURE_DETECTION, REPO, RayNode, driver_cmd
from test_label import _written, check_outputs


@pytest.fixture(scope="module")
def head():
    """The head: 2 CPUs, a 200 MiB object store, lost nodes noticed in ~2 s."""
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
    from pipeline.prepare import prepare
    from pipeline.shards import Source

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
