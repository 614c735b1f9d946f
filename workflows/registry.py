"""The model registry: register a checkpoint as an MLflow pyfunc model version and move an alias
(e.g. ``champion``) to it when its validation PQ beats the current holder's.

A version's PQ is kept as its tag ``val_pq``; a holder without one is beaten by any PQ.
"""

from __future__ import annotations

PQ_TAG = "val_pq"


def register(checkpoint: str, name: str, alias: str, pq: float | None, tracking_uri: str) -> tuple[str, bool]:
    """Log ``checkpoint`` as the pyfunc model of the active MLflow run and register it under
    ``name``. Moves ``alias`` to the new version when no version holds it, or when ``pq`` beats
    the holder's. Returns (version, whether the alias moved)."""

    from workflows import tracking
    from workflows.pyfunc import log_model

    client = tracking.client(tracking_uri)
    info = log_model(checkpoint, registered_model_name=name)
    version = str(info.registered_model_version)
    if pq is not None:
        client.set_model_version_tag(name, version, PQ_TAG, f"{pq:.6f}")
    holder = client.get_registered_model(name).aliases.get(alias)
    if holder is None:
        moved = True
    else:
        best = client.get_model_version(name, str(holder)).tags.get(PQ_TAG)
        moved = pq is not None and (best is None or pq > float(best))
    if moved:
        client.set_registered_model_alias(name, alias, version)
    return version, moved


def register_checkpoint(checkpoint: str, *, tracking_uri: str, model_name: str, alias: str = "champion",
                        experiment: str = "ciae", pq: float | None = None) -> str:
    """``register`` a checkpoint made outside the training driver (an imported model, tests,
    benchmarks) in a new run of ``experiment``. Returns the version's URI ``models:/NAME/VERSION``."""
    import mlflow

    from workflows.tracking import configure, experiment_id

    uri = configure(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id(experiment, uri), run_name="register-checkpoint"):
        version, _ = register(checkpoint, model_name, alias, pq, uri)
    return f"models:/{model_name}/{version}"
