"""The second GPU run's scripts (benchmarks/gpu/README.md): ``ray_tree.sh`` packs Ray and MLflow
for the GPU machine from the pins of constraints.txt; ``jobs.sh --smoke`` runs the real jobs
(prepare, train, label with a checkpoint file) on tiny inputs here, on the session's Ray, and
reports every figure.
The clean-Python check (``ray_tree.sh --check-clean``: downloads, a new venv) is a manual step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_package_of_the_tree_is_pinned():
    script = (GPU / "ray_tree.sh").read_text()
    tree = [line.split()[0] for line in script.split('TREE="', 1)[1].split('"', 1)[0].splitlines() if line.strip()]
    pins = {norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==", (ROOT / "constraints.txt").read_text(), re.M)}
    assert {"ray", "mlflow-skinny", "pydantic", "jsonschema", "pycocotools"} <= set(tree)
    assert [n for n in tree if norm(n) not in pins] == []


def test_scripts_help_names_every_option():
    """``--help`` exits 0 and names every option the script parses (its ``case`` patterns) and,
    for jobs.sh, every option of jobs.py it passes on."""
    for script, more in (("ray_tree.sh", ""), ("jobs.sh", (GPU / "jobs.py").read_text())):
        source = (GPU / script).read_text()
        options = set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", source, re.M))
        options |= set(re.findall(r"add_argument\(\"(--[a-z][a-z-]*)\"", more))
        assert len(options) >= 2, (script, options)
        done = subprocess.run(["bash", str(GPU / script), "--help"], capture_output=True, text=True)
        text = done.stdout + done.stderr
        assert done.returncode == 0, (script, text)
        assert [o for o in sorted(options) if not re.search(re.escape(o) + r"\b", text)] == [], script


def test_jobs_smoke_reports_every_figure(tmp_path, ray_local):
    """The commands run on the session's Ray (``--address``: no Ray of their own to start and
    stop), without Ray Train's preemption watcher (conftest's ``LEAN_RAY_TRAIN``)."""
    import os

    import ray
    from conftest import LEAN_RAY_TRAIN

    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU / "jobs.sh"), str(out), "--smoke", "--python", sys.executable,
                           "--work", str(tmp_path / "work"), "--address", ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, **LEAN_RAY_TRAIN))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    phases = json.loads((out / "jobs.json").read_text())["phases"]
    assert phases["end"]["problem"] is None
    train, labels = phases["train"], phases["label"]
    assert train["rc"] == 0 and train["steps_done"] == 3 and train["losses_finite"]
    assert train["time_to_first_step_s"] > 0 and train["images_per_s"] > 0 and train["step_ms"] > 0
    assert labels["rc"] == 0 and labels["labeled"] == labels["images"] == 24
    assert labels["images_per_s"] > 0 and labels["segments_per_image"] > 0
    assert {"MapBatches(decode)", "MapBatches(Labeler)", "MapBatches(encode)"} <= set(labels["stage_task_seconds"])
    assert labels["actor_capacity_images_per_s"] > 0 and labels["limited_by"]
    assert labels["checkpoint"].endswith("checkpoint.pt")
    compiled = phases["label_compile"]        # --compile does nothing on the CPU: no recompile
    assert compiled["rc"] == 0 and compiled["labeled"] == 24 and compiled["recompiles"] == 0, compiled
    assert {p.name for p in out.iterdir()} == {"jobs.json", "jobs.md", "jobs.log", "commands.log"}


def test_recompiles_are_counted_in_the_newest_sessions_worker_logs(tmp_path, monkeypatch):
    import importlib.util
    import os
    import time

    spec = importlib.util.spec_from_file_location("gpu_jobs", GPU / "jobs.py")
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    logs = tmp_path / "ray" / "session_latest" / "logs"
    logs.mkdir(parents=True)
    line = "V1207 [0/1] [__recompiles] Recompiling function _forward_features in ciae/modeling/model.py:82\n"
    (logs / "worker-a.err").write_text(line + "other\n" + line)
    (logs / "worker-b.out").write_text(line)
    (logs / "raylet.err").write_text(line)                      # not a worker's
    old = logs / "worker-c.err"
    old.write_text(line)
    os.utime(old, (1.0, 1.0))                                   # written before the command
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert jobs.recompiles(time.time() - 60) == 3
