"""The GPU suite's smoke mode (benchmarks/gpu/run.sh OUT --smoke): every section runs on the CPU
with tiny inputs and records the figures it promises, so that the suite works when a GPU is
lent. Times are never asserted."""

from __future__ import annotations

import ast
import importlib
import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "correctness", "kernels", "train_step", "inference", "e2e_numerics", "tiles"]


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu_suite")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--smoke", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert (out / "results.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    failed = {k: v.get("reason") for k, v in results["sections"].items() if v["status"] != "ok"}
    assert run.returncode == 0 and not failed, (failed, run.stdout[-3000:])
    return results, (out / "results.md").read_text(), out


def test_every_section_ran_and_is_reported(smoke):
    results, md, out = smoke
    assert list(results["sections"]) == SECTIONS
    assert results["suite"]["smoke"] is True
    for name, entry in results["sections"].items():
        assert entry["status"] == "ok" and not entry["skipped"], name
        assert entry["summary"] and entry["tables"], name
        assert f"## {name}: ok" in md and f"| {name} | ok |" in md
    assert (out / "suite.log").read_text().count("[suite]") == 2 * len(SECTIONS)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "suite.log",
                                                     "tiles.json"]     # no temporary left


def test_env_and_ceilings(smoke):
    env = smoke[0]["sections"]["env"]
    assert env["torch"] and env["triton"] and env["python"] and env["device"]
    assert finite(env["copy_tbps"], env["matmul_bf16_tflops"])
    assert env["copy_tbps"] > 0 and env["matmul_bf16_tflops"] > 0


def test_correctness_cases_pass(smoke):
    c = smoke[0]["sections"]["correctness"]
    cases = c["cases"]
    assert len(cases) == c["n_cases"] == 34 and c["passed_all"] and c["n_failed"] == 0
    assert {(x["op"], x["dtype"]) for x in cases if x["case"] == "COCO"} == {
        (op, dt) for op in ("segment_sums", "loss", "assign", "assign_upsampled")
        for dt in ("fp32", "bf16")}
    for x in cases:
        assert x["passed"], x
        if x["op"].startswith("assign"):
            assert x["not_near_tie"] == 0 and finite(x["best_rel_err"], x["labels_equal"])
            assert x["best_rel_err"] < x["tol"]
        else:
            assert x["errors"] and all(finite(v) and v < x["tol"] for v in x["errors"].values())
    loss = next(x for x in cases if x["case"] == "COCO" and x["op"] == "loss")
    assert set(loss["errors"]) == {"loss", "d_emb", "d_queries", "d_weight"}


def test_kernel_tables(smoke):
    k = smoke[0]["sections"]["kernels"]
    assert set(k["tables_by_dtype"]) == {"float32", "bfloat16"}
    for rows in k["tables_by_dtype"].values():
        assert len(rows) == 15 and not [r for r in rows if "error" in r]
        for r in rows:
            assert finite(r["ms"], r["floor_ms"], r["pct_floor"]) and r["ms"] > 0
            if r["impl"] != "eager twin":
                assert finite(r["x_eager"], r["agreement_value"])
                if r["op"].startswith("assign"):
                    assert r["agreement_value"] > 0.99
                else:
                    assert r["agreement_value"] < 2e-2
    assert finite(k["goals"]["float32"]["loss_x_eager"])


