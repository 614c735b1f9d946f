"""Nothing in a training worker's process holds the interpreter beside the step (CPU proxy of a
GPU step): ``benchmarks/train/gil.py`` runs the real worker's data stream in a Ray Train worker
with a stand-in step, on a node declaring 16 CPUs with a 0.5 GiB object store (so that the
batches outgrow it, as 800 px batches outgrow 2 GiB), and samples the worker with py-spy. Before,
the worker ran a Ray Data job whose executor thread held the GIL in 10-17% of the samples here
(93-95% on the issue's 16-CPU run); the op-issue times are the benchmark's to report, not a
test's to assert (this 2-core machine's load moves them more than the stream does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(420)
def test_no_thread_beside_the_training_step_holds_the_gil(synth_dataset, make_shards, tmp_path):
    shards = make_shards(synth_dataset(24, 11, 320, 427), rows_per_shard=16)    # its 30 steps: 10 epochs
    out = tmp_path / "gil.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train", "gil.py"), "--shards", shards,
                    "--workdir", str(tmp_path), "--size", "320", "--batch", "8", "--steps", "30",
                    "--gpu-ms", "50", "--store-gb", "0.5", "--samples", "100", "--sample-every-s", "0.05",
                    "--out", str(out)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=400)
    result = json.loads(out.read_text())
    gil = result["gil"]
    assert result["worker"]["steps"] == 30
    assert gil["training"] + gil["other"] + gil["none"] >= 20, gil     # (a dump may miss a process that ends)
    assert gil["other_share"] < 0.05, gil
