"""The README's cluster recipe as users run it: a Ray head started with ``ray start --head`` and
jobs sent with ``ray job submit --working-dir .``, here a ``prepare`` and a ``label`` job on a
head of our own (its own ports and temp dir, stopped by process group, never ``ray stop``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ray_nodes import BIN, REPO, RayNode


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with a dashboard (the job server); yields its HTTP address. Its
    own ports and temp dir; stopped by its pids (``ray_nodes.RayNode``)."""
    node = RayNode.start(num_cpus=2, object_store_mb=300, dashboard=True)
    try:
        yield node.dashboard
    finally:
        node.stop()


def submit(address: str, *args: str) -> str:
    """``ray job submit --working-dir <repo> -- python -m workflows.cli ARGS`` as the README
    shows; returns the job's output, failing the test with it if the job fails. Submitted with
    ``--no-wait`` and its status polled here: the CLI's log tail (1 s sleeps at each end of the
    log, then 1 s between status checks) sees the job's end 2-4 s late."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    job = f"ciae-test-{uuid.uuid4().hex[:12]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job, "--no-wait",
           "--working-dir", str(REPO), "--", "python", "-m", "workflows.cli", *args]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 600
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.2)
    output = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, (status, client.get_job_info(job).message, output[-3000:])
    return output


def test_prepare_and_label_jobs_on_a_ray_head(ray_head, synth_small, registered_untrained, tmp_path):
    shards = tmp_path / "shards"
    out = submit(ray_head, "prepare", "--address", "auto", "--images", synth_small["images"],
                 "--panoptic-json", synth_small["panoptic_json"], "--panoptic-dir", synth_small["panoptic_dir"],
                 "--out", str(shards))
    assert "6 images in 1 shards" in out, out[-2000:]
    manifest = json.loads((shards / "_manifest.json").read_text())
    assert manifest["counts"]["images"] == 6

    model, tracking = registered_untrained["uri"], registered_untrained["tracking"]
    labels = tmp_path / "labels"
    out = submit(ray_head, "label", "--address", "auto", "--model", model, "--input", str(shards),
                 "--out", str(labels), "--tracking-uri", tracking, "--workers", "2", "--batch-size", "2",
                 "--coco-panoptic")
    assert "6 of 6 images labeled" in out, out[-2000:]
    assert "label: 2 model actors x 0.5 CPU (the cluster has 2; " in out, out[-2000:]   # fitted, said once
    predictions = json.loads((labels / "_coco" / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 6
    assert sorted(os.listdir(labels / "_coco" / "panoptic")) == sorted(
        Path(a["file_name"]).name for a in predictions["annotations"])