def test_train_step_and_inference(smoke):
    sections = smoke[0]["sections"]
    backends = sections["train_step"]["backends"]
    assert set(backends) == {"triton", "torch", "triton+compile"}
    for b in backends.values():
        assert finite(b["images_per_s"], b["step_ms"], b["first_step_s"], b["loss_ms"], b["loss_share"])
        assert b["images_per_s"] > 0 and b["loss_share"] > 0
    compiled = backends["triton+compile"]
    assert finite(sections["train_step"]["compile_speedup"], compiled["other_orientation_step_s"])
    # at the smoke's 64 px P6 and P7 are one cell high or wide, so the transposed batch may compile
    # again (0/1 specialisation); from 160 px up the network traces once (tests/test_compile.py)
    assert compiled["compiled_graphs"] in (1, 2)
    assert all(im["instances"] >= 1 and im["stuff_classes"] >= 1
               for im in sections["train_step"]["images"])
    inf = sections["inference"]
    assert sorted((r["batch"], r["bf16_autocast"], r["variant"]) for r in inf["gpu_resident"]) == [
        (1, False, "channels-last"), (1, True, "channels-last"), (8, False, "channels-last"),
        (8, True, "NCHW"), (8, True, "channels-last"), (8, True, "cudnn.benchmark")]
    assert all(finite(r["images_per_s"]) and r["images_per_s"] > 0 for r in inf["gpu_resident"])
    assert inf["planted"]["in_range"] and inf["planted"]["instances_per_image"] > 0
    for run in (inf["loader"], inf["end_to_end"]):
        assert run["images"] == 16 and finite(run["images_per_s"], run["steady_images_per_s"])
    assert inf["limited_by"]


def test_e2e_numerics_and_tiles(smoke):
    results, md, out = smoke
    e2e = results["sections"]["e2e_numerics"]
    assert e2e["steps"] == e2e["steps_planned"] == 20 and e2e["in_band"] is None
    assert finite(e2e["pq"], e2e["sq"], e2e["rq"], e2e["final_loss"]) and 0 <= e2e["pq"] <= 1
    tiles = results["sections"]["tiles"]
    assert len(tiles["groups"]) == 6
    assert all(finite(g["current_ms"], g["best_ms"], g["speedup"]) for g in tiles["groups"])
    doc = json.loads((out / "tiles.json").read_text())
    files = {"kernels/ciae_loss_triton.py": {"LOSS_FWD_TILES", "LOSS_BWD_TILES"},
             "kernels/assign_triton.py": {"ASSIGN_TILES", "ASSIGN_UPSAMPLED_TILES"},
             "kernels/segment_sums_triton.py": {"SEGMENT_SUMS_TILES", "SEGMENT_SUMS_BWD_TILES"}}
    assert set(doc["proposal_py"]) == set(files)
    for f, names in files.items():     # the proposal is Python with the same tables as the module
        module = importlib.import_module(f[:-3].replace("/", "."))
        proposed = {n.targets[0].id: n.value for n in ast.parse(doc["proposal_py"][f]).body}
        assert set(proposed) == names
        for name, value in proposed.items():
            assert {ast.literal_eval(k) for k in value.keys} == set(getattr(module, name))


def test_a_cuda_fault_ends_only_its_kernel(tmp_path):
    """A (simulated) CUDA fault in the loss kernel: each section records it, is started again in
    a fresh process without the loss, and measures every other kernel; the suite goes on."""
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(tmp_path),
                          "--smoke", "--sections", "correctness,kernels,tiles",
                          "--inject-fault", "loss"], capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert run.returncode == 1 and list(sections) == ["correctness", "kernels", "tiles"]
    for name, entry in sections.items():
        assert entry["status"] == "failed" and entry["launches"] == 2, (name, entry.get("reason"))
        assert [f["unit"] for f in entry["faults"]] == ["loss"] and "CUDA fault" in entry["reason"]
        assert all("loss faulted earlier" in x for x in entry["skipped"])
    cases = sections["correctness"]["cases"]
    others = [c for c in cases if c["op"] != "loss"]
    assert len(others) == 25 and all(c["passed"] for c in others)
    assert not any(c["passed"] for c in cases if c["op"] == "loss")
    for rows in sections["kernels"]["tables_by_dtype"].values():
        assert {r["op"] for r in rows} == {"segment_sums", "assign", "assign_upsampled"}
        assert not [r for r in rows if "error" in r]
    assert {g["kernel"] for g in sections["tiles"]["groups"]} == {
        "assign", "assign_upsampled", "segment_sums", "segment_sums bwd"}
    md = (tmp_path / "results.md").read_text()
    assert md.count("CUDA fault in loss") == 3
