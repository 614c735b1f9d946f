"""The registry: every trained model becomes a version; the alias moves only to a better PQ; and
none of it touches MLflow's process-global state."""

from __future__ import annotations

import mlflow
import pytest
from conftest import write_checkpoint

from ciae import checkpoint
from ciae.config import Config
from ciae.engine.train import Trainer
from ciae.modeling.model import CIAEModel
from workflows.tracking.location import Tracking
from workflows.tracking.registry import PQ_TAG, register


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    path = write_checkpoint(Trainer(CIAEModel(Config.small(), [184, 187], [1, 3])),
                            tmp_path_factory.mktemp("registry") / "checkpoint.pt")
    return path, checkpoint.load(path, path)


def test_alias_moves_only_when_pq_beats_the_holder(saved, mlflow_db, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    global_uri = mlflow.get_tracking_uri()
    tracking = Tracking.resolve(mlflow_db)
    client = tracking.client()
    exp = tracking.experiment_id("registry")
    moves = []
    for pq in (0.5, 0.4, None, 0.6):
        run_id = client.create_run(exp).info.run_id
        moves.append(register(tracking, run_id, *saved, "m", "champion", pq))
    assert moves == [("1", True), ("2", False), ("3", False), ("4", True)]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"
    assert client.get_model_version("m", "2").tags[PQ_TAG] == "0.400000"
    assert PQ_TAG not in client.get_model_version("m", "3").tags
    assert client.get_model_version("m", "4").run_id == run_id
    # a plain consumer that points MLflow at the store loads the version through the alias
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    info = mlflow.models.get_model_info("models:/m@champion")
    assert info.metadata["ciae"]["stuff_ids"] == [184, 187]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow.get_tracking_uri() == global_uri and mlflow.get_registry_uri() == global_uri   # untouched


def test_alias_goes_to_the_first_version_even_without_pq(saved, mlflow_db):
    tracking = Tracking.resolve(mlflow_db)
    run_id = tracking.client().create_run(tracking.experiment_id("registry")).info.run_id
    assert register(tracking, run_id, *saved, "n", "best", None) == ("1", True)


def test_tracking_defaults_and_relative_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = Tracking.resolve()
    assert default.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert default.artifact_root == f"file://{tmp_path}/mlruns/artifacts"
    assert (tmp_path / "mlruns").is_dir()
    assert Tracking.resolve("sqlite:///db/x.db").uri == f"sqlite:///{tmp_path}/db/x.db"   # for workers elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert Tracking.resolve() == Tracking("http://mlflow:5000", None)
