"""Where a run's initial weights come from (``ciae train --init SOURCE``): a registered model
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), an MLflow run's artifact (``runs:/RUN_ID/path``,
a checkpoint file or a logged model), a checkpoint file or URI written by this project, or a
torchvision-format ResNet state dict.

``fetch`` reads the file once, on the driver, with its lineage (the run that made it, the model
version); the driver checks it (``ciae.finetune.read_source``, ``weights_only`` loading) and
hands its bytes to every Ray Train worker through the object store, where each loads it again
with ``weights_only`` (no shared file system needed).
"""

from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass

from ciae.backbone import read_weights
from ciae.finetune import Source, read_source
from pipeline import storage
from workflows import tracking


@dataclass(frozen=True)
class InitSource:
    spec: str                        # as given
    data: bytes                      # the checkpoint or state dict file
    run_id: str | None = None        # the MLflow run that made it
    model_version: str | None = None  # "NAME/VERSION" when it came from the registry

    def source(self) -> Source:
        """The weights, loaded with ``weights_only``."""
        return read_source(read_weights(io.BytesIO(self.data), self.spec), self.spec)


def _checkpoint_in(folder: str, spec: str) -> str:
    """The checkpoint file of a downloaded MLflow model folder (its ``checkpoint`` artifact), or
    the one ``.pt`` file of a folder."""
    mlmodel = os.path.join(folder, "MLmodel")
    if os.path.isfile(mlmodel):
        import yaml

        with open(mlmodel) as f:
            flavor = yaml.safe_load(f).get("flavors", {}).get("python_function", {})
        path = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
        if path is None:
            raise ValueError(f"{spec}: an MLflow model without a ciae checkpoint artifact")
        return os.path.join(folder, path)
    found = glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)
    if len(found) != 1:
        raise ValueError(f"{spec}: expected one checkpoint (.pt) there, found {len(found)}")
    return found[0]


def fetch(spec: str, tracking_uri: str) -> InitSource:
    """Read the weights ``spec`` names (see the module docstring); ValueError with what is
    wrong (an unknown model or version, a missing file)."""
    import mlflow

    if spec.startswith("models:/"):
        m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", spec)
        if not m:
            raise ValueError(f"{spec}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        name, alias, version = m.groups()
        client = tracking.client(tracking_uri)
        try:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except Exception as e:
            raise ValueError(f"{spec}: no such registered model version in {tracking_uri} "
                             f"({type(e).__name__}: {e})") from None
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, mv.version), tracking_uri=tracking_uri)
        return InitSource(spec, storage.read_uri(_checkpoint_in(folder, spec)), mv.run_id, f"{name}/{mv.version}")
    if spec.startswith("runs:/"):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=tracking_uri)
        except Exception as e:
            raise ValueError(f"{spec}: cannot fetch it from {tracking_uri} ({type(e).__name__}: {e})") from None
        path = _checkpoint_in(local, spec) if os.path.isdir(local) else local
        return InitSource(spec, storage.read_uri(path), spec.split("/")[1])
    try:
        return InitSource(spec, storage.read_uri(spec))
    except FileNotFoundError:
        raise FileNotFoundError(f"{spec}: no such file") from None
