"""The README's cluster recipe as users run it: a Ray head started with ``ray start --head`` and
jobs sent with ``ray job submit --working-dir .``, here a ``prepare`` and a ``label`` job on a
head of our own (its own ports and temp dir, stopped by process group, never ``ray stop``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with a dashboard (the job server); yields its HTTP address."""
    temp = tempfile.mkdtemp(prefix="/tmp/ciae-head-")        # short: Ray's socket paths are limited
    gcs, dash, client, node, objects, agent, agent_grpc, env_agent, metrics, w0 = free_ports(10)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", f"--ray-client-server-port={client}",
           f"--node-manager-port={node}", f"--object-manager-port={objects}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--min-worker-port={w0}", f"--max-worker-port={w0 + 40}", "--num-cpus=2",
           f"--object-store-memory={300 * 2**20}", f"--temp-dir={temp}", "--disable-usage-stats"]
    # no drain on SIGTERM (it waits up to 30 s for the node to go idle): the head stops at once
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {open(log.name).read()[-2000:]}")
                time.sleep(0.2)
        yield address
    finally:
        # SIGTERM to `ray start` alone: it stops its processes in order, the raylet first (sent to
        # the whole group, the raylet outlives the GCS and waits for it past any timeout); then
        # SIGKILL to whatever is left of our session
        head.terminate()
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


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
                 "--out", str(labels), "--tracking-uri", tracking, "--workers", "2", "--coco-panoptic")
    assert "6 of 6 images labeled" in out, out[-2000:]
    assert "label: 2 model actors x 0.5 CPU (the cluster has 2; " in out, out[-2000:]   # fitted, said once
    predictions = json.loads((labels / "_coco" / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 6
    assert sorted(os.listdir(labels / "_coco" / "panoptic")) == sorted(
        Path(a["file_name"]).name for a in predictions["annotations"])
