"""The package boundaries of docs/ARCHITECTURE.md: ``ciae/`` imports nothing of ours but
``kernels/``, ``kernels/`` nothing of ours, ``pipeline/`` never ``workflows/``; and loading a
model for inference imports no data-stage code (no pyarrow, Ray or MLflow)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("ciae", "kernels", "pipeline", "workflows")
ALLOWED = {"ciae": {"ciae", "kernels"}, "kernels": {"kernels"}, "pipeline": {"ciae", "kernels", "pipeline"},
           "workflows": set(OURS)}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(OURS)


@pytest.mark.parametrize("package", OURS)
def test_package_imports_stay_inside_their_bounds(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package]) for f in files}
    assert {f: p for f, p in bad.items() if p} == {}


def test_loading_a_model_for_inference_imports_no_data_stage():
    code = ("import sys\n"
            "import ciae.predictor, ciae.train, ciae.transform, ciae.evaluation\n"
            "loaded = [m for m in ('pyarrow', 'ray', 'mlflow', 'pipeline', 'workflows') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)
