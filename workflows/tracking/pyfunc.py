"""The registry contract: a CIAE checkpoint as an MLflow pyfunc model.

A registered model is used with plain MLflow, without this project installed (its packages
travel with the model as ``code_paths``)::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/ciae@champion")
    out = model.predict(pd.DataFrame({"image": [open("x.jpg", "rb").read()]}),
                        params={"batch_size": 4})

Input: a DataFrame with ``image`` (encoded JPEG/PNG/... bytes, any size) and optionally
``image_id`` (int; default the row position). Output: one row per input row with ``image_id``,
``height``, ``width`` (the input image's size), ``panoptic_png`` (a COCO panoptic PNG at that
size: id = R + 256 G + 256² B, 0 = void) and ``segments_info`` (a JSON list of {id,
category_id, iscrowd, area, bbox}, COCO category ids). An unreadable image raises ValueError
naming its row. The model runs where ``pipeline.cluster.ray_runtime.assigned_device`` says: inside a
Ray task or actor on the GPU Ray assigned it (none assigned: the CPU), elsewhere on CUDA when
available.

The model is logged from code (MLflow's models-from-code): the registered version holds
``workflows/tracking/pyfunc_model.py``, which builds a :class:`CIAEPyfunc`, the checkpoint as an artifact
and this project's packages as ``code_paths`` (nothing is pickled). Its MLflow ``metadata``
holds ``ciae``: the checkpoint's config and category ids, readable without downloading it.
``log_model`` saves the model folder with ``mlflow.pyfunc.save_model`` and uploads it into the
run's artifacts with the client (``workflows.tracking.location.Tracking``): no active run, no global
tracking URI.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import mlflow.pyfunc
import numpy as np
import pandas as pd

DEFAULT_BATCH_SIZE = 4

# What the model needs at load time; pinned loosely so a consumer's environment resolves.
PIP_REQUIREMENTS = [
    "torch>=2.11",
    'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',  # fused kernels on CUDA
    "numpy>=1.24",
    "pillow>=10.0",
    "pyspng>=0.1.2",
    "pyarrow>=14.0",
    "pandas>=2.0",
    f"mlflow>={mlflow.__version__.rsplit('.', 1)[0]}",
]
PACKAGES = ("ciae", "kernels", "pipeline", "workflows")


class CIAEPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around :class:`ciae.engine.predictor.Predictor`; artifact ``checkpoint`` is a
    checkpoint of this project (``ciae.checkpoint``)."""

    def load_context(self, context) -> None:
        from ciae import checkpoint
        from ciae.engine.predictor import Predictor
        from ciae.modeling.model import CIAEModel
        from pipeline.cluster.ray_runtime import assigned_device

        path = context.artifacts["checkpoint"]
        self.predictor = Predictor(CIAEModel.from_checkpoint(checkpoint.load(path, path), assigned_device()))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """model_input: DataFrame with ``image`` bytes and optional ``image_id``; params:
        {"batch_size": int}. Returns the DataFrame described in the module docstring."""
        from ciae.engine.predictor import ORDER_WINDOW
        from pipeline.data.panoptic_png import encode_id_png

        if "image" not in model_input.columns:
            raise ValueError(f"input needs an 'image' column of encoded image bytes, "
                             f"got columns {list(model_input.columns)}")
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        data = list(model_input["image"])
        ids = (list(model_input["image_id"]) if "image_id" in model_input.columns
               else list(range(len(data))))
        rows = []
        window = max(ORDER_WINDOW, batch_size)      # decoded at once, batched by shape within
        for k in range(0, len(data), window):
            images, sizes = [], []
            for j in range(k, min(k + window, len(data))):
                try:          # as the labeling job decodes (a large JPEG at a reduced scale)
                    image, size = self.predictor.transform.decode_for_test(bytes(data[j]))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"row {j} (image_id {ids[j]}): {e}") from None
                images.append(image)
                sizes.append(size)
            preds = self.predictor.predict_many(images, sizes, batch_size)
            for j, (h, w), pred in zip(range(k, len(data)), sizes, preds):
                rows.append({"image_id": int(ids[j]), "height": h, "width": w,
                             "panoptic_png": encode_id_png(pred["panoptic"]),
                             "segments_info": json.dumps(pred["segments_info"])})
        columns = ["image_id", "height", "width", "panoptic_png", "segments_info"]
        out = pd.DataFrame(rows, columns=columns)
        return out.astype({"image_id": "int64", "height": "int32", "width": "int32"})


def signature():
    """Input: image (binary), image_id (long, optional); output: the columns above; params:
    batch_size (long, default 4)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("long", "image_id", required=False)]),
        outputs=Schema([ColSpec("long", "image_id"), ColSpec("integer", "height"),
                        ColSpec("integer", "width"), ColSpec("binary", "panoptic_png"),
                        ColSpec("string", "segments_info")]),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]))


def input_example():
    """One small (64 x 96) PNG: a colour gradient."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:96]
    rgb = np.stack([x * 255 // 95, y * 255 // 63, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "image_id": [1]})


def package_dirs() -> list[str]:
    """The folders of this project's packages, shipped with the model as ``code_paths``."""
    import importlib

    return [os.path.dirname(importlib.import_module(p).__file__) for p in PACKAGES]


def model_metadata(meta: dict) -> dict:
    """The MLflow ``metadata`` of a logged checkpoint: its config and categories under ``ciae``
    (``meta``: ``ciae.checkpoint.read_meta``'s, or the loaded checkpoint)."""
    return {"ciae": {"config": meta["config"], "stuff_ids": meta["stuff_ids"], "thing_ids": meta["thing_ids"],
                     "category_names": {str(k): v for k, v in (meta.get("category_names") or {}).items()}}}


@contextlib.contextmanager
def _quiet_save():
    """``save_model`` without its console lines that tell a user nothing to act on: the INFO line
    "Validating input example against model signature" (a mismatch still raises) and a
    "Downloading artifacts" bar for the copy of the local checkpoint into the model folder."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    log, name = logging.getLogger("mlflow.pyfunc"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    level, bar = log.level, os.environ.get(name)
    log.setLevel(logging.WARNING)
    os.environ[name] = "false"
    try:
        yield
    finally:
        log.setLevel(level)
        if bar is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = bar


def log_model(tracking, run_id: str, checkpoint_file: str, meta: dict, *, name: str = "model") -> str:
    """Log a checkpoint as the pyfunc model ``name`` of run ``run_id`` (``tracking``: a
    ``workflows.tracking.location.Tracking``). ``checkpoint_file``: the checkpoint's local file (stored
    as the model's ``checkpoint`` artifact); ``meta``: its config and categories
    (``ciae.checkpoint.read_meta``, or the checkpoint as already loaded; the metadata's source).
    Returns the model's artifact URI (a registry version's source).

    The model folder is made with ``mlflow.pyfunc.save_model`` (models-from-code) and uploaded
    with the client: no active run or process-global tracking URI is involved."""
    import tempfile

    if not os.path.isfile(checkpoint_file):
        raise FileNotFoundError(f"checkpoint {checkpoint_file} does not exist")
    client = tracking.client()
    with tempfile.TemporaryDirectory() as tmp, _quiet_save():
        folder = os.path.join(tmp, name)
        mlflow.pyfunc.save_model(
            folder, python_model=os.path.join(os.path.dirname(__file__), "pyfunc_model.py"),
            artifacts={"checkpoint": checkpoint_file}, code_paths=package_dirs(), signature=signature(),
            input_example=input_example(), pip_requirements=PIP_REQUIREMENTS, metadata=model_metadata(meta))
        client.log_artifacts(run_id, folder, name)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{name}"
