"""One home per layer for checkpoints and model sources: ``ciae.checkpoint.read_meta`` reads a
checkpoint's config and categories without reading its tensors (as safely as ``load``), ``ciae
label``'s driver learns the test size through it (``ModelSource.config``, the weights never
deserialized there), and a model registered with the model code of before the move to
``workflows.tracking`` still loads through plain MLflow."""

from __future__ import annotations

import io
import os
import shutil
import zipfile

import mlflow
import pytest
import torch

from ciae import checkpoint
from ciae.config import Config
from ciae.engine.train import Trainer
from ciae.modeling.backbone import ResNet
from ciae.modeling.model import CIAEModel
from workflows.jobs.label import model_input
from workflows.tracking.location import Tracking
from workflows.tracking.pyfunc import input_example
from workflows.tracking.sources import ModelSource, fetch

NAMES = {184: "sky-other-merged", 187: "grass-merged", 1: "person", 3: "car"}
# workflows/tracking/pyfunc_model.py as models registered before the move stored it
OLD_MODEL_CODE = ("import mlflow\nfrom workflows.pyfunc import CIAEPyfunc\n"
                  "mlflow.models.set_model(CIAEPyfunc())\n")
NOT_TRAINED = "resnet.pt: a torchvision ResNet state dict, not a trained ciae model"


@pytest.fixture(scope="module")
def ckpt() -> dict:
    """A Config.small() checkpoint with its optimiser state (tensors beside plain values)."""
    torch.manual_seed(0)
    trainer = Trainer(CIAEModel(Config.small(), [184, 187], [1, 3], NAMES))
    trainer.step = 7
    return trainer.checkpoint()


def cut_records(data: bytes) -> bytes:
    """The torch.save file ``data`` with each tensor storage record cut to 3 bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            record = src.read(info)
            out.writestr(info, record[:3] if "/data/" in info.filename else record)
    return buf.getvalue()


def resnet_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(ResNet(depth=18, width=8).state_dict(), buf)
    return buf.getvalue()


def test_meta_is_the_checkpoints_fields_but_its_tensors(ckpt, tmp_path):
    data = checkpoint.to_bytes(ckpt)
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    expected = {k: ckpt[k] for k in checkpoint.META_KEYS}
    assert expected["step"] == 7 and expected["category_names"] == NAMES
    assert checkpoint.read_meta(data, "model.pt") == expected
    assert checkpoint.read_meta(str(path), "model.pt") == expected
    with open(path, "rb") as f:
        assert checkpoint.read_meta(f, "model.pt") == expected
    loaded = checkpoint.load(data, "model.pt")
    assert checkpoint.read_meta(data, "model.pt") == {k: loaded[k] for k in checkpoint.META_KEYS}


def test_meta_reads_no_tensor_record(ckpt):
    """The storage records cut short: ``load`` fails on them, ``read_meta`` never reads them."""
    cut = cut_records(checkpoint.to_bytes(ckpt))
    with pytest.raises(ValueError, match="cut.pt: not a loadable checkpoint"):
        checkpoint.load(cut, "cut.pt")
    assert checkpoint.read_meta(cut, "cut.pt") == {k: ckpt[k] for k in checkpoint.META_KEYS}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_meta_refuses_what_load_refuses(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": _Evil(), "stuff_ids": [], "thing_ids": []}, evil)
    with pytest.raises(ValueError, match="evil.pt: not a loadable checkpoint or state dict"):
        checkpoint.read_meta(str(evil), "evil.pt")
    with pytest.raises(FileNotFoundError, match="gone.pt: no such file"):
        checkpoint.read_meta(str(tmp_path / "gone.pt"), "gone.pt")
    with pytest.raises(ValueError, match=NOT_TRAINED):
        checkpoint.read_meta(resnet_bytes(), "resnet.pt")
    other = io.BytesIO()
    torch.save([1, 2, 3], other)
    with pytest.raises(ValueError, match="list.pt: neither a ciae checkpoint"):
        checkpoint.read_meta(other.getvalue(), "list.pt")


def test_the_label_drivers_test_size_does_not_deserialize_the_weights(ckpt, tmp_path, monkeypatch):
    """``model_input`` (``ciae label``'s driver) from a fetched checkpoint file whose tensor
    records are unreadable, with the loading of weights made to fail."""
    path = tmp_path / "model.pt"
    path.write_bytes(cut_records(checkpoint.to_bytes(ckpt)))
    source = fetch(str(path))

    def no_weights(*args, **kwargs):
        raise AssertionError("the driver deserialized the weights")

    monkeypatch.setattr(checkpoint, "load", no_weights)
    assert model_input(source) == Config.small().input
    assert source.config() == Config.small()
    meta = source.meta()
    assert (meta["stuff_ids"], meta["thing_ids"], meta["category_names"]) == ([184, 187], [1, 3], NAMES)
    with pytest.raises(ValueError, match=NOT_TRAINED):
        model_input(ModelSource("resnet.pt", resnet_bytes()))


def test_a_model_registered_with_the_old_model_code_loads_through_plain_mlflow(
        registered_untrained, mlflow_db, tmp_path, monkeypatch):
    """A version whose stored model code imports ``workflows.pyfunc`` (the compatibility module)."""
    old = tmp_path / "old-model"
    registered = Tracking.resolve(registered_untrained["tracking"])
    shutil.copytree(registered.download(registered_untrained["uri"]), old)
    code = old / "pyfunc_model.py"
    assert code.is_file()
    code.write_text(OLD_MODEL_CODE)
    tracking = Tracking.resolve(mlflow_db)
    client = tracking.client()
    run_id = client.create_run(tracking.experiment_id("old-code")).info.run_id
    client.log_artifacts(run_id, str(old), "model")
    client.create_registered_model("old-code")
    model_uri = f"{client.get_run(run_id).info.artifact_uri}/model"
    client.create_model_version("old-code", model_uri, run_id=run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    model = mlflow.pyfunc.load_model("models:/old-code/1")
    assert type(model.unwrap_python_model()).__name__ == "CIAEPyfunc"
    out = model.predict(input_example())
    assert out["image_id"].tolist() == [1] and (out["height"].tolist(), out["width"].tolist()) == ([64], [96])
