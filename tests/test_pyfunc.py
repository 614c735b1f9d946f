"""The registry contract: a checkpoint logged with ``workflows.tracking.pyfunc.log_model``, registered and
aliased (``workflows.tracking.registry``, through the client only), predicts through plain MLflow
(``models:/NAME@ALIAS``, the consumer pointing MLflow at the store), also in a Python where this
project is not installed; and the Predictor behind it maps predictions to each image's size."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray.cloudpickle
import torch
from conftest import write_checkpoint
from mlflow.models import Model
from PIL import Image

from ciae import checkpoint
from ciae.config import Config
from ciae.data.transform import decode_rgb
from ciae.engine.predictor import Predictor
from ciae.engine.train import Trainer
from ciae.modeling.model import CIAEModel
from pipeline.cluster.ray_runtime import assigned_device
from pipeline.data.panoptic_png import decode_id_png
from pipeline.data.synth import SynthSpec, render, select_categories
from workflows.tracking.location import Tracking
from workflows.tracking.pyfunc import PIP_REQUIREMENTS
from workflows.tracking.registry import register_checkpoint

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers import nothing from tests

NAME = "ciae-test"


def encode(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory, _empty_mlflow_db) -> dict:
    """An untrained Config.small() checkpoint, logged, registered and aliased @champion in a
    fresh sqlite MLflow (the README's steps)."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    cats = select_categories()
    torch.manual_seed(0)
    ckpt = write_checkpoint(Trainer(CIAEModel(Config.small(), cats.stuff_ids, cats.thing_ids)), root / "model.pt")
    tracking = Tracking.resolve(f"sqlite:///{root}/mlflow.db")
    version = register_checkpoint(ckpt, tracking_uri=tracking.uri, model_name=NAME, experiment="ciae-test")
    assert version == f"models:/{NAME}/1"    # the first version takes @champion
    source = tracking.client().get_model_version_download_uri(NAME, "1")
    images = [render(cats, i, seed=5, spec=SynthSpec(height=h, width=w))[0]
              for i, (h, w) in enumerate([(70, 90), (128, 96), (50, 61)])]     # one portrait
    return {"uri": tracking.uri, "tracking": tracking, "model_uri": source, "checkpoint": ckpt,
            "categories": cats, "images": images}


@pytest.fixture
def plain_mlflow(registered, monkeypatch):
    """A consumer's process: MLflow pointed at the store by the environment, as a user does."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])


def from_checkpoint(path: str) -> CIAEModel:
    return CIAEModel.from_checkpoint(checkpoint.load(path, path))


def check_output(row, image: np.ndarray, categories) -> np.ndarray:
    """The PNG decodes at the image's size and agrees with its segments_info; returns the ids."""
    ids = decode_id_png(row["panoptic_png"])
    assert ids.shape == image.shape[:2] == (row["height"], row["width"])
    segments = json.loads(row["segments_info"])
    assert segments and sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in segments)
    for s in segments:
        assert s["area"] == int((ids == s["id"]).sum())
        assert s["category_id"] in categories.stuff_ids + categories.thing_ids
    return ids


def test_registered_model_predicts_through_plain_mlflow(registered, plain_mlflow):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    images = registered["images"]
    out = model.predict(pd.DataFrame({"image": [encode(images[0])]}))
    assert list(out.columns) == ["image_id", "height", "width", "panoptic_png", "segments_info"]
    assert out["image_id"].tolist() == [0]
    ids = check_output(out.iloc[0], images[0], registered["categories"])

    # the same as the Predictor on the checkpoint, given the same decoded pixels
    direct = Predictor(from_checkpoint(registered["checkpoint"]))([decode_rgb(encode(images[0]))])[0]
    assert np.array_equal(ids, direct["panoptic"])

    # several sizes in one call (batched by shape, the portrait alone), ids passed through in
    # order, batch_size as a param
    df = pd.DataFrame({"image": [encode(im, "PNG") for im in images], "image_id": [11, 12, 13]})
    out = model.predict(df, params={"batch_size": 2})
    assert out["image_id"].tolist() == [11, 12, 13]
    for (_, row), image in zip(out.iterrows(), images):
        check_output(row, image, registered["categories"])

    # a phone photo: stored 90 high and 70 wide with EXIF orientation 6, predicted as viewers
    # show it (70 high, 90 wide), the same as the Predictor on the turned pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.rot90(images[0], k=1)).save(buf, "JPEG", exif=exif)
    row = model.predict(pd.DataFrame({"image": [buf.getvalue()]})).iloc[0]
    ids = check_output(row, images[0], registered["categories"])
    turned = np.rot90(decode_rgb(encode(np.rot90(images[0], k=1))), k=-1)     # the same JPEG pixels, untagged
    assert np.array_equal(ids, Predictor(from_checkpoint(registered["checkpoint"]))([turned])[0]["panoptic"])


