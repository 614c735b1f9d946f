"""Where a model comes from (``ciae train --init SOURCE``, ``ciae label --model SOURCE``): a
registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), an MLflow run's artifact
(``runs:/RUN_ID/path``: a checkpoint file or a logged model), a local MLflow model folder, or a
checkpoint file or URI written by this project (``ciae.checkpoint``), or a torchvision-format
ResNet state dict.

``fetch`` reads the checkpoint file once, with its lineage (the run that made it, the model
version), into a :class:`ModelSource`: its bytes travel to Ray workers through the object store
(no shared file system needed), and ``checkpoint()`` / ``source()`` load them with
``weights_only`` (``ciae.checkpoint``); ``meta()`` / ``config()`` read the checkpoint's config and
categories without deserializing its weights (a driver that needs only those). MLflow is read
with its own API: the registry client resolves versions and aliases, ``mlflow.models.Model.load``
reads a model's ``MLmodel`` (where its ``checkpoint`` artifact is), ``Tracking.download`` fetches
only the files needed (``MLmodel``, then the checkpoint, not the model's code). A plain file or
URI does not import MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ciae import checkpoint
from ciae.config import Config
from pipeline.data import storage
from workflows.tracking.location import Tracking

CHECKPOINT_ARTIFACT = "checkpoint"      # the pyfunc model's artifact key (workflows.tracking.pyfunc)


@dataclass(frozen=True)
class ModelSource:
    spec: str                         # as given, a URI's credentials hidden (it is recorded: tags, init.json)
    data: bytes                       # the checkpoint (or state dict) file
    run_id: str | None = None         # the MLflow run that made it
    model_version: str | None = None  # "NAME/VERSION" when it came from the registry

    def checkpoint(self) -> dict:
        """The file's contents (``ciae.checkpoint.load``: ``weights_only``)."""
        return checkpoint.load(self.data, self.spec)

    def source(self) -> checkpoint.Source:
        """The weights as a fine-tuning source (``ciae.checkpoint.read_source``)."""
        return checkpoint.read_source(self.checkpoint(), self.spec)

    def meta(self) -> dict:
        """The checkpoint's config, categories and step, its weights not deserialized
        (``ciae.checkpoint.read_meta``); ValueError when it holds no trained ciae model."""
        return checkpoint.read_meta(self.data, self.spec)

    def config(self) -> Config:
        """The checkpoint's ``Config`` (``meta()``)."""
        return Config.from_dict(self.meta()["config"])


def _checkpoint_of_model(root: str, spec: str, tracking: Tracking) -> str:
    """The local path of the checkpoint artifact of the MLflow model at ``root`` (a local folder
    or an artifact URI), read from its ``MLmodel`` with ``mlflow.models.Model.load``."""
    from mlflow.models import Model

    local = os.path.isdir(root)
    model = Model.load(root if local else tracking.download(f"{root.rstrip('/')}/MLmodel"))
    path = (model.flavors.get("python_function", {}).get("artifacts", {})
            .get(CHECKPOINT_ARTIFACT, {}).get("path"))
    if path is None:
        raise ValueError(f"{spec}: an MLflow model without a ciae checkpoint artifact")
    return os.path.join(root, path) if local else tracking.download(f"{root.rstrip('/')}/{path}")


def fetch(spec: str, tracking: Tracking | None = None) -> ModelSource:
    """Read the model ``spec`` names (see the module docstring); ``tracking``: where
    ``models:/`` and ``runs:/`` live (default ``Tracking.resolve()``). ValueError with what is
    wrong (an unknown model or version, naming the tracking URI; a folder that is no model);
    FileNotFoundError for a missing file."""
    if spec.startswith("models:/"):
        tracking = tracking or Tracking.resolve()
        mv = tracking.model_version(spec)
        root = tracking.client().get_model_version_download_uri(mv.name, mv.version)
        return ModelSource(spec, storage.read_uri(_checkpoint_of_model(root, spec, tracking)), mv.run_id,
                           f"{mv.name}/{mv.version}")
    if spec.startswith("runs:/"):
        tracking = tracking or Tracking.resolve()
        try:
            local = tracking.download(spec)
        except Exception as e:
            raise ValueError(f"{spec}: cannot fetch it from {tracking.uri} ({type(e).__name__}: {e})") from None
        return ModelSource(spec, _read_file_or_model(local, spec, tracking), spec.split("/")[1])
    if os.path.isdir(spec):
        return ModelSource(spec, _read_file_or_model(spec, spec, tracking))
    try:
        return ModelSource(storage.public_uri(spec), storage.read_uri(spec))
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec}: no such file") from None


def _read_file_or_model(local: str, spec: str, tracking: Tracking | None) -> bytes:
    """The bytes of a local checkpoint file, or of the checkpoint of a local MLflow model folder."""
    if not os.path.isdir(local):
        return storage.read_uri(local)
    if not os.path.isfile(os.path.join(local, "MLmodel")):
        raise ValueError(f"{spec}: a folder but not an MLflow model (no MLmodel file); "
                         "name the checkpoint file in it")
    return storage.read_uri(_checkpoint_of_model(local, spec, tracking))
