"""Shared fixtures: the real COCO sample, small synthetic datasets and one local Ray per session."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():   # the Triton kernels' tests run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")   # (must precede the first import of triton)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

COCO_SAMPLE = Path(__file__).parent / "data" / "coco_sample"


@pytest.fixture(scope="session")
def coco_sample() -> dict:
    """Paths of the real COCO panoptic sample (2 val2017 images, 133 categories)."""
    return {"images": str(COCO_SAMPLE / "input_images"),
            "panoptic_json": str(COCO_SAMPLE / "panoptic_examples.json"),
            "panoptic_dir": str(COCO_SAMPLE / "panoptic_examples")}


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> dict:
    """A 6-image 96x128 synthetic dataset, made once per session; copy it before changing it."""
    from pipeline.synth import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("synth_small")
    write_dataset(str(root), 6, seed=7, spec=SynthSpec(height=96, width=128))
    return {"root": str(root), "images": str(root / "images"),
            "panoptic_json": str(root / "panoptic.json"), "panoptic_dir": str(root / "panoptic")}


@pytest.fixture
def synth_copy(synth_small, tmp_path) -> dict:
    """A private copy of ``synth_small`` that a test may corrupt."""
    root = tmp_path / "src"
    shutil.copytree(synth_small["root"], root)
    return {"root": str(root), "images": str(root / "images"),
            "panoptic_json": str(root / "panoptic.json"), "panoptic_dir": str(root / "panoptic")}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (stages reuse a running Ray)."""
    os.environ.setdefault("CIAE_OBJECT_STORE_MB", "300")
    from pipeline.ray_runtime import connect

    with connect():
        yield
