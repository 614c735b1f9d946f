"""The package boundaries of docs/ARCHITECTURE.md: ``ciae/`` imports nothing of ours but
``kernels/``, ``kernels/`` nothing of ours, ``pipeline/`` never ``workflows/``; inside each
package, a room (a subfolder by concern) imports only the rooms below it; and loading a model for
inference imports no data-stage code (no pyarrow, Ray or MLflow)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("ciae", "kernels", "pipeline", "workflows")
ALLOWED = {"ciae": {"ciae", "kernels"}, "kernels": {"kernels"}, "pipeline": {"ciae", "kernels", "pipeline"},
           "workflows": set(OURS)}


# Each package's rooms, lowest first: a module imports only from its own room and the ones before
# it. A module at a package's top (``ciae/config.py``, ``ciae/checkpoint.py``) is a room of its own.
ROOMS = {
    "ciae": ["utils", "config", "checkpoint", "data", "modeling", "engine"],
    "pipeline": ["cluster", "data", "feed", "evaluation", "label"],
    "workflows": ["tracking", "pyfunc", "jobs", "review", "commands", "cli"],
}
# kernels/ stays one room: each fused operation is a pair of files side by side (``nms.py``, its
# PyTorch twin, beside ``nms_triton.py``), as in the Triton tutorials


def imported_modules(path: Path) -> set[str]:
    """Our modules that ``path`` imports (``from a.b import c`` counts ``a.b.c`` when c is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            base = ROOT.joinpath(*node.module.split("."))
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (base / a.name).is_dir() or (base / f"{a.name}.py").is_file()}
    return {m for m in found if m.split(".")[0] in OURS}


def imported_packages(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)}


def room_of(module: str) -> str | None:
    """``pipeline.label.store`` -> ``label``; ``ciae.config`` -> ``config``; a package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("package", OURS)
def test_package_imports_stay_inside_their_bounds(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) - ALLOWED[package]) for f in files}
    assert {f: p for f, p in bad.items() if p} == {}


@pytest.mark.parametrize("package", ["ciae", "pipeline", "workflows"])
def test_every_module_sits_in_a_room(package):
    """Subfolders by concern: no module at a package's top but the ones named rooms."""
    loose = [f.stem for f in (ROOT / package).glob("*.py") if f.stem != "__init__"]
    rooms = [d.name for d in (ROOT / package).iterdir() if (d / "__init__.py").is_file()]
    assert sorted(set(loose + rooms) - set(ROOMS[package])) == []


@pytest.mark.parametrize("package", ["ciae", "pipeline", "workflows"])
def test_rooms_import_only_the_rooms_below_them(package):
    order = ROOMS[package]
    bad = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        own = room_of(".".join(f.relative_to(ROOT).with_suffix("").parts))
        if own is None or own == "__init__":
            continue
        above = sorted(m for m in imported_modules(f)
                       if m.split(".")[0] == package and room_of(m) in order
                       and order.index(room_of(m)) > order.index(own))
        if above:
            bad[str(f.relative_to(ROOT))] = above
    assert bad == {}


def test_loading_a_model_for_inference_imports_no_data_stage():
    code = ("import sys\n"
            "import ciae.engine.predictor, ciae.engine.train, ciae.data.transform, pipeline.evaluation.pq\n"
            "loaded = [m for m in ('pyarrow', 'ray', 'mlflow', 'workflows') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_the_docs_name_only_what_exists():
    """Every dotted name of ours in docs/ARCHITECTURE.md and README.md
    (``pipeline.label.store.Summary``) is a module or an attribute of one, or a string the code
    writes (an MLflow tag such as ``ciae.init.run_id``), and every path of ours they name exists:
    a moved or renamed piece fails here until the docs follow it."""
    import importlib.util

    def is_module(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:       # a parent that is no package
            return False

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text() + (ROOT / "README.md").read_text()
    code = "".join(f.read_text() for p in OURS for f in (ROOT / p).rglob("*.py"))
    missing = []
    names = set(re.findall(r"(?<![\w./-])((?:ciae|pipeline|workflows|kernels)(?:\.[A-Za-z_]\w*)+)", text))
    for name in sorted(names):
        parts = name.split(".")
        module = next(k for k in range(len(parts), 0, -1) if is_module(".".join(parts[:k])))
        obj = importlib.import_module(".".join(parts[:module]))
        for attr in parts[module:]:
            obj = getattr(obj, attr, None)
        # a tag the code writes, or the head of one it builds (f"ciae.review.{k}")
        written = any(f'"{".".join(parts[:k])}' in code for k in range(2, len(parts) + 1))
        if obj is None and not written:
            missing.append(name)
    folders = "ciae|pipeline|workflows|kernels|tests|benchmarks|scripts|docs"
    paths = re.findall(rf"(?<![\w./-])((?:{folders})/[\w/.-]*\w)", text)
    missing += sorted({p for p in paths if not (ROOT / p).exists()})
    assert missing == []
