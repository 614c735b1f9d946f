"""The registry: every trained model becomes a version; the alias moves only to a better PQ."""

from __future__ import annotations

import mlflow
import pytest

from ciae.config import Config
from ciae.model import CIAEModel
from ciae.train import Trainer
from workflows import tracking
from workflows.registry import PQ_TAG, register


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("registry") / "checkpoint.pt")
    Trainer(CIAEModel(Config.small(), [184, 187], [1, 3])).save(path)
    return path


def test_alias_moves_only_when_pq_beats_the_holder(checkpoint, tmp_path):
    uri = tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
    exp = tracking.experiment_id("registry", uri)
    client = mlflow.MlflowClient(uri)
    moves = []
    for pq in (0.5, 0.4, None, 0.6):
        with mlflow.start_run(experiment_id=exp):
            moves.append(register(checkpoint, "m", "champion", pq, uri))
    assert moves == [("1", True), ("2", False), ("3", False), ("4", True)]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"
    assert client.get_model_version("m", "2").tags[PQ_TAG] == "0.400000"
    assert PQ_TAG not in client.get_model_version("m", "3").tags


def test_alias_goes_to_the_first_version_even_without_pq(checkpoint, tmp_path):
    uri = tracking.configure(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run(experiment_id=tracking.experiment_id("registry", uri)):
        assert register(checkpoint, "n", "best", None, uri) == ("1", True)