def test_logged_model_carries_signature_example_requirements_and_code(registered):
    local = registered["tracking"].download(registered["model_uri"])
    info = Model.load(local)
    assert [c.name for c in info.signature.inputs.inputs] == ["image", "image_id"]
    assert not info.signature.inputs.inputs[1].required
    assert {c.name for c in info.signature.outputs.inputs} == {"image_id", "height", "width",
                                                                "panoptic_png", "segments_info"}
    ckpt = checkpoint.load(registered["checkpoint"], "model.pt")
    assert Config.from_dict(info.metadata["ciae"]["config"]) == Config.from_dict(ckpt["config"])
    assert info.metadata["ciae"]["thing_ids"] == ckpt["thing_ids"]
    assert sorted(os.listdir(os.path.join(local, "code"))) == ["ciae", "kernels", "pipeline", "workflows"]
    with open(os.path.join(local, "requirements.txt")) as f:
        requirements = f.read()
    lines = requirements.splitlines()
    assert "torch>=2.11" in lines
    assert all(any(line.startswith(r.split(";")[0]) for line in lines) for r in PIP_REQUIREMENTS)
    assert os.path.exists(os.path.join(local, "input_example.json"))


def test_logging_a_model_prints_nothing_a_user_cannot_act_on(registered, capfd):
    """``log_model`` (what ``ciae train`` does last) prints neither MLflow's "Validating input
    example" line nor a download bar for copying the local checkpoint, and puts MLflow's logger
    level and the progress-bar setting back as they were."""
    import logging

    from workflows.tracking.pyfunc import log_model

    tracking = registered["tracking"]
    run_id = tracking.client().create_run(tracking.experiment_id("quiet")).info.run_id
    logger = logging.getLogger("mlflow.pyfunc")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    capfd.readouterr()
    source = log_model(tracking, run_id, registered["checkpoint"],
                       checkpoint.read_meta(registered["checkpoint"], "model.pt"))
    err = capfd.readouterr().err
    assert "Validating input example" not in err and "Downloading artifacts" not in err, err
    assert (logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")) == (level, bar)
    assert source.endswith("/model") and Model.load(tracking.download(source)).signature is not None


def test_unreadable_image_names_its_row(registered, plain_mlflow):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    good = encode(registered["images"][0])
    df = pd.DataFrame({"image": [good, good[: len(good) // 2]], "image_id": [4, 5]})
    with pytest.raises(ValueError, match=r"row 1 \(image_id 5\): unreadable image"):
        model.predict(df)


PLAIN_PYTHON = """
import json, sys
# this project is installed in editable mode in the test environment: hide it
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import importlib.util
assert importlib.util.find_spec("ciae") is None, "the project is still importable"
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/{name}@champion")
out = model.predict(pd.DataFrame({{"image": [open(sys.argv[2], "rb").read()]}}))
import ciae
print(json.dumps({{"ciae": ciae.__file__, "png": out["panoptic_png"][0].hex(),
                  "segments_info": out["segments_info"][0]}}))
"""


def test_model_loads_where_the_project_is_not_installed(registered, plain_mlflow, tmp_path):
    image_file = tmp_path / "x.jpg"
    image_file.write_bytes(encode(registered["images"][1]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", PLAIN_PYTHON.format(name=NAME), registered["uri"],
                          str(image_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert os.sep + os.path.join("code", "ciae", "__init__.py") in got["ciae"]   # the model's copy
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    here = model.predict(pd.DataFrame({"image": [image_file.read_bytes()]})).iloc[0]
    assert bytes.fromhex(got["png"]) == here["panoptic_png"]
    assert got["segments_info"] == here["segments_info"]


def test_predictor_maps_back_to_each_image_size(registered):
    model = from_checkpoint(registered["checkpoint"])
    predictor = Predictor(model)
    cats = registered["categories"]
    # at the test size (192 x 256, multiples of 32) the Predictor is the model itself
    image = render(cats, 0, seed=9, spec=SynthSpec(height=192, width=256))[0]
    assert predictor.transform.test_size(192, 256) == (192, 256)
    ref = model.predict(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous(), [(192, 256)])[0]
    got = predictor([image])[0]
    assert np.array_equal(got["panoptic"], ref["panoptic"])
    assert got["segments_info"] == ref["segments_info"]
    # smaller images: resized up, predicted, mapped back; segments measured at the own size
    small = registered["images"]
    for image, pred in zip(small, predictor(small, batch_size=2, return_embeddings=True)):
        h, w = image.shape[:2]
        assert pred["panoptic"].shape == (h, w)
        th, tw = predictor.transform.test_size(h, w)
        assert pred["embedding"].shape == (model.cfg.embedding.dim, (th + 3) // 4, (tw + 3) // 4)
        assert pred["segments_info"]
        for s in pred["segments_info"]:
            mask = pred["panoptic"] == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum() > 0
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_the_registered_model_is_logged_from_code(registered):
    """MLflow's models-from-code: the version stores the model file, no pickled Python object."""
    import yaml

    local = registered["tracking"].download(registered["model_uri"])
    with open(os.path.join(local, "MLmodel")) as f:
        flavor = yaml.safe_load(f)["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert "pyfunc_model.py" in os.listdir(local)
    assert not [n for n in os.listdir(local) if n.endswith(".pkl")]


# ---- the device a loaded model takes ------------------------------------------------------------

class DeviceProbe:
    """A zero-GPU Ray actor on a node whose CUDA looks available (Ray need not hide a node's
    GPUs from such a worker)."""

    def __init__(self):
        torch.cuda.is_available = lambda: True

    def loaded_device(self, model_uri: str, tracking: Tracking) -> str:
        model = mlflow.pyfunc.load_model(tracking.download(model_uri)).unwrap_python_model().predictor.model
        return str(next(model.parameters()).device)

    def device(self, assigned=None, visible=None) -> str:
        """``assigned_device()`` with Ray's assignment faked as ``assigned`` GPU ids (None: the real
        one) and CUDA_VISIBLE_DEVICES as ``visible``."""
        import ray

        if assigned is not None:
            ray.get_gpu_ids = lambda: assigned
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        return assigned_device()


def test_a_ray_worker_runs_the_model_on_the_gpu_ray_assigned_it(registered, ray_local):
    import ray

    probe = ray.remote(num_cpus=0, num_gpus=0)(DeviceProbe).remote()
    try:
        assert ray.get(probe.device.remote()) == "cpu"              # no GPU assigned, even if CUDA is there
        assert ray.get(probe.loaded_device.remote(registered["model_uri"], registered["tracking"])) == "cpu"
        for assigned, visible, device in [([2], "2", "cuda:0"),        # Ray sets CUDA_VISIBLE_DEVICES
                                          (["3"], "1,3", "cuda:1"),
                                          ([1], None, "cuda:1"),       # ... unless told not to
                                          ([], "0,1", "cpu")]:
            assert ray.get(probe.device.remote(assigned, visible)) == device, (assigned, visible)
    finally:
        ray.kill(probe)


def test_outside_ray_workers_the_model_runs_on_cuda_when_available(ray_local, monkeypatch):
    """A Ray driver, or a plain ``mlflow.pyfunc.load_model`` in a process without Ray."""
    assert assigned_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert assigned_device() == "cuda"                                 # this process is Ray's driver
    monkeypatch.delitem(sys.modules, "ray")
    assert assigned_device() == "cuda"
