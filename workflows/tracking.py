"""Where MLflow runs and models live: one tracking URI (also the registry) and one artifact root.

Default: a sqlite database ``mlruns/mlflow.db`` under the current directory with artifacts in
``mlruns/artifacts`` beside it, or ``$MLFLOW_TRACKING_URI`` when set. On a cluster pass a server
(``http://mlflow:5000``, backed by PostgreSQL) and an object-store artifact root.
"""

from __future__ import annotations

import logging
import os

DEFAULT_DIR = "mlruns"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + os.path.abspath(os.path.join(DEFAULT_DIR, "mlflow.db"))


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store go in ``artifacts/`` beside the database file; a server
    (http, postgresql, ...) chooses its own (None)."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "artifacts")
    return None


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at ``tracking_uri`` (default above), creating the
    sqlite database's folder; returns the URI. Call it in every process that talks to MLflow
    (Ray workers and actors included)."""
    import mlflow

    for name in ("mlflow.store.db.utils", "alembic"):     # a new sqlite store's set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri     # inherited by Ray workers started from here
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(tracking_uri: str):
    """An MlflowClient whose registry is ``tracking_uri`` too, whatever an earlier ``configure``
    in this process set as MLflow's global registry."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)


def experiment_id(name: str, tracking_uri: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created with an explicit artifact location if missing."""
    client_ = client(tracking_uri)
    exp = client_.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location or default_artifact_root(tracking_uri)
    if location and location.startswith("file://"):
        location = location + "/" + name
    return client_.create_experiment(name, artifact_location=location)
